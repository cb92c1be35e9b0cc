"""`aseanfl client ...`: commands a hospital runs next to its data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hospital side: check data (more to come).")


def load_site(path: Path):
    """site.yaml -> SiteConfig; exits 2 with one line per problem."""
    from client.config import SiteConfig
    from simulations.config import ConfigError, load_config

    try:
        return load_config(path, schema=SiteConfig)
    except ConfigError as exc:
        typer.echo("\n".join(f"config error: {line}" for line in str(exc).splitlines()), err=True)
        raise typer.Exit(2) from None


@app.command("check-data")
def check_data(config: Path = typer.Option(..., "--config", "-c", help="the hospital's site.yaml")) -> None:
    """Read every image the site's data section names; print counts per class and split, image
    sizes and spacing, and every file that cannot be used, with the reason. Nothing is sent."""
    from medimaging.files import decode

    site = load_site(config)
    console = Console()
    try:
        decoded = decode(site.data, write_cache=False)
    except ValueError as exc:
        typer.echo(f"data error: {exc}", err=True)
        raise typer.Exit(2) from None
    inv = decoded.inventory
    bad = {p.file for p in inv.problems}
    usable = [i for i in inv.items if str(i.path.relative_to(site.data.root)) not in bad]
    counts = Counter((i.label, i.split or "unsplit") for i in usable)
    splits = sorted({s for _, s in counts})
    console.print(f"{site.site}: {len(usable)} usable images, {len(inv.problems)} problems")
    table = Table()
    table.add_column("class")
    for s in splits:
        table.add_column(s, justify="right")
    for c in inv.classes:
        table.add_row(c, *(str(counts.get((c, s), 0)) for s in splits))
    console.print(table)
    if decoded.shapes:
        shapes = Counter(decoded.shapes.values())
        console.print("image sizes: " + ", ".join(f"{'x'.join(map(str, k))} ({n})" for k, n in shapes.most_common(5)))
    if decoded.spacings:
        rows = [v[0] for v in decoded.spacings.values()]
        console.print(f"pixel spacing (mm): {min(rows):.3g} to {max(rows):.3g} ({len(rows)} files with spacing)")
    for p in inv.problems:
        console.print(f"[yellow]skipped[/] {p.file}: {p.reason}")
    if not usable:
        raise typer.Exit(1)
