"""`aseanfl evaluate -f` (a model scored at a deployment's hospitals), `aseanfl contest submit`
and `aseanfl leaderboard`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

contest_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The contest: submissions scored at the hospitals.")


def _fail(message: str, kind: str = "config error", code: int = 2) -> None:
    typer.echo(f"{kind}: {message}".replace("\n", f"\n{kind}: "), err=True)
    raise typer.Exit(code)


def model_card(model: Path, card: Path | None):
    """(the model's card, where it was read): --card, else the config.yaml of the run folder the
    model file is in (a deployed run's or a simulated one's)."""
    import yaml

    from server.evaluation.federated import card_of_deployment, read_card

    if card is not None:
        return read_card(card), str(card)
    beside = model.parent / "config.yaml"
    if not beside.is_file():
        from medimaging.yamlconfig import ConfigError

        raise ConfigError(f"{model.parent}: no config.yaml beside the model file; give its model card with --card card.yaml")
    tree = yaml.safe_load(beside.read_text()) or {}
    if isinstance(tree, dict) and isinstance(tree.get("task"), dict):
        return card_of_deployment(beside), str(beside)
    from simulations.evaluate import card_of_run

    return card_of_run(beside), str(beside)


def evaluate_deployed(federation_dir: Path, model: Path, card: Path | None, config: Path | None, min_cases: int,
                      out: Path, split: str, wait_for_sites: int, timeout: float) -> None:
    """`aseanfl evaluate -f`: print each hospital's line and the pooled figures."""
    from medimaging.yamlconfig import ConfigError
    from server.evaluation.contest import EvaluationFailed, run_evaluation
    from server.engine.scoring import pooled_line

    from aseanfl.server_cli import _federation

    fed = _federation(federation_dir)
    try:
        model_card_, where = model_card(model, card)
        task = None
        if config is not None:  # the federation's task, as `aseanfl run` reads it
            from server.engine.deployment import check_run_config

            t = check_run_config(config.read_text(), []).task
            from server.engine.plan import TaskShape

            task, where = TaskShape(t.in_channels, t.num_classes, t.image_size, t.kind, t.spatial_dims), str(card or config)
        result, local = run_evaluation(fed, model, model_card_, task, where, min_cases=min_cases, out=out, split=split,
                                       wait_for_sites=wait_for_sites, timeout_s=timeout)
    except ConfigError as exc:
        _fail(str(exc))
    except EvaluationFailed as exc:
        _fail(str(exc), "error", 1)
    typer.echo(f"pooled over {pooled_line(result['pooled'])}")
    typer.echo(f"done: {local / 'evaluation.md'}")


@contest_app.command("submit")
def submit(
    federation_dir: Path = typer.Option(Path("federation"), "--federation-dir", "-f", help="the provisioned federation folder"),
    contest: Path = typer.Option(..., "--contest", help="contest.yaml (name, task, split, metric, min_cases)"),
    team: str = typer.Option(..., "--team", help="the submitting team's name"),
    model: Path = typer.Option(..., "--model", help="the model file (safetensors)"),
    card: Optional[Path] = typer.Option(None, help="its model card (YAML); default: config.yaml beside the model file"),
    out: Path = typer.Option(Path("evaluations"), help="where the evaluation's folder is copied to"),
) -> None:
    """Score a team's model at every connected hospital and keep its figures on the leaderboard."""
    from medimaging.yamlconfig import ConfigError
    from server.evaluation.contest import EvaluationFailed, read_contest, submit as send

    from aseanfl.server_cli import _federation

    fed = _federation(federation_dir)
    try:
        spec = read_contest(contest)
        card_, where = model_card(model, card)
        sub, new = send(fed, spec, team, model, card_, where, out)
    except ConfigError as exc:
        _fail(str(exc))
    except EvaluationFailed as exc:
        _fail(str(exc), "error", 1)
    if new:
        typer.echo(f"submission {sub['id']} ({sub['team']}, model {sub['model_sha256'][:12]}) scored; its folder: "
                   f"{sub['folder']}")
    else:
        typer.echo(f"model {sub['model_sha256'][:12]} was scored in {spec.name} already (submission {sub['id']} by "
                   f"{sub['team']}, {sub['submitted_at']}); not scored again")
    _print_board(fed, spec.name)


def _print_board(fed, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from server.evaluation.contest import leaderboard as board

    contest, rows = board(fed, name)
    table = Table(title=f"{contest.name}: ranked by pooled {contest.metric} ({contest.split} cases, 95 % CI)")
    for col in ("rank", "team", "model", contest.metric, "95 % CI", "hospitals", "cases", "submitted"):
        table.add_column(col)
    for r in rows:
        ci = f"{r['low']:.3f}-{r['high']:.3f}" if r["low"] is not None else ""
        table.add_row(str(r["rank"] or "-"), r["team"], r["model_sha256"][:12],
                      "withheld" if r["value"] is None else f"{r['value']:.3f}", ci, f"{r['scored']}/{r['asked']}",
                      str(r["cases"]), r["submitted_at"])
    if rows:
        Console(width=160).print(table)
    else:
        typer.echo(f"{contest.name}: no submission yet")


def leaderboard(
    federation_dir: Path = typer.Option(Path("federation"), "--federation-dir", "-f", help="the provisioned federation folder"),
    contest: str = typer.Option(..., "--contest", help="the contest's name (or its contest.yaml)"),
) -> None:
    """The contest's ranking, with 95 % confidence intervals."""
    from medimaging.yamlconfig import ConfigError
    from server.evaluation.contest import read_contest

    from aseanfl.server_cli import _federation

    fed = _federation(federation_dir)
    try:
        name = read_contest(Path(contest)).name if contest.endswith((".yaml", ".yml")) else contest
        _print_board(fed, name)
    except ConfigError as exc:
        _fail(str(exc))
