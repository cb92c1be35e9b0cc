"""`aseanfl client ...`: commands a hospital runs next to its data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hospital side: check data, run the daemon, approve apps, audit what left.")
SITE_OPTION = typer.Option(..., "--config", "-c", help="the hospital's site.yaml")


def config_errors(exc) -> str:
    """A ConfigError as the operator reads it: one 'config error: ...' line per problem."""
    from common.i18n import _

    return "\n".join(_("config error: {problem}", problem=line) for line in str(exc).splitlines())


def approved_line(new: bool, sha256: str, allowlist: Path) -> str:
    """What `client approve` and `server approve` say once the allow-list holds the hash."""
    from common.i18n import _

    said = {"sha256": sha256, "file": allowlist}
    return _("approved: {sha256} ({file})", **said) if new else _("already approved: {sha256} ({file})", **said)


def load_site(path: Path):
    """site.yaml -> SiteConfig (paths made absolute); exits 2 with one line per problem."""
    from client.config import load_site as read
    from medimaging.yamlconfig import ConfigError

    from common.i18n import use

    try:
        site = read(path)
        use(site=site.language)  # --lang, ASEANFL_LANG, then the hospital's own choice, then the locale
        return site
    except ConfigError as exc:
        typer.echo(config_errors(exc), err=True)
        raise typer.Exit(2) from None


def operator() -> str:
    """Who runs this command, for the audit log's decisions."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}"


@app.command("check-data")
def check_data(config: Path = SITE_OPTION) -> None:
    """Read every image the site's data section names; print counts per class and split, image
    sizes and spacing, and every file that cannot be used, with the reason. Nothing is sent."""
    from client.operations.datacheck import MASKS, check

    from common.i18n import _, number, text_of

    site = load_site(config)
    console = Console()
    try:
        found = check(site)
    except ValueError as exc:
        typer.echo(_("data error: {reason}", reason=text_of(exc).render()), err=True)
        raise typer.Exit(2) from None
    console.print(_("{site}: {usable} usable images, {problems} problems", site=site.site, usable=number(found.usable),
                    problems=number(len(found.problems))))
    table = Table()
    table.add_column(_("finding") if found.row_label == "finding" else _("class"))
    for s in found.splits:
        table.add_column(_("unsplit") if s == "unsplit" else s, justify="right")
    for name, counts in found.rows:
        table.add_row(_("images with a mask") if name == MASKS else name, *map(number, counts))
    console.print(table)
    if site.classes:  # site.yaml maps this hospital's names onto the federation's: show the result
        from client.training.site import SiteDataError, federation_classes

        try:
            names, _order = federation_classes([n for n, _c in found.rows if n != MASKS], site.classes,
                                               site.data.classes is not None, bool(found.mask_labels))
        except SiteDataError as exc:
            typer.echo(config_errors(exc), err=True)
            raise typer.Exit(2) from None
        console.print(_("the federation's classes, in this hospital's label order: {names}", names=", ".join(names)))
    if found.mask_labels:
        console.print(_("mask labels: {labels}", labels=", ".join(f"{k} = {c}" for k, c in enumerate(found.mask_labels))))
    if found.sizes:
        console.print(_("image sizes: {sizes}", sizes=", ".join(f"{k} ({number(n)})" for k, n in found.sizes)))
    if found.spacing:
        lo, hi, n = found.spacing
        console.print(_("pixel spacing (mm): {low} to {high} ({files} files with spacing)", low=number(round(lo, 3)),
                        high=number(round(hi, 3)), files=number(n)))
    for file, note in found.notes:  # what the decoders said of files, in their report, not as warnings
        console.print(_("[dim]note[/] {file}: {note}", file=escape(file), note=escape(note)), soft_wrap=True)
    for problem in found.problems:  # one whole line per file, however narrow the terminal
        console.print(_("[yellow]skipped[/] {file}: {reason}", file=escape(problem.file), reason=escape(problem.shown())),
                      soft_wrap=True)
    if not found.usable:
        raise typer.Exit(1)


DIR_OPTION = typer.Option(..., "--dir", "-d", help="this hospital's own folder: its keys, site.yaml, audit log, state")


@app.command()
def enroll(
    site: str = typer.Option(..., "--site", help="this hospital's id, as agreed with the coordinator (e.g. hanoi-bach-mai)"),
    folder: Path = DIR_OPTION,
) -> None:
    """Make this hospital's private keys here and write the enrollment request (nothing secret) to
    send to the coordinator."""
    from common.enrollment import REQUEST, EnrollmentError, fingerprint, make_keys
    from common.i18n import _

    try:
        request = make_keys(folder, site)
    except EnrollmentError as exc:
        typer.echo(_("error: {reason}", reason=exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(_("{site}: private keys written to {folder} (node.key, client.key; they never leave this machine)",
                 site=site, folder=folder.resolve()))
    typer.echo(_("send {file} to the coordinator, and read them its fingerprint over the phone: {fingerprint}",
                 file=(folder / REQUEST).resolve(), fingerprint=fingerprint(request)))


@app.command("install-kit")
def install_kit(
    kit: Path = typer.Option(..., "--kit", help="the kit folder the coordinator returned (no private key in it)"),
    folder: Path = DIR_OPTION,
) -> None:
    """Check the coordinator's kit against this hospital's keys, then install its certificate, the
    federation's CA and address, and a site.yaml to fill in (an existing one is kept)."""
    import shutil

    from common.enrollment import EnrollmentError, check_kit, fingerprint, write_atomic
    from common.i18n import _

    try:
        site = check_kit(folder, kit)
    except EnrollmentError as exc:
        typer.echo(_("error: {reason}", reason=exc), err=True)
        raise typer.Exit(2) from None
    for name in ("client.crt", "ca.crt", "server-address"):
        if (kit / name).is_file():
            write_atomic(folder / name, (kit / name).read_bytes())
    kept = []
    for name in ("site.yaml", "approved-apps.yaml"):
        if (folder / name).exists():
            kept.append(name)
        elif (kit / name).is_file():
            shutil.copyfile(kit / name, folder / name)
    typer.echo(_("{site}: the kit fits this hospital's keys; certificate installed in {folder}", site=site,
                 folder=folder.resolve()))
    typer.echo(_("the federation's CA fingerprint: {fingerprint} (compare it with the coordinator's)",
                 fingerprint=fingerprint((folder / "ca.crt").read_bytes())))
    if kept:
        typer.echo(_("kept this hospital's own {files}", files=", ".join(kept)))


@app.command()
def start(config: Path = SITE_OPTION) -> None:
    """Run the hospital daemon (Flower SuperNode + app approval + audit log) in the foreground."""
    from client.operations.daemon import run_daemon

    from common.i18n import _, text_of

    site = load_site(config)
    try:
        raise typer.Exit(run_daemon(site, config.resolve()))
    except ValueError as exc:
        typer.echo(_("config error: {problem}", problem=text_of(exc).render()), err=True)
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
    from common.allowlist import fab_hash
    from client.operations.approvals import approve as add

    from common.i18n import _, text_of

    site = load_site(config)
    if sum(x is not None for x in (sha256, fab, app_dir)) != 1:
        typer.echo(_("error: give exactly one of --sha256, --fab, --app"), err=True)
        raise typer.Exit(2)
    if fab is not None:
        sha256 = fab_hash(fab)
    elif app_dir is not None:
        from server.operations.bundle import app_hash

        sha256 = app_hash(app_dir)
    try:
        new = add(site, sha256, f"{operator()} (command line)", note)
    except ValueError as exc:
        typer.echo(_("error: {reason}", reason=text_of(exc).render()), err=True)
        raise typer.Exit(2) from None
    typer.echo(approved_line(new, sha256, site.approved_apps))


@app.command()
def audit(config: Path = SITE_OPTION) -> None:
    """Verify the audit log: its hash chain, and that only model arrays and allowed aggregate
    metrics left (no other record or key, no data folder or file name in any value)."""
    from client.operations.audit import forbidden_strings, verify

    from common.i18n import _, number, shown

    site = load_site(config)
    forbidden = forbidden_strings(site)
    report = verify(site.audit_log, site.site, forbidden)
    console = Console()
    rounds = sum(len(r) for r in report.runs.values())
    sent = _("{file}: {messages} messages sent, {bytes} bytes, {runs} run(s), {rounds} (run, round) pairs",
             file=escape(str(site.audit_log)), messages=number(report.entries), bytes=number(report.bytes),
             runs=number(len(report.runs)), rounds=number(rounds))
    if report.decisions:
        sent = _("{summary}; {decisions} app decision(s) recorded", summary=sent, decisions=number(report.decisions))
    console.print(sent, soft_wrap=True)
    for problem in report.problems:
        console.print(_("[red]problem[/] {problem}", problem=escape(shown(problem))), soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)
    console.print(_("[green]ok[/]: only model arrays and allowed aggregate metrics left this hospital"))


def read_password(confirm: bool = True) -> str:
    """From the terminal (asked twice), or the first line of stdin when it is not one."""
    import sys

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=confirm)


def serve_console(build, add_user: str, host: str, port: int, cert, key, idle: float) -> None:
    """Start a console (hospital or coordinator); one line and exit 2 where it cannot."""
    from common.web import ConsoleError, serve

    app, console = build()
    console.sessions.idle_s, console.add_user = idle * 60, add_user
    try:
        serve(app, console, host, port, cert, key, say=typer.echo)
    except ConsoleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


HOST_OPTION = typer.Option("127.0.0.1", help="address to listen on; beyond loopback needs --tls-cert/--tls-key")
CERT_OPTION = typer.Option(None, "--tls-cert", help="TLS certificate (PEM), e.g. one the federation's CA issued")
KEY_OPTION = typer.Option(None, "--tls-key", help="its private key (PEM)")
IDLE_OPTION = typer.Option(30.0, "--idle-minutes", help="a session ends after this long without a request")


@app.command()
def console(
    config: Path = SITE_OPTION,
    host: str = HOST_OPTION,
    port: int = typer.Option(8470, help="port"),
    tls_cert: Optional[Path] = CERT_OPTION,
    tls_key: Optional[Path] = KEY_OPTION,
    idle_minutes: float = IDLE_OPTION,
) -> None:
    """The hospital's web console: data, app approvals, privacy ledgers, audit log, daemon status."""
    from client.operations.console import build_console

    site = load_site(config)
    serve_console(lambda: build_console(site), f"aseanfl client console-user -c {config}", host, port, tls_cert,
                  tls_key, idle_minutes)


def set_console_user(users: Path, name: str) -> None:
    """Add a console user or set their password (read_password); exits 2 with one line if refused."""
    from common.logins import ConsoleError, add_user

    try:
        new = add_user(users, name, read_password())
    except ConsoleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{'added' if new else 'password changed for'} console user {name} ({users})")


@app.command("console-user")
def console_user(config: Path = SITE_OPTION, name: str = typer.Argument(..., help="the user's login name")) -> None:
    """Add a console user, or set a user's password (asked twice; or the first line of stdin)."""
    from client.operations.console import users_path

    set_console_user(users_path(load_site(config)), name)
