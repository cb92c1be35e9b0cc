"""Build a Flower strategy from a StrategyConfig."""

from __future__ import annotations

import math

from flwr.app import MetricRecord, RecordDict
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from strategies.config import SecAggConfig, StrategyConfig


WEIGHT_KEY = "num-examples"  # each reply's example count: what every strategy here weighs by


def weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of each metric, skipping sites where a metric is NaN (e.g. AUC
    of a site whose validation split holds one class)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])
        for key, value in metrics.items():
            if key == weight_key or isinstance(value, list) or math.isnan(value):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    total = sum(float(next(iter(r.metric_records.values()))[weight_key]) for r in records)
    out = MetricRecord({k: sums[k] / weights[k] for k in sums})
    out[weight_key] = int(total)
    return out


def cohort(cfg: StrategyConfig, num_sites: int) -> int:
    """Hospitals asked to train each round out of `num_sites` connected: Flower's own rule
    (FedAvg.configure_train: int(n x fraction_train), at least min_train_nodes)."""
    return max(int(num_sites * cfg.fraction_train), cfg.min_sites)


def _base(cfg: StrategyConfig, num_sites: int) -> Strategy:
    """The named Flower strategy, example-weighted (each hospital's 'num-examples')."""
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_sites,
        weighted_by_key=WEIGHT_KEY,
        train_metrics_aggr_fn=weighted_mean,
        evaluate_metrics_aggr_fn=weighted_mean,
    )
    name, f = cfg.name, cfg.num_malicious
    needed = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(name, 0)
    if num_sites < needed:
        raise ValueError(f"{name} with num_malicious={f} needs at least {needed} hospitals per round, "
                         f"the federation has {num_sites}")
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=cfg.server_lr or 1.0, server_momentum=cfg.server_momentum)
    eta = cfg.server_lr or 0.01
    if name in ("fedadam", "fedyogi"):
        cls = FedAdam if name == "fedadam" else FedYogi
        return cls(**common, eta=eta, beta_1=cfg.beta_1, beta_2=cfg.beta_2, tau=cfg.tau)
    if name == "fedadagrad":
        return FedAdagrad(**common, eta=eta, tau=cfg.tau)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=f)
    if name == "multikrum":
        return MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=cfg.num_selected or max(num_sites - f, 1))
    if name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=f)
    return FedAvg(**common)  # fedavg; scaffold averages as it does (its control variates: server/engine/scaffold.py)


def build_strategy(cfg: StrategyConfig, num_sites: int) -> Strategy:
    """The Flower strategy `cfg.name`, wrapped in Flower's central-DP strategy when
    cfg.central_dp is set. `num_sites`: hospitals sampled per round (the DP noise is scaled by
    it; Krum/Bulyan need enough of them). ValueError on impossible settings."""
    strategy = _base(cfg, num_sites)
    dp = cfg.central_dp
    if dp is None:
        return strategy
    if dp.clipping.endswith("fixed"):
        wrapper = (DifferentialPrivacyServerSideFixedClipping if dp.clipping == "server-fixed"
                   else DifferentialPrivacyClientSideFixedClipping)
        return wrapper(strategy, dp.noise_multiplier, dp.clipping_norm, num_sites)
    wrapper = (DifferentialPrivacyServerSideAdaptiveClipping if dp.clipping == "server-adaptive"
               else DifferentialPrivacyClientSideAdaptiveClipping)
    return wrapper(strategy, dp.noise_multiplier, num_sites, initial_clipping_norm=dp.clipping_norm,
                   target_clipped_quantile=dp.target_clipped_quantile, clip_norm_lr=dp.clip_norm_lr,
                   clipped_count_stddev=dp.clipped_count_stddev)


def client_clipping(cfg: StrategyConfig) -> str:
    """What the hospitals' clipping mod must do: 'none', 'fixed' or 'adaptive'."""
    dp = cfg.central_dp
    return dp.clipping.removeprefix("client-") if dp is not None and dp.clipping.startswith("client-") else "none"


def build_secure_workflow(cfg: SecAggConfig, timeout: float | None) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow (it checks its own arguments: ValueError)."""
    return SecAggPlusWorkflow(
        cfg.num_shares, cfg.reconstruction_threshold, max_weight=cfg.max_weight, clipping_range=cfg.clipping_range,
        quantization_range=cfg.quantization_range, modulus_range=cfg.modulus_range, timeout=timeout,
    )
