"""`aseanfl evaluate` on a simulated federation: every simulated hospital scores a model file on
its own held-out (validation) cases; only the figures of medimaging/scoring.py come back."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.serverapp import ServerApp

from client.training.app import build_client_app
from protocol.messages import EvaluationSpec
from server.engine.scoring import evaluate_federation
from server.evaluation.federated import ModelCard, check_against_task, check_model_file, evaluation_spec, read_card

from simulations.config import ConfigError, SimulationConfig, load_config
from simulations.federation import hospital, resolved, task_shape
from simulations.runner import SimulationFailed, check_gpus, engine


def card_of_run(config_yaml: Path) -> ModelCard:
    """The model card of a model in a run folder: its config.yaml's model and task."""
    if not config_yaml.is_file():
        raise ConfigError(f"{config_yaml.parent}: no config.yaml beside the model file; give its model card "
                          "with --card card.yaml")
    run_cfg = load_config(config_yaml)
    shape = task_shape(run_cfg)
    return ModelCard(model=run_cfg.model, task=shape.task, in_channels=shape.in_channels, num_classes=shape.num_classes,
                     image_size=shape.image_size, spatial_dims=shape.spatial_dims, private=run_cfg.private)


def prepare(cfg: SimulationConfig, model: Path, card_path: Path | None, min_cases: int) -> tuple[EvaluationSpec, bytes]:
    """Every check before a hospital is asked: the card against the federation's task, the file
    against the card. (spec, the model file's bytes)."""
    card = read_card(card_path) if card_path else card_of_run(model.parent / "config.yaml")
    check_against_task(card, task_shape(cfg), str(card_path or model.parent / "config.yaml"))
    check_model_file(model, card, cfg)
    return evaluation_spec(card, model, min_cases, cfg.seed), model.read_bytes()


def evaluate(cfg: SimulationConfig, model: Path, card_path: Path | None = None, min_cases: int = 20,
             out: Path | None = None) -> Path:
    """Score `model` at every simulated hospital; the folder holding evaluation.json/.md."""
    cfg = resolved(cfg)
    check_gpus(cfg)
    spec, blob = prepare(cfg, model, card_path, min_cases)
    out_dir = out or cfg.server.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{spec.evaluation}"
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        evaluate_federation(grid, spec, blob, out_dir, {}, list(cfg.sites), cfg.server.round_timeout_s)

    ledger_root = cfg.server.output_dir

    def load_hospital(context, image_size):
        return hospital(cfg, int(context.node_config["partition-id"]), image_size, ledger_root)

    try:
        engine(cfg, app, build_client_app(load_hospital))
    except RuntimeError as err:
        raise SimulationFailed(f"the simulation engine failed ({err})") from err
    if not (out_dir / "evaluation.json").is_file():
        raise SimulationFailed(f"the evaluation ended before the hospitals' figures were written ({out_dir})")
    return out_dir
