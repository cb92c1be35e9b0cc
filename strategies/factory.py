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
    FedAvg,
    Strategy,
)

from .config import SecAggConfig, StrategyConfig


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


def build_strategy(cfg: StrategyConfig, num_sites: int) -> Strategy:
    """Flower's FedAvg, example-weighted (the 'num-examples' each hospital reports), wrapped in
    Flower's central-DP strategy when cfg.central_dp is set. `num_sites`: hospitals sampled
    per round (the DP noise is scaled by it)."""
    strategy = FedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_sites,
        weighted_by_key="num-examples",
        train_metrics_aggr_fn=weighted_mean,
        evaluate_metrics_aggr_fn=weighted_mean,
    )
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
