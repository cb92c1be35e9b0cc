"""Cross-site evaluation after a federated run (`server.cross_site: true`; NVFlare's cross-site
validation): the final global model and each hospital's own model, as it came back in the final
round (the round-before global model trained on that hospital's data), are each scored at every
hospital on its own cases, as `aseanfl evaluate` scores a file (server/evaluation/federated.py), with the
same small-cell rule. The matrix (model x hospital) is written to the run folder as
cross_site.json / cross_site.csv, and drawn as a heatmap in the report.

Nothing new leaves a hospital: its model had left it as that round's update, and the scores are
the fixed schema of medimaging/scoring.py. Where the server never sees one hospital's model
(SecAgg+), or sees it clipped and noised only in aggregate (central DP), or without its
normalisation layers (FedBN), the configuration refuses cross_site (server/engine/config.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from server.engine.scoring import evaluate_federation
from server.records.outputs import GLOBAL



def model_bytes(arrays: ArrayRecord) -> bytes:
    """A model's arrays as a safetensors file (the same arrays give the same bytes)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(a.numpy()) for k, a in sorted(arrays.items())})


def _figure(site: dict) -> float | None:
    if "error" in site:
        return None
    if site["task"] == "segmentation":
        dice = [d["value"] for d in site["dice"] if d.get("value") is not None]
        return float(np.mean(dice)) if dice else None
    return site["auc"].get("value")


def cross_site(grid, plan, arrays: ArrayRecord, local_models: dict[str, ArrayRecord], known: dict[int, str]) -> dict:
    """Score the global model and every hospital's final-round model at every hospital; the
    matrix {model: {hospital: figure or None}} with each cell's released figures."""
    from protocol.messages import EvaluationSpec

    cfg, shape = plan.config, plan.shape
    out_dir = plan.run_dir / "cross_site"
    models = {GLOBAL: arrays, **dict(sorted(local_models.items()))}
    matrix, cells = {}, {}
    for name, record in models.items():
        blob = model_bytes(record)
        digest = hashlib.sha256(blob).hexdigest()
        spec = EvaluationSpec(evaluation=f"{plan.run_dir.name}-cross-{name}", model_sha256=digest, model=cfg.model,
                              in_channels=shape.in_channels, num_classes=shape.num_classes, image_size=shape.image_size,
                              task=shape.task, spatial_dims=shape.spatial_dims, private=plan.private,
                              min_cases=cfg.server.cross_site_min_cases, split="validation", seed=cfg.seed,
                              classes=plan.classes)
        result = evaluate_federation(grid, spec, blob, out_dir / name, known, plan.site_names, cfg.server.round_timeout_s)
        matrix[name] = {site: _figure(s) for site, s in result["sites"].items()}
        cells[name] = {"model_sha256": digest, "sites": result["sites"], "pooled": result["pooled"]}
    metric = "dice" if shape.task == "segmentation" else "auc"
    out = {"metric": metric, "rows": list(models), "sites": sorted({s for m in matrix.values() for s in m}),
           "matrix": matrix, "models": cells,
           "note": "rows: the model (global, or the hospital whose final-round model it is); columns: the hospital "
                   "whose cases scored it; empty: withheld (small-cell rule) or no reply"}
    _write(plan.run_dir, out)
    return out


def after_run(run, summary: dict) -> None:
    """After the last round (server/engine/rounds.py): the global model and each hospital's own,
    scored at every hospital; its time in summary["cross_site_seconds"]."""
    rounds = run.plan.config.server.rounds
    run.progress.round_started(rounds, rounds, "cross-site evaluation")
    started = time.time()
    cross_site(run.raw_grid, run.plan, run.arrays, run.local_models, run.known)
    summary["cross_site_seconds"] = round(time.time() - started, 2)


def _write(run_dir: Path, out: dict) -> None:
    tmp = run_dir / ".cross_site.json.tmp"
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, run_dir / "cross_site.json")
    tmp = run_dir / ".cross_site.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", *out["sites"]])
        for name in out["rows"]:
            w.writerow([name, *("" if out["matrix"][name].get(s) is None else f"{out['matrix'][name][s]:.6f}"
                                for s in out["sites"])])
    os.replace(tmp, run_dir / "cross_site.csv")
