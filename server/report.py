"""report.md with PNG plots, made from a run folder's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .digest import MANY, digest  # noqa: E402
from .outputs import read_rows, score_of as _score  # noqa: E402

LINES = 12  # sites drawn one line each; beyond, the plots show the spread across sites


def _series(rows: list[dict], site: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r["site"] == site and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_global(rows: list[dict], path: Path) -> None:
    key, name = _score(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in ((f"test_{key}", f"global test {name} (server)"), (f"val_{key}", f"federated validation {name}")):
        x, y = _series(rows, "global", col)
        if x:
            ax.plot(x, y, marker="o", label=label)
    if key == "auc":
        ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    ax.set(xlabel="round", ylabel=name, title=f"Global model {name} per round", ylim=(0.4 if key == "auc" else 0.0, 1.0))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(ax, rows: list[dict], key: str, label: str) -> bool:
    """Median, interquartile and 10th-90th percentile bands of `key` across sites, per round."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        v = r.get(key)
        if r["site"] != "global" and v is not None and v == v:
            by_round.setdefault(r["round"], []).append(float(v))
    if not by_round:
        return False
    x = sorted(by_round)
    q = {p: [float(np.percentile(by_round[k], p)) for k in x] for p in (10, 25, 50, 75, 90)}
    ax.fill_between(x, q[10], q[90], alpha=0.15, color="C0", label="10th-90th percentile")
    ax.fill_between(x, q[25], q[75], alpha=0.35, color="C0", label="interquartile range")
    ax.plot(x, q[50], marker=".", color="C0", label=f"median {label}")
    counts = [len(by_round[k]) for k in x]
    ax.set_title(ax.get_title() + f"\n{min(counts)}-{max(counts)} sites per round" if min(counts) != max(counts)
                 else ax.get_title() + f"\n{counts[0]} sites per round")
    return True


def _by_site(rows: list[dict], key: str, ax, **plot) -> bool:
    """One line per site, or the spread across sites past LINES sites."""
    sites = sorted({r["site"] for r in rows} - {"global"})
    if len(sites) > LINES:
        return _spread(ax, rows, key, plot.pop("what", key))
    plot.pop("what", None)
    drawn = False
    for site in sites:
        x, y = _series(rows, site, key)
        if x:
            ax.plot(x, y, marker=".", label=site, **plot)
            drawn = True
    return drawn


def _plot_sites(rows: list[dict], path: Path) -> None:
    key, name = _score(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set(xlabel="round", ylabel=f"validation {name}", title=f"Per-site validation {name} (global model)",
           ylim=(0.4 if key == "auc" else 0.0, 1.0))
    _by_site(rows, f"val_{key}", ax, what=name)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_epsilon(rows: list[dict], path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set(xlabel="round", ylabel="epsilon spent (ledger)", title="Privacy spent per site")
    drawn = _by_site(rows, "epsilon", ax, what="epsilon")
    if drawn:
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _plot_distribution(dist: dict, path: Path) -> None:
    """Images per site and class, stacked; past 30 sites the bars are sorted by size, unnamed."""
    sites = list(dist)
    num_classes = len(next(iter(dist.values()))["train"])
    many = len(sites) > 30
    if many:
        sites.sort(key=lambda s: sum(dist[s]["train"]) + sum(dist[s]["val"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0] * len(sites)
    x = list(range(len(sites))) if many else sites
    for c in range(num_classes):
        counts = [dist[s]["train"][c] + dist[s]["val"][c] for s in sites]
        ax.bar(x, counts, bottom=bottom, label=f"class {c}", width=1.0 if many else 0.8)
        bottom = [b + n for b, n in zip(bottom, counts)]
    ax.set(ylabel="images", title="Data per site and class")
    if many:
        ax.set(xlabel=f"{len(sites)} sites, sorted by their number of images", xticks=[])
    else:
        ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _values(cell) -> list[float]:
    """A per-class cell as numbers: the rows keep it as 'a;b;c' (or a list)."""
    return [float(v) for v in (cell.split(";") if isinstance(cell, str) else cell)]


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _rounds(rows: list[dict], key: str) -> list[str]:
    """Per round: the hospitals asked, what became of them, the global scores (sampled runs)."""
    rounds = sorted({r["round"] for r in rows if r["round"]})
    if not any(r.get("status") in ("not-sampled", "eval-only") for r in rows):
        return []
    out = ["", "## Rounds", "", "Hospitals are sampled each round (`strategy.fraction_train` / `fraction_evaluate`, "
           "seeded): `not-sampled` ones were asked for nothing, `eval-only` ones only to validate.", "",
           f"| round | statuses | val_{key} | test_{key} | bytes_from_site |", "|---|---|---|---|---|"]
    for rnd in rounds:
        this = [r for r in rows if r["round"] == rnd]
        glob = next((r for r in this if r["site"] == "global"), {})
        out.append(f"| {rnd} | {digest(this).counts()} | {_fmt(glob.get(f'val_{key}'))} | "
                   f"{_fmt(glob.get(f'test_{key}'))} | {_fmt(glob.get('bytes_from_site'))} |")
    return out


def write_report(run_dir: Path) -> Path:
    rows = read_rows(run_dir)
    _plot_global(rows, run_dir / "global_auc.png")
    _plot_sites(rows, run_dir / "site_auc.png")
    lines = [f"# Federated run `{run_dir.name}`", ""]
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        lines += [f"Rounds: {s['rounds']}; best round by federated validation {_score(rows)[1]}: {s['best_round']}; "
                  f"wall time {s['seconds']} s.", ""]
        if s.get("trained_rounds", 1) == 0 and s["rounds"]:
            lines += ["**Nothing was trained**: no round took in an update from the hospitals (see each site's "
                      "status below); no model was written.", ""]
    last = max(r["round"] for r in rows)
    key = _score(rows)[0]
    cols = ["site", "status", "epsilon", "num_train", "num_val", "train_loss", f"val_{key}", "val_accuracy", f"test_{key}",
            "test_accuracy", "bytes_from_site"]
    if any(r.get(f"ft_val_{key}") is not None for r in rows):  # fine-tuning evaluation was on
        cols[cols.index("val_accuracy") + 1:cols.index("val_accuracy") + 1] = [f"ft_val_{key}", "ft_val_accuracy"]
    per_class = ["test_dice_per_label"] if key == "dice" else ["test_auc_per_class", "test_accuracy_per_class"]
    if key == "dice":
        cols.remove("test_accuracy")
    pairs = [_values(r["test_auc_per_class"]) for r in rows if r.get("test_auc_per_class")]
    binary = bool(pairs) and all(len(p) == 2 and abs(p[0] - p[1]) < 1e-3 for p in pairs)
    if binary:  # with two classes each one-vs-rest AUC is the test AUC itself
        per_class.remove("test_auc_per_class")
    cols[cols.index(f"test_{key}") + 1:cols.index(f"test_{key}") + 1] = per_class
    final = [r for r in rows if r["round"] == last]
    lines += [f"## Final round ({last})", ""]
    if len(final) - 1 > MANY:
        d = digest(final)
        lines += [f"{d.sites} sites: {d.counts()}; {d.spread()}. Below: the sites that failed, the {len(d.worst)} "
                  "worst and best by validation score, and the federation; `metrics.csv` has every site's row.", ""]
        final = d.shown() + [r for r in final if r["site"] == "global"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in final]
    lines += _rounds(rows, key)
    name = _score(rows)[1]
    lines += ["", "## Global model", "", f"![global {name}](global_auc.png)", "",
              "## Per site", "", f"![per-site {name}](site_auc.png)", ""]
    if _plot_epsilon(rows, run_dir / "epsilon.png"):
        lines += ["## Privacy", "", "Epsilon each hospital has spent, from its privacy ledger "
                  "(DP-SGD, Opacus accountant).", "", "![epsilon per round](epsilon.png)", ""]
    dist_path = run_dir / "data_distribution.json"
    if dist_path.exists():
        _plot_distribution(json.loads(dist_path.read_text()), run_dir / "data_distribution.png")
        lines += ["## Data per site", "", "![data distribution](data_distribution.png)", ""]
    from .cross_site import plot as plot_cross_site

    if plot_cross_site(run_dir, run_dir / "cross_site.png"):
        lines += ["## Cross-site evaluation", "", "The final global model and each hospital's final-round model, "
                  "each scored at every hospital on its own validation cases (only the figures left the hospitals; "
                  "withheld: fewer than min_cases positives or negatives). `cross_site.csv` has the matrix, "
                  "`cross_site.json` every released figure with its 95 % interval.", "",
                  "![cross-site matrix](cross_site.png)", ""]
    trained = (run_dir / "model.safetensors").exists()
    lines += ["Files: `config.yaml` (resolved), `metrics.csv`/`metrics.jsonl` (one row per round x site and "
              "per round `global`)" + (", `model.safetensors` (final), `model_best.safetensors`." if trained else "."), ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
