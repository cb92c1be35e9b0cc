"""The `aseanfl` command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated medical imaging for ASEAN hospitals.")


def _sites(value: str):
    return int(value) if value.isdigit() else [s.strip() for s in value.split(",") if s.strip()]


def _fail(message: str, kind: str = "config error", code: int = 2) -> None:
    typer.echo(f"{kind}: {message}".replace("\n", f"\n{kind}: "), err=True)
    raise typer.Exit(code)


def _data_line(data) -> str:
    if data.files is not None and data.files.dicomweb is not None:
        return f"the PACS at {data.files.dicomweb.url}"
    if data.files is not None:
        return f"files under {data.files.root}" + (f" (manifest {data.files.manifest.name})" if data.files.manifest else "")
    if data.path is None:
        s = data.synthetic
        return f"synthetic (embedded default, {'3D volumes' if s.spatial_dims == 3 else '2D images'})"
    from medimaging.datasets import npz_info

    info = npz_info(data.path)
    side = data.image_size or info.native
    kind = f"3D volumes {side}x{side}x{side}" if info.spatial_dims == 3 else f"2D images {side}x{side}"
    return f"{data.path} ({kind}, {info.classes} classes)"


def _model_line(cfg) -> str:
    if cfg.bundle is None:
        return cfg.model.name
    from medimaging.bundles import read_bundle

    return read_bundle(cfg.bundle).line()


@app.callback()
def _root(lang: Optional[str] = typer.Option(
        None, "--lang", help="language of what aseanfl prints: en, vi, th, zh_Hans, id, ms, km, my (default: "
                             "ASEANFL_LANG, a hospital's site.yaml language, the locale)")) -> None:
    """Federated medical imaging for ASEAN hospitals."""
    from common.i18n import LANGUAGES, _cli, normalise, use

    if lang is not None and normalise(lang) is None:
        _fail(f"--lang: {lang!r} is not one of {', '.join(LANGUAGES)}")
    _cli[0] = normalise(lang)
    use()


@app.command()
def simulate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; CLI options override it"),
    rounds: Optional[int] = typer.Option(None, help="federated rounds (server.rounds)"),
    sites: Optional[str] = typer.Option(None, help="number of hospitals or comma-separated names"),
    data: Optional[Path] = typer.Option(None, help="MedMNIST-style .npz (default: synthetic images)"),
    model: Optional[str] = typer.Option(None, help="cnn | resnet18 | densenet121 (classification); unet (segmentation)"),
    bundle: Optional[Path] = typer.Option(None, help="a MONAI bundle folder as the task: its network, weights and "
                                                     "inputs/outputs (docs/researcher.md)"),
    partition: Optional[str] = typer.Option(None, help="iid | dirichlet | quantity (npz data)"),
    alpha: Optional[float] = typer.Option(None, help="Dirichlet alpha (partition.alpha)"),
    local_epochs: Optional[int] = typer.Option(None, help="train.local_epochs"),
    epsilon: Optional[float] = typer.Option(None, help="DP-SGD at every hospital, calibrated to this epsilon"),
    seed: Optional[int] = typer.Option(None, help="same seed, same metrics"),
    out: Optional[Path] = typer.Option(None, help="folder for run folders (server.output_dir)"),
    set_: list[str] = typer.Option([], "--set", help="any field, dotted: --set train.lr=0.01"),
    verbose: bool = typer.Option(False, help="show Flower's and Ray's own logs"),
) -> None:
    """Simulate a federation of hospitals on one machine (Flower Simulation Engine, Ray)."""
    from simulations.config import ConfigError, load_config, parse_sets

    try:
        overrides = parse_sets(set_)
    except ConfigError as exc:
        _fail(f"--set {exc}")
    named = {
        "server.rounds": rounds, "sites": _sites(sites) if sites else None, "data.path": data,
        "model.name": model, "bundle": bundle, "partition.scheme": partition, "partition.alpha": alpha,
        "train.local_epochs": local_epochs, "seed": seed, "server.output_dir": out,
        "engine.verbose": verbose or None,
        "privacy.enabled": True if epsilon is not None else None, "privacy.target_epsilon": epsilon,
    }
    overrides.update({k: v for k, v in named.items() if v is not None})
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))

    from rich.console import Console

    from simulations.runner import SimulationFailed
    from simulations.runner import simulate as run

    from aseanfl.progress import RichProgress

    console = Console()
    names = ", ".join(cfg.sites) if len(cfg.sites) <= 12 else f"{', '.join(cfg.sites[:3])}, ..., {cfg.sites[-1]}"
    console.print(f"[bold]aseanfl simulate[/]: {len(cfg.sites)} hospitals ({names}), "
                  f"{cfg.server.rounds} rounds, model {_model_line(cfg)}, "
                  f"data {_data_line(cfg.data)}", soft_wrap=True)  # paths whole, however narrow
    try:
        with RichProgress(console) as progress:
            run_dir = run(cfg, progress)
    except ConfigError as exc:  # checks that need the data, e.g. a budget below one round
        _fail(str(exc))
    except SimulationFailed as exc:  # e.g. Ray could not start
        _fail(str(exc), "error", 1)
    console.print(f"[green]done[/]: {run_dir}  (report: {run_dir / 'report.md'})", soft_wrap=True)


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", help="model file (safetensors), e.g. a run folder's model.safetensors"),
    card: Optional[Path] = typer.Option(None, help="its model card (YAML); default: config.yaml beside the model file"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="the simulated federation's YAML config"),
    sites: Optional[str] = typer.Option(None, help="number of hospitals or comma-separated names"),
    data: Optional[Path] = typer.Option(None, help="MedMNIST-style .npz (default: synthetic images)"),
    min_cases: int = typer.Option(20, help="figures on fewer positives or negatives are withheld"),
    out: Optional[Path] = typer.Option(None, help="folder for evaluation.json / evaluation.md"),
    set_: list[str] = typer.Option([], "--set", help="any field of the federation's config, dotted"),
    federation_dir: Optional[Path] = typer.Option(None, "--federation-dir", "-f",
                                                  help="a deployment: score at its connected hospitals"),
    split: str = typer.Option("test", help="deployment: the hospitals' test or validation cases"),
    wait_for_sites: int = typer.Option(1, help="deployment: hospitals to wait for before the model is sent"),
    timeout: float = typer.Option(600.0, help="deployment: seconds the hospitals have to reply"),
) -> None:
    """Score a model at every hospital on its own held-out cases (simulated, or with -f a
    deployment's); only figures come back."""
    if federation_dir is not None:
        from aseanfl.contest_cli import evaluate_deployed

        if split not in ("test", "validation"):
            _fail("--split: test or validation")
        if min_cases < 1:
            _fail("--min-cases: must be at least 1")
        return evaluate_deployed(federation_dir, model, card, config, min_cases, out or Path("evaluations"), split,
                                 wait_for_sites, timeout)
    from simulations.config import ConfigError, load_config, parse_sets

    try:
        overrides = parse_sets(set_)
        named = {"sites": _sites(sites) if sites else None, "data.path": data}
        overrides.update({k: v for k, v in named.items() if v is not None})
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if min_cases < 1:
        _fail("--min-cases: must be at least 1")

    from simulations.evaluate import evaluate as run
    from simulations.runner import SimulationFailed

    try:
        folder = run(cfg, model, card, min_cases, out)
    except ConfigError as exc:  # the model file, its card, or the federation's data
        _fail(str(exc))
    except SimulationFailed as exc:  # e.g. Ray could not start
        _fail(str(exc), "error", 1)
    import json

    from server.engine.scoring import pooled_line

    typer.echo(f"pooled over {pooled_line(json.loads((folder / 'evaluation.json').read_text())['pooled'])}")
    typer.echo(f"done: {folder / 'evaluation.md'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run folder (simulated or deployed)")) -> None:
    """Write a run folder's report.md and its plots again, in the language of --lang (or
    ASEANFL_LANG, or the locale): e.g. `aseanfl --lang vi report runs/run-123`."""
    from server.records.report import write_report

    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "metrics.csv").is_file():
        _fail(f"{run_dir}: not a run folder (no metrics.jsonl or metrics.csv)")
    try:
        path = write_report(run_dir)
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"{run_dir}: its metrics cannot be read ({type(exc).__name__}: {exc})", "error", 1)
    typer.echo(f"done: {path}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="a model file (safetensors), e.g. a run folder's model_best.safetensors"),
    bundle: Path = typer.Option(..., "--bundle", help="the MONAI bundle folder to write (must not exist)"),
    card: Optional[Path] = typer.Option(None, help="its model card (YAML); default: config.yaml beside the model file"),
) -> None:
    """Write a model as a MONAI bundle (network_def, metadata, weights; LoRA adapters merged in):
    the next federation starts from it with --bundle or task.bundle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medimaging.export import ExportError, export_bundle
    from medimaging.weights import file_sha256
    from medimaging.yamlconfig import ConfigError

    from aseanfl.contest_cli import model_card

    if not model.is_file():
        _fail(f"{model}: no such model file")
    try:
        found, _where = model_card(model, card)
        state = load_file(str(model))
        written = export_bundle(bundle, model, state, found.model, task=found.task, in_channels=found.in_channels,
                                num_classes=found.num_classes, image_size=found.image_size,
                                spatial_dims=found.spatial_dims, private=found.private, sha256=file_sha256(model),
                                name=f"aseanfl-{model.parent.name}")
    except (ConfigError, ExportError) as exc:
        _fail(str(exc))
    except (OSError, ValueError, SafetensorError) as exc:  # an unreadable safetensors file
        _fail(f"{model}: not a readable model file ({type(exc).__name__}: {exc})", "error", 1)
    typer.echo(f"done: {bundle}  ({written.line()})")


from aseanfl.client_cli import app as client_app  # noqa: E402
from aseanfl.contest_cli import contest_app, leaderboard  # noqa: E402
from aseanfl.demo import demo  # noqa: E402
from aseanfl.server_cli import app_hash, console_cert, provision, run, server_app, status  # noqa: E402
from aseanfl.stats_cli import stats  # noqa: E402

app.add_typer(client_app, name="client")
app.add_typer(server_app, name="server")
app.add_typer(contest_app, name="contest")
app.command()(leaderboard)
app.command()(provision)
app.command()(run)
app.command()(status)
app.command()(demo)
app.command()(stats)
app.command("app-hash")(app_hash)
app.command("console-cert")(console_cert)


def main() -> None:
    app()
