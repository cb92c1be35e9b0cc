"""Run a simulated federation on Flower's Simulation Engine (Ray)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from pathlib import Path

for _key, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ("RAY_DEDUP_LOGS", "0"),
):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from client.training.app import build_client_app  # noqa: E402
from server.app import build_server_app  # noqa: E402
from server.engine.plan import Plan, Progress  # noqa: E402
from server.engine.updates import check_start  # noqa: E402
from medimaging.models import head_keys, norm_keys  # noqa: E402
from server.records.report import data_line  # noqa: E402
from server.records.outputs import untrained  # noqa: E402

from strategies.factory import build_secure_workflow, build_strategy, cohort  # noqa: E402

from simulations.config import ConfigError, SimulationConfig, dump_config  # noqa: E402
from simulations.federation import (  # noqa: E402
    check_budgets, config_from_run_config, distribution, global_test, hospital, resolved, site_precision, small_sites, task_shape,
)


def start_weights(cfg, shape):
    """model.weights checked before anything is written, its sha256 kept in the config (so
    config.yaml and the model card name the file a run started from; model.freeze and
    model.adapters are checked against the model too); None without weights."""
    if cfg.model.weights is None:
        return None
    loaded = check_start(cfg, shape, cfg.private)
    cfg.model.weights, cfg.model.weights_sha256 = Path(loaded.path).resolve(), loaded.sha256
    return loaded


def prepare_run(cfg: SimulationConfig, progress: Progress | None = None) -> Plan:
    """Resolve the config, create the run folder with config.yaml and data_distribution.json."""
    created = time.time()  # the run's wall time counts its preparation (data checks, test split)
    cfg = resolved(cfg)
    check_budgets(cfg)
    try:  # Flower's strategy constructors check their own arguments: ask them before the run starts
        build_strategy(cfg.strategy, cohort(cfg.strategy, len(cfg.sites)))
    except ValueError as exc:
        raise ConfigError(f"strategy{'.central_dp' if cfg.strategy.central_dp else ''}: {exc}") from None
    shape = task_shape(cfg)
    started = start_weights(cfg, shape)
    model = shape.model(cfg, cfg.private) if cfg.strategy.fedbn or cfg.strategy.fedper else None
    if cfg.strategy.fedbn and not norm_keys(model):
        raise ConfigError(f"strategy.fedbn: model.name={cfg.model.name} has no normalisation weights to keep at the "
                          "hospitals; use smallresnet, resnet18 or densenet121")
    method = cfg.strategy.personalization.method
    if cfg.strategy.fedper and not head_keys(model):
        raise ConfigError(f"strategy.personalization.method {method}: model.name={cfg.model.name} has no classifier "
                          f"head to keep at the hospitals; {method} is for classification")
    dp_sgd = any(cfg.site_policy(name).enabled for name in cfg.sites)
    if cfg.strategy.personalization.extra_passes and dp_sgd:
        raise ConfigError(f"strategy.personalization.method {method}: not available with DP-SGD at the hospitals (its "
                          "extra local passes would train on private data outside the privacy ledger)")
    if cfg.strategy.name == "scaffold" and dp_sgd:
        raise ConfigError("strategy.name scaffold: not available with DP-SGD at the hospitals (Opacus writes the "
                          "noised gradient at its step, so the control-variate correction would not survive it)")
    if cfg.train.logit_adjustment > 0 and (shape.task != "classification" or dp_sgd):
        raise ConfigError("train.logit_adjustment: for classification without DP-SGD at the hospitals (the class "
                          "prior would be computed from the private labels outside the privacy ledger)")
    if cfg.strategy.finetune_eval and dp_sgd:
        raise ConfigError("strategy.finetune_eval: not available with DP-SGD (fine-tuning would train on private "
                          "data outside the privacy ledger)")
    if cfg.strategy.secure_aggregation is not None:
        try:
            build_secure_workflow(cfg.strategy.secure_aggregation, None)
        except ValueError as exc:
            raise ConfigError(f"strategy.secure_aggregation: {exc}") from None
    small = small_sites(cfg)
    progress = progress or Progress()
    if started is not None:
        progress.problem(started.line())
    for line in small[:10]:
        progress.problem(line)
    if len(small) > 10:
        progress.problem(f"... and {len(small) - 10} more sites with too little data (data_distribution.json lists each)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = cfg.server.output_dir / f"{stamp}-{cfg.name}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = cfg.server.output_dir / f"{stamp}-{cfg.name}-{suffix}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg, data_line(shape.data())))
    (run_dir / "data_distribution.json").write_text(json.dumps(distribution(cfg), indent=1) + "\n")
    if cfg.strategy.fedper:  # the server's head is never trained: a test score of it would mean nothing
        progress.problem(f"strategy.personalization.method {method}: each hospital keeps its own head, so there is no "
                         "global model to test on the server; the validation scores are the hospitals' personalized "
                         "models")
    return Plan(config=cfg, shape=shape, run_dir=run_dir.resolve(),
                test=None if cfg.strategy.fedper else global_test(cfg),
                progress=progress, private=cfg.private, sites=len(cfg.sites), site_names=list(cfg.sites), created=created)


def plan_from_run_config(run_config: dict) -> Plan:
    return prepare_run(config_from_run_config(run_config))


def backend_config(cfg: SimulationConfig) -> dict:
    if cfg.engine.ray_address:  # join a running cluster: it owns its resources and dashboard
        init_args: dict = {"address": cfg.engine.ray_address}
    else:
        # "local": always a fresh instance, never a cluster someone else left running on this machine
        init_args = {"address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False}
        if not cfg.engine.verbose:  # the actors' own log lines (e.g. Flower's "Manually terminating
            init_args["log_to_driver"] = False  # ClientAppActor" at shutdown); errors come back as replies
    return {
        "client_resources": {"num_cpus": cfg.engine.cpus_per_site, "num_gpus": cfg.engine.gpus_per_site},
        "init_args": init_args,
    }


class SimulationFailed(RuntimeError):
    """The engine under a simulation stopped before its rounds were done."""


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"


class _HideDeprecation(logging.Filter):
    """run_simulation is deprecated in favour of `flwr run`; we call it knowingly (in-process
    ServerApp: live display, no detached SuperLink), so its notice is noise to our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def check_ray_address(address: str | None) -> None:
    """Ray retries an unreachable cluster address for minutes; say so at once instead."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"engine.ray_address: no Ray cluster answers at {address!r} ({exc}); "
                          "start one with `ray start --head` or leave the field out") from None


def check_gpus(cfg: SimulationConfig) -> None:
    """A GPU share asked for on a machine without one: Ray would wait forever for the resource."""
    if cfg.engine.gpus_per_site > 0 and not cfg.engine.ray_address and not torch.cuda.is_available():
        raise ConfigError(f"engine.gpus_per_site: {cfg.engine.gpus_per_site:g} asks for a share of a GPU for each "
                          "simulated hospital, but this machine has no CUDA GPU that torch can use; leave it at 0")
    if not cfg.engine.ray_address:  # a cluster's workers may have other devices: they say so per task
        for name in cfg.sites:
            site_precision(cfg, name)


def engine(cfg: SimulationConfig, server_app, client_app) -> None:
    """Flower's Simulation Engine on the config's hospitals, with Flower's and Ray's own log lines
    down to warnings unless engine.verbose."""
    flwr_log = logging.getLogger("flwr")
    if not cfg.engine.verbose:
        flwr_log.setLevel(logging.WARNING)
        # Ray's notice about a future default (accelerator env vars) is not the user's to act on
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", category=FutureWarning)
    hide = _HideDeprecation()
    flwr_log.addFilter(hide)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(cfg.sites),
                       backend_config=backend_config(cfg), verbose_logging=cfg.engine.verbose)
    finally:
        flwr_log.removeFilter(hide)


def simulate(cfg: SimulationConfig, progress: Progress | None = None) -> Path:
    """Run the whole federation; return the run folder (metrics, models, report)."""
    check_ray_address(cfg.engine.ray_address)
    check_gpus(cfg)
    plan = prepare_run(cfg, progress)
    site_cfg, ledger_root = plan.config, plan.run_dir.parent

    def load_hospital(context, image_size):
        return hospital(site_cfg, int(context.node_config["partition-id"]), image_size, ledger_root)

    try:
        engine(cfg, build_server_app(lambda _ctx: plan), build_client_app(load_hospital))
    except RuntimeError as err:  # the engine died; Flower leaves the ServerApp thread waiting
        plan.stop.set()
        raise SimulationFailed(f"the simulation engine failed ({_root_cause(err)}); Flower's log above has "
                               f"the detail; partial results in {plan.run_dir}") from err
    if not (plan.run_dir / "summary.json").exists():
        raise SimulationFailed(f"the simulation ended before finishing its rounds; partial results in {plan.run_dir}")
    nothing_trained(plan.run_dir)
    return plan.run_dir


def nothing_trained(run_dir: Path) -> None:
    """SimulationFailed where no round took in an update (server.records.outputs.untrained says why)."""
    why = untrained(run_dir)
    if why:
        raise SimulationFailed(why)
