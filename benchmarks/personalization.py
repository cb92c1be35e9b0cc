"""Hospitals that differ: per hospital, validation AUC of its local-only model, of the global
FedAvg, SCAFFOLD and FedMedian models (FedAvg and FedMedian also with logit adjustment), and of
its personalized models (FedPer and FedRep: shared body, its own head; Ditto, over FedAvg, FedProx or
FedMedian, and APFL: its own whole model beside the global one), on pneumoniamnist
Dirichlet(0.3) at 5 hospitals, 10 rounds x 1 local epoch (or --local-epochs), several seeds; and the global models'
test AUC (at the round with the best federated validation AUC, and at the last) beside the same
model trained centrally on the pooled images; each global model also with its head refit after the
last round from the hospitals' feature sums (strategy.calibrate_head, medimaging/calibration.py),
validated at the hospitals beside each hospital's own head fit from the same sums
(strategy.personal_heads).
SCAFFOLD needs SGD (lr 0.01, momentum 0.9; at 0.05
it diverged on the single-class hospitals); the others train with the default Adam (lr 0.001).
Each hospital validates on its share of the npz's own val split; the average over hospitals
leaves out a hospital whose validation images are all of one class (no AUC).

    python -m benchmarks.personalization [--seeds 42,1,2] [--rounds 10] [--alpha 0.3] [--model cnn]
        [--local-epochs 2] [--ditto-lambda 1.0] [--ditto-epochs 2] [--prox-mu 10] [--tau 1.0] [--set train.augment.flip=true] [--only local,fedavg,ditto]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile

from benchmarks.common import PNEUMONIA, centralized, centralized_selected, fresh_model, selected, sites
from medimaging.training import evaluate, train_epochs
from server.records.outputs import read_rows
from simulations.config import load_config, parse_sets
from simulations.federation import global_test, task_shape
from simulations.runner import simulate


def _final_site_auc(run_dir, column: str = "val_auc") -> dict[str, float]:
    rows = read_rows(run_dir)
    last = max(r["round"] for r in rows)
    return {r["site"]: r[column] for r in rows if r["round"] == last and r["site"] != "global"
            and r.get(column) is not None}


def _local_only(cfg, epochs: int) -> tuple[dict[str, float], dict[str, str]]:
    """Each hospital alone: the same start model trained on its own images for as many epochs;
    (its validation AUC, "its training images per class: its model's test AUC")."""
    out, alone, classes, tr, test = {}, {}, task_shape(cfg).num_classes, cfg.train, global_test(cfg)
    for name, site in zip(cfg.sites, sites(cfg), strict=True):
        model = fresh_model(cfg)
        for epoch in range(epochs):
            train_epochs(model, site.train, 1, tr.batch_size, tr.lr * tr.lr_factor(epoch, epochs), tr.optimizer,
                         cfg.seed + epoch, augment=tr.augment)
        out[name] = evaluate(model, site.val, classes)["auc"]
        counts = "/".join(str(int((site.train.y == c).sum())) for c in range(classes))
        alone[name] = f"{counts}: {evaluate(model, test, classes)['auc']:.4f}"
    return out, alone


def _mean(aucs: dict[str, float]) -> float:
    defined = [v for v in aucs.values() if v is not None and not math.isnan(v)]
    return statistics.mean(defined) if defined else math.nan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(PNEUMONIA))
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--local-epochs", type=int, default=1, help="each round's local epochs (aseanfl's default: 2); "
                                                                 "local-only and centralized train rounds x this")
    ap.add_argument("--ditto-lambda", type=float, default=1.0)
    ap.add_argument("--ditto-epochs", type=int, default=None, help="the personal model's epochs a round (default: 1)")
    ap.add_argument("--prox-mu", type=float, default=10.0, help="FedProx's mu under Ditto over FedProx (a pull of "
                                                                   "lr x mu per step)")
    ap.add_argument("--tau", type=float, default=1.0, help="train.logit_adjustment of the logit-adjusted FedAvg")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every run and the "
                                                                           "centralized model, e.g. train.augment.flip=true")
    ap.add_argument("--only", default="", help="settings whose names start with these words, e.g. local,fedavg,ditto")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = {"local only": None, "FedAvg (global)": {},
                "SCAFFOLD (global)": {"strategy.name": "scaffold", "train.optimizer": "sgd", "train.lr": 0.01},
                "FedMedian (global)": {"strategy.name": "fedmedian"},
                "FedAvg + logit adjustment (global)": {"train.logit_adjustment": args.tau},
                "FedMedian + logit adjustment (global)": {"strategy.name": "fedmedian",
                                                          "train.logit_adjustment": args.tau},
                "FedPer (personalized)": {"strategy.personalization.method": "fedper"},
                "FedRep (personalized)": {"strategy.personalization.method": "fedrep"},
                "Ditto (personalized)": {"strategy.personalization.method": "ditto",
                                         "strategy.personalization.ditto_lambda": args.ditto_lambda,
                                         "strategy.personalization.ditto_epochs": args.ditto_epochs},
                "Ditto over FedProx (personalized)": {"strategy.name": "fedprox", "strategy.proximal_mu": args.prox_mu,
                                                      "strategy.personalization.method": "ditto",
                                                      "strategy.personalization.ditto_lambda": args.ditto_lambda,
                                                      "strategy.personalization.ditto_epochs": args.ditto_epochs},
                "Ditto over FedMedian (personalized)": {"strategy.name": "fedmedian",
                                                        "strategy.personalization.method": "ditto",
                                                        "strategy.personalization.ditto_lambda": args.ditto_lambda,
                                                        "strategy.personalization.ditto_epochs": args.ditto_epochs},
                "APFL (personalized)": {"strategy.personalization.method": "apfl"},
                "FedAvg + fine-tuning (personalized)": {"strategy.finetune_eval": True}}
    if args.only:
        settings = {k: v for k, v in settings.items() if k.split()[0].lower() in args.only.lower().split(",")}
    globals_ = [k for k in settings if k.endswith("(global)")]
    for label in globals_:  # the same run also refits its final model's head, and each hospital's own
        settings[label] = {**settings[label], "strategy.calibrate_head": True, "strategy.personal_heads": True}
    calibrated = [f"{k[:-len(' (global)')]}, head calibrated (global)" for k in globals_]
    own_heads = [f"{k[:-len(' (global)')]}, personal heads (personalized)" for k in globals_]
    means: dict[str, list[float]] = {k: [] for k in [*settings, *calibrated, *own_heads]}
    tests: dict[str, list[tuple[float, float]]] = {k: [] for k in ["centralized"] * ("local only" in settings) + globals_
                                                    + calibrated}
    for seed in seeds:
        base = {"data.path": args.data, "sites": 5, "partition.scheme": "dirichlet", "partition.alpha": args.alpha,
                "server.rounds": args.rounds, "train.local_epochs": args.local_epochs, "seed": seed, "model.name": args.model,
                **parse_sets(args.sets)}
        per_site = {}
        for label, sets in settings.items():
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config(None, {**base, **(sets or {}), "server.output_dir": out})
                if sets is None:
                    epochs = args.rounds * cfg.train.local_epochs  # as many epochs as the federation's
                    per_site[label], alone = _local_only(cfg, epochs)
                    # a hospital that holds one class teaches the shared model little: which do, and how well alone
                    print(f"seed {seed}, each hospital's training images per class and its own model's test AUC: "
                          + "; ".join(f"{k} {v}" for k, v in alone.items()), flush=True)
                    best, _, _, _ = centralized_selected(cfg, epochs)  # the epoch with the best validation AUC
                    tests["centralized"].append((best, centralized(cfg, epochs)[0]["auc"]))
                else:
                    run_dir = simulate(cfg)
                    column = ("pers_val_auc" if label[:4] in ("Ditt", "APFL") else
                              "ft_val_auc" if "fine-tuning" in label else "val_auc")
                    per_site[label] = _final_site_auc(run_dir, column)
                    if label in tests:  # (at the round with the best federated validation AUC, at the last)
                        tests[label].append(selected(run_dir)[:2])
                        cal = json.loads((run_dir / "summary.json").read_text())["calibration"]
                        i = globals_.index(label)
                        tests[calibrated[i]].append((math.nan, cal["test"]["calibrated"]))  # after the last round only
                        at = cal["calibrated"]["sites"]  # the refit model and each hospital's own head, validated
                        per_site[calibrated[i]] = {k: v["val_auc"] for k, v in at.items()}
                        per_site[own_heads[i]] = {k: v["pers_val_auc"] for k, v in at.items()}
        for label in means:
            means[label].append(_mean(per_site[label]))
        print(f"seed {seed}: " + "; ".join(f"{k} {means[k][-1]:.4f}" for k in means), flush=True)
        print(f"seed {seed}, test AUC at the final round: " + "; ".join(f"{k} {v[-1][1]:.4f}" for k, v in tests.items()),
              flush=True)
        if seed == seeds[0]:
            print("| hospital | " + " | ".join(means) + " |\n|---|" + "---|" * len(means))
            for name in cfg.sites:
                cells = [per_site[k].get(name) for k in means]
                print(f"| {name} | " + " | ".join("-" if v is None or math.isnan(v) else f"{v:.3f}" for v in cells) + " |")
    print(f"\n{args.data.split('/')[-1]}: 5 hospitals, Dirichlet({args.alpha:g}), {args.rounds} rounds x {cfg.train.local_epochs} local epoch(s) "
          f"(local only: as many epochs), {args.model}; validation AUC averaged over hospitals, final round; "
          f"seeds {seeds}, mean ± sd")
    print("| setting | mean validation AUC over hospitals |\n|---|---|")
    for label, values in means.items():
        print(f"| {label} | {statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f} |")
    print("\n| model | test AUC, best-validation round | test AUC, final round | centralized - this, final round |"
          "\n|---|---|---|---|")
    central = statistics.mean(p[1] for p in tests["centralized"]) if "centralized" in tests else math.nan
    for label, pairs in tests.items():
        cells = [[p[i] for p in pairs] for i in (0, 1)]
        gap = "" if label == "centralized" else f"{central - statistics.mean(cells[1]):+.4f}"
        print(f"| {label} | " + " | ".join("-" if math.isnan(v[0]) else f"{statistics.mean(v):.4f} ± "
                                          f"{statistics.stdev(v) if len(v) > 1 else 0:.4f}" for v in cells) + f" | {gap} |")
    print("(centralized: as many epochs; best-validation: a fresh optimiser each epoch, as each round's, the epoch "
          "with the best pooled validation AUC; final: one run of all epochs)")


if __name__ == "__main__":
    main()
