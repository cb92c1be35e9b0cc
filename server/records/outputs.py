"""The run folder: metrics.csv / metrics.jsonl rows, safetensors checkpoints, summary.json."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from flwr.app import ArrayRecord
from safetensors.torch import save_file

GLOBAL = "global"  # the site column of a round's federation-wide row; the global model in cross_site.json
COLUMNS = [
    "round", "site", "status", "epsilon", "train_loss", "val_loss", "val_accuracy", "val_auc", "ft_val_accuracy", "ft_val_auc",
    "val_dice", "ft_val_dice", "pers_val_accuracy", "pers_val_auc", "pers_val_dice", "test_loss", "test_accuracy",
    "test_auc", "test_dice", "test_dice_per_label", "test_auc_per_class",
    "test_accuracy_per_class", "num_train", "num_val", "bytes_to_site", "bytes_from_site",
]


def _clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value


class RunRecorder:
    """Appends each round's rows as soon as the round ends, so a crash loses nothing recorded.
    `keep_rounds`: a resumed run keeps the rows of rounds up to its checkpoint's and drops any
    later ones (a round the crash interrupted after its rows were written runs again)."""

    def __init__(self, run_dir: Path, keep_rounds: int | None = None) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = run_dir / "metrics.csv", run_dir / "metrics.jsonl"
        self.tracker = None  # server/records/tracking.py: set by `track` where server.tracking asks for one
        kept = [r for r in read_rows(run_dir) if int(r["round"]) <= keep_rounds] if keep_rounds is not None else []
        _replace(self.csv_path, lambda f: csv.writer(f).writerow(COLUMNS))
        _replace(self.jsonl_path, lambda f: None)
        if kept:  # rows a tracker of the run already holds: written before `track`
            self.write_rows(kept)

    def track(self, config) -> None:
        """Send every row from now on to the tracker `config.server.tracking` names, if any."""
        if config.server.tracking != "none":
            from server.records.tracking import Tracker

            self.tracker = Tracker(config.server.tracking, self.run_dir, config.model_dump(mode="json"),
                                   config.server.tracking_uri, config.name)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def write_rows(self, rows: list[dict]) -> None:
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writerows({k: ("" if _clean(row.get(k)) is None else row.get(k)) for k in COLUMNS} for row in rows)
        with self.jsonl_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({k: _clean(row.get(k)) for k in COLUMNS}) + "\n")
        if self.tracker is not None:
            self.tracker.rows([{k: _clean(row.get(k)) for k in COLUMNS} for row in rows])

    def save_model(self, arrays: ArrayRecord, name: str, **metadata) -> Path:
        path, tmp = self.run_dir / name, self.run_dir / f".{name}.tmp"
        state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        save_file(state, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)  # a crash leaves the previous round's file, never half a file
        return path

    def write_summary(self, summary: dict) -> None:
        _replace(self.run_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=2, default=str) + "\n"))


def _replace(path: Path, write) -> None:
    """Write a file through a temporary one renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def score_of(rows: list[dict]) -> tuple[str, str]:
    """(column suffix, name) of the rows' score: Dice for a segmentation run (its rows carry
    Dice where classification rows carry AUC), else AUC."""
    segmentation = any(r.get(k) is not None for r in rows for k in ("val_dice", "test_dice"))
    return ("dice", "Dice") if segmentation else ("auc", "AUC")


def read_rows(run_dir: Path) -> list[dict]:
    """The run's rows; a line cut short by a crash mid-write is left out."""
    rows = []
    with (run_dir / "metrics.jsonl").open() as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


IDLE = ("ok", "eval-only", "not-sampled")  # statuses that are not a hospital's failure


def untrained(run_dir: Path) -> str | None:
    """Why nothing was trained, where a finished run took in no update in any round (every
    hospital refused, failed or was rejected): the statuses counted from its rows; else None."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("trained_rounds", 1) or not summary.get("rounds"):
        return None
    from collections import Counter

    why = Counter(r["status"] for r in read_rows(run_dir) if r["site"] != "global" and r.get("status") not in IDLE)
    said = ", ".join(f"{n} x {status}" for status, n in why.most_common()) or "no usable updates"
    return (f"nothing was trained: no round took in an update from the hospitals ({said}); "
            f"no model was written; the rows are in {run_dir / 'metrics.csv'}")
