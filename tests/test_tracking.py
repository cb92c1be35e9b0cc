"""Experiment tracking (server.tracking): a real simulation writes to MLflow (its local SQLite
store) and another to TensorBoard (event files in the run folder); every number of metrics.csv,
per site and global, is there at its round, and nothing else is made up."""

import csv
import logging
import subprocess
import sys

import pytest

from medimaging.yamlconfig import ConfigError, read_config
from simulations.config import SimulationConfig

COLUMNS = ("val_auc", "val_loss", "train_loss", "test_auc", "bytes_from_site", "num_train")


def _simulate(out, kind):
    res = subprocess.run([sys.executable, "-m", "aseanfl", "simulate", "--sites", "3", "--rounds", "2", "--seed", "7",
                          "--set", f"server.tracking={kind}", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Warning" not in res.stderr and "INFO" not in res.stdout + res.stderr, res.stderr[-2000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    expected = {(f"{c}/{r['site']}", int(r["round"])): float(r[c]) for r in rows for c in COLUMNS if r.get(c)}
    assert len({k for k, _ in expected}) >= 10 and any(k.endswith("/global") for k, _ in expected), expected
    return run_dir, expected


def test_mlflow_holds_every_value_of_metrics_csv(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, expected = _simulate(tmp_path / "out", "mlflow")
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aseanfl")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedavg" and run.data.params["server.rounds"] == "2"
    got = {}
    for key in {k for k, _ in expected}:
        for m in client.get_metric_history(run.info.run_id, key):
            got[(key, m.step)] = m.value
    assert got == pytest.approx(expected)


def test_tensorboard_holds_every_value_of_metrics_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, expected = _simulate(tmp_path / "out", "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert {k: v for k, v in got.items() if k[0].split("/")[0] in COLUMNS} == pytest.approx(expected)


def test_tracking_needs_its_package_and_never_stops_a_run(tmp_path, monkeypatch, caplog):
    import importlib.util

    from server.records.tracking import Tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"server.tracking: .*mlflow is not installed: pip install 'aseanfl\[tracking\]'"):
        read_config(None, {"server.tracking": "mlflow"}, SimulationConfig)
    monkeypatch.undo()
    # a store that cannot be written: one warning, and the recorder goes on without it
    (tmp_path / "run-1").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="aseanfl"):
        tracker = Tracker("mlflow", tmp_path / "run-1", {"a": 1}, uri=f"sqlite:///{tmp_path}/a-file/x.db")
        tracker.rows([{"round": 1, "site": "global", "val_auc": 0.7}])
        tracker.close()
    said = [r.getMessage() for r in caplog.records if "experiment tracking" in r.getMessage()]
    assert len(said) == 1 and "is off for this run" in said[0], said
