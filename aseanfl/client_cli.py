"""`aseanfl client ...`: commands a hospital runs next to its data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hospital side: check data, run the daemon, approve apps, audit what left.")
SITE_OPTION = typer.Option(..., "--config", "-c", help="the hospital's site.yaml")


def load_site(path: Path):
    """site.yaml -> SiteConfig (paths made absolute); exits 2 with one line per problem."""
    from client.config import load_site as read
    from medimaging.yamlconfig import ConfigError

    try:
        return read(path)
    except ConfigError as exc:
        typer.echo("\n".join(f"config error: {line}" for line in str(exc).splitlines()), err=True)
        raise typer.Exit(2) from None


@app.command("check-data")
def check_data(config: Path = SITE_OPTION) -> None:
    """Read every image the site's data section names; print counts per class and split, image
    sizes and spacing, and every file that cannot be used, with the reason. Nothing is sent."""
    from medimaging.files import decode, item_name

    site = load_site(config)
    console = Console()
    try:
        decoded = decode(site.data, write_cache=False)
    except ValueError as exc:
        typer.echo(f"data error: {exc}", err=True)
        raise typer.Exit(2) from None
    inv = decoded.inventory
    bad = {p.file for p in inv.problems}
    usable = [i for i in inv.items if item_name(site.data, i.path) not in bad]
    def names(item) -> list[str]:  # a class, the findings (multi-label), or "images with a mask"
        return ["images with a mask"] if item.mask is not None else item.label if isinstance(item.label, list) else [item.label]

    counts = Counter((name, i.split or "unsplit") for i in usable for name in names(i))
    splits = sorted({s for _, s in counts} or {"unsplit"})
    console.print(f"{site.site}: {len(usable)} usable images, {len(inv.problems)} problems")
    table = Table()
    table.add_column("finding" if site.data.multilabel else "class")
    for s in splits:
        table.add_column(s, justify="right")
    rows = ["images with a mask"] if any(i.mask is not None for i in inv.items) else inv.classes
    for c in rows:
        table.add_row(c, *(str(counts.get((c, s), 0)) for s in splits))
    console.print(table)
    if rows != inv.classes and inv.classes:
        console.print("mask labels: " + ", ".join(f"{k} = {c}" for k, c in enumerate(inv.classes)))
    if decoded.shapes:
        shapes = Counter(decoded.shapes.values())
        console.print("image sizes: " + ", ".join(f"{'x'.join(map(str, k))} ({n})" for k, n in shapes.most_common(5)))
    if decoded.spacings:
        rows = [v[0] for v in decoded.spacings.values()]
        console.print(f"pixel spacing (mm): {min(rows):.3g} to {max(rows):.3g} ({len(rows)} files with spacing)")
    for file, notes in decoded.notes.items():  # what the decoders said of files, in their report, not as warnings
        for note in notes:
            console.print(f"[dim]note[/] {escape(file)}: {escape(note)}", soft_wrap=True)
    for p in inv.problems:  # one whole line per file, however narrow the terminal
        console.print(f"[yellow]skipped[/] {escape(p.file)}: {escape(p.reason)}", soft_wrap=True)
    if not usable:
        raise typer.Exit(1)


@app.command()
def start(config: Path = SITE_OPTION) -> None:
    """Run the hospital daemon (Flower SuperNode + app approval + audit log) in the foreground."""
    from client.daemon import run_daemon

    site = load_site(config)
    try:
        raise typer.Exit(run_daemon(site, config.resolve()))
    except ValueError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def approve(
    config: Path = SITE_OPTION,
    sha256: Optional[str] = typer.Option(None, help="the bundle hash the coordinator published (aseanfl app-hash)"),
    fab: Optional[Path] = typer.Option(None, help="or a built .fab file to hash"),
    app_dir: Optional[Path] = typer.Option(None, "--app", help="or an app source folder, built as Flower builds it"),
    note: str = typer.Option("", help="why / who approved it"),
) -> None:
    """Add an app bundle to this hospital's allow-list (the daemon runs nothing else)."""
    from aseanfl.allowlist import approve as add, fab_hash

    site = load_site(config)
    if sum(x is not None for x in (sha256, fab, app_dir)) != 1:
        typer.echo("error: give exactly one of --sha256, --fab, --app", err=True)
        raise typer.Exit(2)
    if fab is not None:
        sha256 = fab_hash(fab)
    elif app_dir is not None:
        from server.control import app_hash

        sha256 = app_hash(app_dir)
    try:
        new = add(site.approved_apps, sha256, note, f"hospital {site.site}")
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{'approved' if new else 'already approved'}: {sha256} ({site.approved_apps})")


@app.command()
def audit(config: Path = SITE_OPTION) -> None:
    """Verify the audit log: its hash chain, and that only model arrays and allowed aggregate
    metrics left (no other record or key, no data folder or file name in any value)."""
    from client.audit import verify
    from medimaging.files import base, inventory

    site = load_site(config)
    forbidden = [str(base(site.data))]
    try:
        if site.data.dicomweb is not None:  # the UIDs of what was retrieved (the PACS is not asked again)
            files = list(base(site.data).rglob("*")) if base(site.data).is_dir() else []
            forbidden += sorted({p.name.partition("-")[2] or p.name for p in files})
        else:
            files = [p for i in inventory(site.data).items for p in (i.path, i.mask) if p is not None]
            forbidden += sorted({p.name for p in files if len(p.stem) >= 4})
    except ValueError:
        pass  # an unreadable data folder still gets its log checked
    report = verify(site.audit_log, site.site, forbidden)
    console = Console()
    rounds = sum(len(r) for r in report.runs.values())
    console.print(f"{site.audit_log}: {report.entries} messages sent, {report.bytes:,} bytes, "
                  f"{len(report.runs)} run(s), {rounds} (run, round) pairs")
    for problem in report.problems:
        console.print(f"[red]problem[/] {problem}")
    if report.problems:
        raise typer.Exit(1)
    console.print("[green]ok[/]: only model arrays and allowed aggregate metrics left this hospital")
