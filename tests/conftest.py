import os
from pathlib import Path

import pytest
from consoles import chromium  # noqa: F401 - one browser per test session

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

ROOT = Path(__file__).resolve().parents[1]
MEDMNIST = Path(os.environ.get("ASEANFL_MEDMNIST", ROOT.parent / "shared" / "data" / "medmnist"))


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


def medmnist_file(name: str) -> Path:
    path = MEDMNIST / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"real MedMNIST data not found at {path} (see README: ../shared/data/medmnist)")
    return path


def simulate_plan(plan, before_load=None, mods=()) -> Path:
    """A real simulation of a prepared plan, for tests that need a misbehaving hospital:
    `before_load(partition index)` runs as a hospital starts a task (raise: it fails; sleep: it
    straggles), `mods` are client mods (e.g. one that poisons the update)."""
    from flwr.simulation import run_simulation

    from server.app import build_server_app
    from simulations.runner import backend_config

    run_simulation(server_app=build_server_app(lambda _ctx: plan), client_app=_client_app(plan, before_load, mods),
                   num_supernodes=len(plan.config.sites), backend_config=backend_config(plan.config))
    return plan.run_dir


def _client_app(plan, before_load, mods):
    """The simulated hospitals' ClientApp, as simulations.runner.simulate builds it, with the
    tests' hook and mods."""
    from client.training.app import build_client_app
    from simulations.federation import hospital

    def load_hospital(context, image_size):
        index = int(context.node_config["partition-id"])
        if before_load is not None:
            before_load(index)
        return hospital(plan.config, index, image_size, plan.run_dir.parent)

    return build_client_app(load_hospital, mods)


def run_plan_here(plan, before_load=None, mods=()) -> Path:
    """simulate_plan without Ray: the same ServerApp round loop, ClientApp, mods and report,
    with the hospitals answering in this process one after the other (tests/inprocess.py). Ray's
    start costs ~13 s a run on 2 cores; the tests that are about the engine (test_simulate,
    test_ray_cluster, SecAgg+, a straggler's timeout) keep it."""
    from inprocess import InProcessGrid

    from server.engine.rounds import run_federation
    from server.records.report import write_report
    from simulations.runner import nothing_trained

    grid = InProcessGrid(_client_app(plan, before_load, mods), len(plan.config.sites))
    if plan.site_names:  # as the engine registers them: node i is partition i (names.partition_names)
        plan.node_names = {**dict(zip(grid.get_node_ids(), plan.site_names, strict=True)), **plan.node_names}
    run_federation(grid, plan)
    write_report(plan.run_dir)
    nothing_trained(plan.run_dir)
    return plan.run_dir


def simulate_here(cfg, progress=None) -> Path:
    """simulations.runner.simulate without Ray (see run_plan_here)."""
    from simulations.runner import prepare_run

    return run_plan_here(prepare_run(cfg, progress))


def assert_own_models_kept(run_dir, rows: dict, kind: str, column: str = "pers_val_accuracy") -> None:
    """Each hospital in `rows` kept its own model on its disk (client/training/own_model.py): the
    plain network in the run's model card, scoring on its validation cases what its row reported."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from medimaging.training import evaluate
    from server.evaluation.federated import read_card
    from simulations.config import load_config
    from simulations.federation import hospital

    cfg, names = load_config(run_dir / "config.yaml", {}), sorted(rows)
    assert sorted(p.name for p in (run_dir / "personal").iterdir()) == names
    for name in names:
        folder = run_dir / "personal" / name
        card, scores = read_card(folder / "card.yaml"), json.loads((folder / "scores.json").read_text())
        assert scores["kind"] == kind and scores["round"] == int(rows[name]["round"]), scores
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert f.metadata()["kind"] == kind
        model = card.build(cfg)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))  # every tensor, nothing else
        val = hospital(cfg, cfg.sites.index(name), card.image_size, run_dir.parent).data.val
        accuracy = evaluate(model, val, card.num_classes)["accuracy"]
        assert accuracy == pytest.approx(float(rows[name][column]), abs=1e-6) == scores["accuracy"], (name, scores)
