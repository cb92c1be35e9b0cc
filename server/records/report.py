"""report.md with PNG plots, made from a run folder's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.fonts import labels_for  # noqa: E402
from common.i18n import _  # noqa: E402

from server.records.digest import MANY, digest  # noqa: E402
from server.records.outputs import GLOBAL, read_rows, score_of as _score  # noqa: E402

LINES = 12  # sites drawn one line each; beyond, the plots show the spread across sites


def _series(rows: list[dict], site: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r["site"] == site and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_global(rows: list[dict], path: Path) -> None:
    key, name = _score(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in ((f"test_{key}", _("global test {name} (server)", name=name)),
                       (f"val_{key}", _("federated validation {name}", name=name))):
        x, y = _series(rows, "global", col)
        if x:
            ax.plot(x, y, marker="o", label=label)
    if key == "auc":
        ax.axhline(0.5, color="grey", ls=":", lw=1, label=_("chance"))
    ax.set(xlabel=_("round"), ylabel=name, title=_("Global model {name} per round", name=name),
           ylim=(0.4 if key == "auc" else 0.0, 1.0))
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
    ax.fill_between(x, q[10], q[90], alpha=0.15, color="C0", label=_("10th-90th percentile"))
    ax.fill_between(x, q[25], q[75], alpha=0.35, color="C0", label=_("interquartile range"))
    ax.plot(x, q[50], marker=".", color="C0", label=_("median {what}", what=label))
    counts = [len(by_round[k]) for k in x]
    ax.set_title(ax.get_title() + "\n" + (_("{low}-{high} sites per round", low=min(counts), high=max(counts))
                                          if min(counts) != max(counts) else _("{count} sites per round", count=counts[0])))
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
    ax.set(xlabel=_("round"), ylabel=_("validation {name}", name=name),
           title=_("Per-site validation {name} (global model)", name=name), ylim=(0.4 if key == "auc" else 0.0, 1.0))
    _by_site(rows, f"val_{key}", ax, what=name)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_epsilon(rows: list[dict], path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set(xlabel=_("round"), ylabel=_("epsilon spent (ledger)"), title=_("Privacy spent per site"))
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
        ax.bar(x, counts, bottom=bottom, label=_("class {index}", index=c), width=1.0 if many else 0.8)
        bottom = [b + n for b, n in zip(bottom, counts)]
    ax.set(ylabel=_("images"), title=_("Data per site and class"))
    if many:
        ax.set(xlabel=_("{count} sites, sorted by their number of images", count=len(sites)), xticks=[])
    else:
        ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cross_site(run_dir: Path, path: Path) -> bool:
    """The heatmap of cross_site.json (False when the run has none)."""
    source = run_dir / "cross_site.json"
    if not source.is_file():
        return False
    data = json.loads(source.read_text())
    rows, sites = data["rows"], data["sites"]
    values = np.array([[np.nan if data["matrix"][r].get(s) is None else data["matrix"][r][s] for s in sites]
                       for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(sites), 1.0 + 0.5 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.5 if data["metric"] == "auc" else 0.0, vmax=1.0,
                      aspect="auto")
    ax.set_xticks(range(len(sites)), sites, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [_("global model") if r == GLOBAL else _("{name} model", name=r) for r in rows])
    ax.set_xlabel(_("scored on the cases of"))
    for i in range(len(rows)):
        for j in range(len(sites)):
            ax.text(j, i, _("withheld") if np.isnan(values[i, j]) else f"{values[i, j]:.2f}", ha="center", va="center",
                    color="white" if np.isnan(values[i, j]) or values[i, j] < 0.8 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, label=data["metric"].upper() if data["metric"] == "auc" else "Dice")
    ax.set_title(_("Cross-site {metric}", metric=data["metric"].upper() if data["metric"] == "auc" else "Dice"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    out = ["", "## " + _("Rounds"), "", _("Hospitals are sampled each round (`strategy.fraction_train` / "
                                          "`fraction_evaluate`, seeded): `not-sampled` ones were asked for nothing, "
                                          "`eval-only` ones only to validate."), "",
           f"| round | statuses | val_{key} | test_{key} | bytes_from_site |", "|---|---|---|---|---|"]
    for rnd in rounds:
        this = [r for r in rows if r["round"] == rnd]
        glob = next((r for r in this if r["site"] == "global"), {})
        out.append(f"| {rnd} | {digest(this).counts()} | {_fmt(glob.get(f'val_{key}'))} | "
                   f"{_fmt(glob.get(f'test_{key}'))} | {_fmt(glob.get('bytes_from_site'))} |")
    return out


def write_report(run_dir: Path, lang: str | None = None) -> Path:
    """report.md and its plots, in `lang` (default: the current language; the plots fall back
    to English, with one warning, where no installed font has the language's glyphs)."""
    from common.i18n import current, set_language

    before = current()
    set_language(lang or before)
    try:
        return _write_report(run_dir)
    finally:
        set_language(before)


def data_line(data: dict) -> str:
    """'Data: 3D volumes of 28x28x28 voxels, 1 channel(s), classification.'"""
    side, dims = data["image_size"], data["spatial_dims"]
    if dims == 3:
        return _("Data: 3D volumes of {size} voxels, {channels} channel(s), {task}.",
                 size="x".join([str(side)] * 3), channels=data["channels"], task=data["task"])
    return _("Data: 2D images of {size} pixels, {channels} channel(s), {task}.",
             size="x".join([str(side)] * 2), channels=data["channels"], task=data["task"])


def _weights_line(run_dir: Path) -> list[str]:
    """The pretrained weights the run started from (config.yaml's model.weights), if any."""
    import yaml

    path = run_dir / "config.yaml"
    tree = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    model, bundle = tree.get("model") or {}, tree.get("bundle") or (tree.get("task") or {}).get("bundle")
    lines = [_("The task came from the MONAI bundle {folder}: network {network}, its inputs and outputs checked "
               "against the data.", folder=bundle, network=(model.get("network") or {}).get("target"))] if bundle else []
    if not model.get("weights"):
        return lines
    lines += [_("Started from pretrained weights {file} (sha256 {sha256}){head}.", file=model["weights"],
               sha256=model.get("weights_sha256"), head=_(", with a new classifier head") if model.get("new_head") else "")]
    adapters, frozen = model.get("adapters"), model.get("freeze")
    if adapters or frozen:
        what = (_("LoRA adapters (rank {rank}) and the classifier head", rank=adapters.get("rank")) if adapters
                else _("the classifier head only") if "body" in frozen
                else _("every layer but {layers}", layers=", ".join(frozen)))
        lines.append(_("Trained: {what}. The frozen layers were sent to each hospital once; only the trained tensors "
                       "travelled in the rounds.", what=what))
    return lines


def _calibration_lines(summary: dict) -> list[str]:
    """strategy.calibrate_head: what the refit head scored beside the model as trained."""
    cal = summary.get("calibration")
    if not cal:
        return []
    lines = ["## " + _("Head calibration"), ""]
    if cal["status"] != "calibrated":
        return lines + [_("Not done: {why}", why=cal["status"]), ""]
    lines += [_("After the last round the classifier head was refit from the feature sums of {hospitals} hospitals "
                "({images} training images): federated validation AUC {calibrated}, the model as trained {plain}. "
                "The refit model is `{file}`; `model.safetensors` is the model as trained.", hospitals=cal["hospitals"],
                images=cal["images"], calibrated=_fmt(cal["calibrated"]["val_auc"]), plain=_fmt(cal["uncalibrated"]),
                file=cal["file"])]
    if "pers_val_auc" in cal["calibrated"]:  # strategy.personal_heads
        lines += [_("Each hospital also got its own head, fit from the same sums and kept at the hospital: federated "
                    "validation AUC {personal}.", personal=_fmt(cal["calibrated"]["pers_val_auc"]))]
    if cal.get("test"):
        lines += [_("On the test split: {calibrated} refit, {plain} as trained.",
                    calibrated=_fmt(cal["test"]["calibrated"]), plain=_fmt(cal["test"]["uncalibrated"]))]
    return lines + [""]


def _write_report(run_dir: Path) -> Path:
    rows = read_rows(run_dir)
    with labels_for():
        _plot_global(rows, run_dir / "global_auc.png")
        _plot_sites(rows, run_dir / "site_auc.png")
    lines = [_("# Federated run `{run}`", run=run_dir.name), ""]
    summary_path, s = run_dir / "summary.json", {}
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        lines += [_("Rounds: {rounds}; best round by federated validation {name}: {best}; wall time {seconds} s.",
                    rounds=s["rounds"], best=s["best_round"],
                    name=_("loss") if s.get("select_by") == "loss" else _score(rows)[1], seconds=s["seconds"])]
        if s.get("setup_seconds") is not None:
            lines += [_("The wall time counts the run's set-up ({setup} s before round 1: data checks, test split, "
                        "start model); round 1 also includes the hospitals' processes starting.",
                        setup=s["setup_seconds"])]
        if s.get("data"):
            lines += [data_line(s["data"])]
        lines += _weights_line(run_dir)
        lines += [""]
        if s.get("trained_rounds", 1) == 0 and s["rounds"]:
            lines += [_("**Nothing was trained**: no round took in an update from the hospitals (see each site's "
                        "status below); no model was written."), ""]
    last = max(r["round"] for r in rows)
    key = _score(rows)[0]
    cols = ["site", "status", "epsilon", "num_train", "num_val", "train_loss", f"val_{key}", "val_accuracy", f"test_{key}",
            "test_accuracy", "bytes_from_site"]
    if any(r.get(f"ft_val_{key}") is not None for r in rows):  # fine-tuning evaluation was on
        cols[cols.index("val_accuracy") + 1:cols.index("val_accuracy") + 1] = [f"ft_val_{key}", "ft_val_accuracy"]
    if any(r.get(f"pers_val_{key}") is not None for r in rows):  # ditto/apfl: the hospitals' personalized models
        cols[cols.index("val_accuracy") + 1:cols.index("val_accuracy") + 1] = [f"pers_val_{key}", "pers_val_accuracy"]
    per_class = ["test_dice_per_label"] if key == "dice" else ["test_auc_per_class", "test_accuracy_per_class"]
    if key == "dice":
        cols.remove("test_accuracy")
    pairs = [_values(r["test_auc_per_class"]) for r in rows if r.get("test_auc_per_class")]
    binary = bool(pairs) and all(len(p) == 2 and abs(p[0] - p[1]) < 1e-3 for p in pairs)
    if binary:  # with two classes each one-vs-rest AUC is the test AUC itself
        per_class.remove("test_auc_per_class")
    cols[cols.index(f"test_{key}") + 1:cols.index(f"test_{key}") + 1] = per_class
    final = [r for r in rows if r["round"] == last]
    lines += ["## " + _("Final round ({round})", round=last), ""]
    if len(final) - 1 > MANY:
        d = digest(final)
        lines += [_("{sites} sites: {counts}; {spread}. Below: the sites that failed, the {shown} worst and best by "
                    "validation score, and the federation; `metrics.csv` has every site's row.", sites=d.sites,
                    counts=d.counts(), spread=d.spread(), shown=len(d.worst)), ""]
        final = d.shown() + [r for r in final if r["site"] == "global"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in final]
    lines += _rounds(rows, key)
    name = _score(rows)[1]
    lines += ["", "## " + _("Global model"), "", f"![global {name}](global_auc.png)", "",
              "## " + _("Per site"), "", f"![per-site {name}](site_auc.png)", ""]
    with labels_for():
        drew_epsilon = _plot_epsilon(rows, run_dir / "epsilon.png")
    if drew_epsilon:
        lines += ["## " + _("Privacy"), "", _("Epsilon each hospital has spent, from its privacy ledger "
                                              "(DP-SGD; by default the tightest of the RDP, PRV and PLD accountants)."),
                  "", "![epsilon per round](epsilon.png)", ""]
    dist_path = run_dir / "data_distribution.json"
    if dist_path.exists():
        with labels_for():
            _plot_distribution(json.loads(dist_path.read_text()), run_dir / "data_distribution.png")
        lines += ["## " + _("Data per site"), "", "![data distribution](data_distribution.png)", ""]
    with labels_for():
        drew_cross = _plot_cross_site(run_dir, run_dir / "cross_site.png")
    if drew_cross:
        lines += ["## " + _("Cross-site evaluation"), "", _(
            "The final global model and each hospital's final-round model, each scored at every hospital on its own "
            "validation cases (only the figures left the hospitals; withheld: fewer than min_cases positives or "
            "negatives). `cross_site.csv` has the matrix, `cross_site.json` every released figure with its 95 % "
            "interval."), "", "![cross-site matrix](cross_site.png)", ""]
    lines += _calibration_lines(s)
    trained = (run_dir / "model.safetensors").exists()
    lines += [_("Files: `config.yaml` (resolved), `metrics.csv`/`metrics.jsonl` (one row per round x site and per round "
                "`global`), `model.safetensors` (final), `model_best.safetensors`.") if trained else
              _("Files: `config.yaml` (resolved), `metrics.csv`/`metrics.jsonl` (one row per round x site and per round "
                "`global`)."), ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
