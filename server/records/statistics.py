"""stats.json, stats.md and their plots: what the hospitals released about their data
(medimaging/stats.py), pooled, as a paper's "datasets" table needs it, in the reader's language.
Used by `aseanfl stats` (simulated hospitals) and `aseanfl stats -f` (a deployment)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.fonts import labels_for  # noqa: E402
from common.i18n import _  # noqa: E402
from medimaging.stats import PPM, SPLITS, Cell, Histogram, SiteStats, pool, quantiles  # noqa: E402


PLOTS = ("stats-classes.png", "stats-geometry.png", "stats-intensity.png")


def _groups(sites: dict[str, SiteStats]) -> dict[tuple[str, ...], list[str]]:
    groups: dict[tuple[str, ...], list[str]] = {}
    for site, s in sites.items():
        groups.setdefault(tuple(s.classes), []).append(site)
    return groups


def write_statistics(out_dir: Path, results: dict[str, SiteStats | str], min_count: int, request: str) -> dict:
    """stats.json (each hospital's release or why none, the pooled figures) and stats.md with
    plots, each file written whole; returns stats.json's content."""
    released = {s: r for s, r in sorted(results.items()) if isinstance(r, SiteStats)}
    groups = _groups(released)
    pooled = pool(list(released.values())) if len(groups) == 1 else None
    result = {"request": request, "min_count": min_count,
              "sites": {s: (r.model_dump(mode="json") if isinstance(r, SiteStats) else {"error": r})
                        for s, r in sorted(results.items())},
              "classes_agree": len(groups) <= 1,
              "class_groups": [{"classes": list(g), "sites": sites} for g, sites in groups.items()],
              "pooled": pooled.model_dump(mode="json") if pooled is not None else None}
    out_dir.mkdir(parents=True, exist_ok=True)
    with labels_for():
        plots = _plots(released, pooled, out_dir)
    for name, text in (("stats.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n"),
                       ("stats.md", markdown(result, released, pooled, plots))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
    return result


def _v(cell: Cell | None, scale: float = 1.0) -> str:
    if cell is None:
        return ""
    if cell.value is None:
        return _("withheld")
    value = cell.value / scale
    text = f"{value:.0f}" if scale == 1 and value == int(value) else f"{value:.1f}"
    return f"≥ {text}" if cell.withheld else text


def _hist_row(h: Histogram | None) -> list[str]:
    return [_v(c) for c in h.counts] if h is not None else []


def _bins(h: Histogram) -> list[str]:
    e = [f"{x:g}" for x in h.edges]
    return [f"< {e[0]}"] + [f"{a}-{b}" for a, b in zip(e, e[1:])] + [f"≥ {e[-1]}"]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _rows(sites: dict[str, SiteStats], pooled: SiteStats | None) -> dict:
    """The table rows stats.md and the console's Data page both show: each hospital, then pooled."""
    named = list(sites.items()) + ([(_("pooled"), pooled)] if pooled is not None else [])
    mods = sorted({m for _n, s in named for m in (s.modality or {})})
    intensity = []
    for name, s in named:
        for mod, h in (s.intensity or {}).items():
            p5, p50, p95 = (f"{q:.0f}" if q is not None else _("withheld") for q in quantiles(h))
            intensity.append([name, mod, h.unit, p50, p5, p95])  # as the headers read: median, 5th, 95th
    return {"named": named, "classes": (pooled or next(iter(sites.values()))).classes if sites else [],
            "cases": [[name, split, *(_v(c) for c in s.cases[split])] for name, s in named if s.cases
                      for split in SPLITS if split in s.cases],
            "modalities": mods,
            "modality": [[name, *(_v((s.modality or {}).get(m)) for m in mods)] for name, s in named if s.modality],
            "intensity": intensity}


def markdown(result: dict, sites: dict[str, SiteStats], pooled: SiteStats | None, plots: list[str]) -> str:
    L = [_("# Federated statistics `{request}`", request=result["request"]), ""]
    floors = sorted({s.min_count for s in sites.values()}) or [result["min_count"]]
    noisy = [site for site, s in sites.items() if s.noise_scale is not None]
    L += [_("{released} of {asked} hospital(s) released statistics. Counts from 1 to the floor minus one are withheld "
            "(floor {floor}: the larger of each hospital's own and the {asked_floor} asked); nothing per image left any "
            "hospital.", released=len(sites), asked=len(result["sites"]), floor="-".join(map(str, sorted({floors[0], floors[-1]}))),
            asked_floor=result["min_count"])]
    if noisy:
        L += [_("With Laplace noise (site.yaml statistics.noise_epsilon): {sites}.", sites=", ".join(noisy))]
    L += [""]
    for site, r in result["sites"].items():
        if "error" in r:
            L += [f"- {site}: {r['error']}"]
        elif r["withheld_fields"]:
            L += [_("- {site} withholds: {fields}", site=site, fields=", ".join(r["withheld_fields"]))]
    if not result["classes_agree"]:
        said = "; ".join(f"{', '.join(g['sites'])}: {', '.join(g['classes'])}" for g in result["class_groups"])
        L += ["", _("**The hospitals disagree on the classes or their order** ({said}): a run would be refused; map each "
                    "hospital's names in its site.yaml `classes:`. Nothing is pooled.", said=said)]
    L += [""]
    rows = _rows(sites, pooled)
    named, classes = rows["named"], rows["classes"]
    if rows["cases"]:
        L += [_("## Cases per class and split"), ""] + _table([_("hospital"), _("split"), *classes], rows["cases"])
    if rows["modality"]:
        L += [_("## Images per modality"), ""] + _table([_("hospital"), *rows["modalities"]], rows["modality"])
    for field, title in (("size", _("## Image side (pixels, the larger in-plane side, before decoding)")),
                         ("spacing", _("## In-plane pixel spacing (mm)")), ("slices", _("## Slices per volume")),
                         ("thickness", _("## Spacing between slices (mm)"))):
        hists = [(name, getattr(s, field)) for name, s in named if getattr(s, field) is not None]
        if hists:
            L += [title, ""] + _table([_("hospital"), *_bins(hists[0][1])], [[n, *_hist_row(h)] for n, h in hists])
    if rows["intensity"]:
        L += [_("## Intensity (CT in Hounsfield units; other modalities on the training image's 0-255 scale)"), ""]
        L += _table([_("hospital"), _("modality"), _("unit"), _("median"), _("5th percentile"), _("95th percentile")],
                    rows["intensity"])
        L += [_("Read off each histogram's released bins (stats.json), linear within a bin."), ""]
    if any(s.masks for _n, s in named):
        coverage = [[name] + [_v(c, PPM) for c in s.masks] for name, s in named if s.masks]
        L += [_("## Mask coverage (summed share of the voxels, in images)"), ""] + _table([_("hospital"), *classes], coverage)
    L += [f"![{p}]({p})" for p in plots]
    return "\n".join(L) + "\n"


def _plots(sites: dict[str, SiteStats], pooled: SiteStats | None, out: Path) -> list[str]:
    made = []
    with_cases = {n: s for n, s in sites.items() if s.cases}
    if with_cases:
        fig, ax = plt.subplots(figsize=(max(5, 1 + len(with_cases)), 3.5))
        names = list(with_cases)
        bottom = [0.0] * len(names)
        for k, cls in enumerate(next(iter(with_cases.values())).classes):
            heights = [sum((s.cases[sp][k].value or 0) if k < len(s.cases[sp]) else 0 for sp in s.cases)
                       for s in with_cases.values()]
            ax.bar(names, heights, bottom=bottom, label=cls)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set(ylabel=_("cases (released)"), title=_("Class balance per hospital"))
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "stats-classes.png", dpi=100)
        plt.close(fig)
        made.append("stats-classes.png")
    geometry = [(f, getattr(pooled, f)) for f in ("size", "spacing", "slices", "thickness")
                if pooled is not None and getattr(pooled, f) is not None]
    if geometry:
        titles = {"size": _("image side (px)"), "spacing": _("pixel spacing (mm)"), "slices": _("slices per volume"),
                  "thickness": _("spacing between slices (mm)")}
        fig, axes = plt.subplots(1, len(geometry), figsize=(4 * len(geometry), 3), squeeze=False)
        for ax, (f, h) in zip(axes[0], geometry, strict=True):
            ax.bar(_bins(h), [c.value or 0 for c in h.counts], color="C2")
            ax.set(title=titles[f], ylabel=_("images"))
            ax.tick_params(axis="x", labelrotation=45, labelsize="small")
        fig.tight_layout()
        fig.savefig(out / "stats-geometry.png", dpi=100)
        plt.close(fig)
        made.append("stats-geometry.png")
    if pooled is not None and pooled.intensity:
        fig, axes = plt.subplots(1, len(pooled.intensity), figsize=(4 * len(pooled.intensity), 3), squeeze=False)
        for ax, (mod, h) in zip(axes[0], pooled.intensity.items(), strict=True):
            ax.bar(range(len(h.counts)), [(c.value or 0) / PPM for c in h.counts], color="C1")
            ax.set(title=f"{mod} ({h.unit})", xlabel=_("bin"), ylabel=_("images"))
        fig.tight_layout()
        fig.savefig(out / "stats-intensity.png", dpi=100)
        plt.close(fig)
        made.append("stats-intensity.png")
    return made


def data_view(folder: Path) -> dict:
    """What the coordinator console's Data page shows of one stats folder (its stats.json)."""
    result = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    sites = {n: SiteStats.model_validate(r) for n, r in result["sites"].items() if "error" not in r}
    pooled = SiteStats.model_validate(result["pooled"]) if result["pooled"] else None
    rows = _rows(sites, pooled)
    return {"name": folder.name, "request": result["request"], "classes": rows["classes"], "cases": rows["cases"],
            "modalities": rows["modalities"], "modality": rows["modality"], "intensity": rows["intensity"],
            "agree": result["classes_agree"],
            "groups": result["class_groups"], "errors": {n: r["error"] for n, r in result["sites"].items() if "error" in r},
            "withheld": {n: s.withheld_fields for n, s in sites.items() if s.withheld_fields},
            "plots": [p for p in PLOTS if (folder / p).is_file()],
            "floor": result["min_count"]}
