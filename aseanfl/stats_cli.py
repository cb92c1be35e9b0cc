"""`aseanfl stats`: what the federation's data are, before any training: each hospital's counts
(classes and splits, modality, image size, spacing, slices, intensity, mask coverage) and the
pooled figures, under the small-cell rule; simulated hospitals, or with -f a deployment's."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fail(message: str, kind: str = "config error", code: int = 2) -> None:
    typer.echo(f"{kind}: {message}".replace("\n", f"\n{kind}: "), err=True)
    raise typer.Exit(code)


def stats(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="the simulation's YAML config"),
    sites: Optional[str] = typer.Option(None, help="number of hospitals or comma-separated names"),
    data: Optional[Path] = typer.Option(None, help="MedMNIST-style .npz (default: synthetic images)"),
    partition: Optional[str] = typer.Option(None, help="iid | dirichlet | quantity (npz data)"),
    alpha: Optional[float] = typer.Option(None, help="Dirichlet alpha (partition.alpha)"),
    seed: Optional[int] = typer.Option(None, help="the partition's seed"),
    set_: list[str] = typer.Option([], "--set", help="any field of the simulation's config, dotted"),
    min_count: int = typer.Option(10, help="counts below this are withheld (a hospital's own floor may be higher)"),
    out: Optional[Path] = typer.Option(None, help="folder for the stats-<time> folder (default: server.output_dir, "
                                                  "or ./statistics with -f)"),
    federation_dir: Optional[Path] = typer.Option(None, "--federation-dir", "-f",
                                                  help="a deployment: ask its connected hospitals"),
    wait_for_sites: int = typer.Option(1, help="deployment: hospitals to wait for before asking"),
    timeout: float = typer.Option(600.0, help="deployment: seconds the hospitals have to reply"),
) -> None:
    """Describe the federation's data (counts only, nothing per patient): stats.json, stats.md
    and plots."""
    if min_count < 1:
        _fail("--min-count: must be at least 1")
    if federation_dir is not None:
        return _deployed(federation_dir, min_count, out or Path("statistics"), wait_for_sites, timeout)
    from simulations.config import ConfigError, load_config, parse_sets

    try:
        overrides = parse_sets(set_)
        named = {"sites": int(sites) if sites and sites.isdigit() else
                 ([s.strip() for s in sites.split(",") if s.strip()] if sites else None),
                 "data.path": data, "partition.scheme": partition, "partition.alpha": alpha, "seed": seed}
        overrides.update({k: v for k, v in named.items() if v is not None})
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    from simulations.statistics import simulate_statistics

    try:
        folder = simulate_statistics(cfg, min_count, out)
    except ConfigError as exc:
        _fail(str(exc))
    _summary(folder)


def _summary(folder: Path) -> None:
    import json

    result = json.loads((folder / "stats.json").read_text())
    for site, s in result["sites"].items():
        typer.echo(f"{site}: {s['error']}" if "error" in s else f"{site}: {_cases(s)}")
    if result["pooled"] is not None:
        typer.echo(f"pooled: {_cases(result['pooled'])}")
    else:
        said = "; ".join(f"{', '.join(g['sites'])}: {', '.join(g['classes'])}" for g in result["class_groups"])
        typer.echo(f"warning: the hospitals disagree on the classes or their order ({said}); nothing is pooled", err=True)
    typer.echo(f"done: {folder / 'stats.md'}")


def _cases(s: dict) -> str:
    if not s.get("cases"):
        return "classes withheld"
    parts = []
    for split, cells in s["cases"].items():
        shown = ", ".join(f"{c} {_count(v)}" for c, v in zip(s["classes"], cells, strict=True))
        parts.append(f"{split} ({shown})")
    return "; ".join(parts)


def _count(cell: dict) -> str:
    """A released count; a pooled one that some hospital withheld is a lower bound."""
    if cell["value"] is None:
        return "withheld"
    return f"{'>= ' if cell['withheld'] else ''}{cell['value']:g}"


def _deployed(federation_dir: Path, min_count: int, out: Path, wait_for_sites: int, timeout: float) -> None:
    from server.evaluation.statistics import StatisticsFailed, run_statistics

    from aseanfl.server_cli import _federation

    fed = _federation(federation_dir)
    try:
        _result, local = run_statistics(fed, min_count, out, wait_for_sites=wait_for_sites, timeout_s=timeout)
    except StatisticsFailed as exc:
        _fail(str(exc), "error", 1)
    _summary(local)
