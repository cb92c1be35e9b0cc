"""The run folder: metrics.csv / metrics.jsonl rows, safetensors checkpoints, summary.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from flwr.app import ArrayRecord
from safetensors.torch import save_file

COLUMNS = [
    "round", "site", "status", "epsilon", "train_loss", "val_loss", "val_accuracy", "val_auc", "ft_val_accuracy", "ft_val_auc",
    "val_dice", "ft_val_dice", "test_loss", "test_accuracy", "test_auc", "test_dice", "test_dice_per_label", "test_auc_per_class",
    "test_accuracy_per_class", "num_train", "num_val", "bytes_to_site", "bytes_from_site",
]


def _clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value


class RunRecorder:
    """Appends each round's rows as soon as the round ends, so a crash loses nothing recorded."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = run_dir / "metrics.csv", run_dir / "metrics.jsonl"
        for path in (self.csv_path, self.jsonl_path):
            path.unlink(missing_ok=True)
        with self.csv_path.open("w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)

    def write_rows(self, rows: list[dict]) -> None:
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writerows({k: ("" if _clean(row.get(k)) is None else row.get(k)) for k in COLUMNS} for row in rows)
        with self.jsonl_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({k: _clean(row.get(k)) for k in COLUMNS}) + "\n")

    def save_model(self, arrays: ArrayRecord, name: str, **metadata) -> Path:
        path = self.run_dir / name
        state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        save_file(state, str(path), metadata={k: str(v) for k, v in metadata.items()})
        return path

    def write_summary(self, summary: dict) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def score_of(rows: list[dict]) -> tuple[str, str]:
    """(column suffix, name) of the rows' score: Dice for a segmentation run (its rows carry
    Dice where classification rows carry AUC), else AUC."""
    segmentation = any(r.get(k) is not None for r in rows for k in ("val_dice", "test_dice"))
    return ("dice", "Dice") if segmentation else ("auc", "AUC")


def read_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
