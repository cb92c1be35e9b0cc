"""Optional experiment tracking: every row the round recorder writes to metrics.csv also goes to
TensorBoard or MLflow (`server.tracking`), the same values, per site and global, one step per
round. TensorBoard writes event files into the run folder (`tensorboard/`); MLflow writes to
`server.tracking_uri`, by default a local SQLite store beside the run folders
(`<output_dir>/mlflow.db`: no server needed; MLflow 3 no longer writes its old file store).
Both are optional dependencies (`pip install 'aseanfl[tracking]'`). A tracker that fails while
a run goes on (a full disk, a locked store) is said once and switched off: the run and its
metrics.csv go on."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

log = logging.getLogger("aseanfl")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
SKIP = {"round", "site", "status"}


def missing(kind: str) -> str | None:
    """Why `kind` cannot track here (its package is not installed), or None."""
    package = PACKAGES.get(kind)
    try:
        if package is None or importlib.util.find_spec(package) is not None:
            return None
    except (ImportError, ValueError):  # a package shadowed or half-installed counts as missing
        pass
    return f"{kind} is not installed: pip install 'aseanfl[tracking]' (or pip install {package if kind != 'mlflow' else 'mlflow-skinny'})"


def _values(row: dict) -> dict[str, float]:
    """(column/site) -> value, for each number in the row (the per-class lists stay in metrics.csv)."""
    site, out = row.get("site", "global"), {}
    for key, value in row.items():
        if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            continue
        out[f"{key}/{site}"] = float(value)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def rows(self, rows: list[dict]) -> None:
        for row in rows:
            for tag, value in _values(row).items():
                self.writer.add_scalar(tag, value, int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, params: dict, uri: str | None, experiment: str):
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # set once imported: importing mlflow sets its own level
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(uri or f"sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}")
        found = self.client.get_experiment_by_name(experiment)
        exp = found.experiment_id if found else self.client.create_experiment(experiment)
        again = self.client.search_runs([exp], f"tags.`aseanfl.run` = '{run_dir.name}'", max_results=1)
        if again:  # a resumed run goes on in the same MLflow run
            self.run = again[0].info.run_id
            self.client.update_run(self.run, status="RUNNING")
        else:
            self.run = self.client.create_run(exp, run_name=run_dir.name, tags={"aseanfl.run": run_dir.name}).info.run_id
            self.client.log_batch(self.run, params=[_param(k, v) for k, v in params.items()])

    def rows(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, int(row["round"])) for row in rows for tag, value in _values(row).items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run)


def _param(key: str, value):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def _quiet(call):
    """MLflow's and SQLAlchemy's own notices (schema upgrades, deprecations) stay out of the run's output."""
    import warnings

    def run(*args, **kwargs):
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call(*args, **kwargs)

    return run


class Tracker:
    """What the recorder calls; it never lets a tracker's failure reach the run."""

    def __init__(self, kind: str, run_dir: Path, config: dict, uri: str | None = None, experiment: str = "aseanfl"):
        self.kind, self.impl = kind, None
        try:
            from medimaging.yamlconfig import flat_overrides

            params = flat_overrides(config)
            self.impl = _TensorBoard(run_dir, params) if kind == "tensorboard" else \
                _quiet(_MLflow)(run_dir, params, uri, experiment)
        except Exception as exc:  # noqa: BLE001 - tracking is optional; the run goes on without it
            self._off(exc)

    def _off(self, exc: Exception) -> None:
        log.warning("experiment tracking (%s) is off for this run: %s: %s", self.kind, exc.__class__.__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        self.impl = None

    def rows(self, rows: list[dict]) -> None:
        if self.impl is not None:
            try:
                _quiet(self.impl.rows)(rows)
            except Exception as exc:  # noqa: BLE001
                self._off(exc)

    def close(self) -> None:
        if self.impl is not None:
            try:
                _quiet(self.impl.close)()
            except Exception as exc:  # noqa: BLE001
                self._off(exc)
