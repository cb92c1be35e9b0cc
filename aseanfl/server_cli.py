"""Coordinator commands: provision, server start/register, run, status, app-hash."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from server.records.words import node_word, run_word

from common.i18n import _

server_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Coordinator: the federation's SuperLink.")
FED_OPTION = typer.Option(Path("federation"), "--federation-dir", "-f", help="the provisioned federation folder")


def _federation(path: Path):
    from server.operations.provision import load_federation

    try:
        return load_federation(path)
    except ValueError as exc:
        typer.echo(_("error: {reason}", reason=exc), err=True)
        raise typer.Exit(2) from None


def provision(
    federation: str = typer.Option(..., "--federation", help="federation name, e.g. asean-cxr"),
    enroll: list[Path] = typer.Option([], help="a hospital's enrollment request (`aseanfl client enroll`): sign it, "
                                              "write its kit"),
    reenroll: bool = typer.Option(False, help="with --enroll: new keys for an enrolled hospital (after a leak); its "
                                              "old certificate is revoked, its old node key unregistered"),
    sites: str = typer.Option("", help="trying out on one machine only: hospital ids whose keys are made here"),
    out: Path = typer.Option(Path("federation"), "--out", "-o", help="the federation folder"),
    address: str = typer.Option("127.0.0.1:9092", help="host:port the hospitals reach the server's front at"),
    host: list[str] = typer.Option([], help="more names/IPs for the server certificate"),
    ca_dir: Optional[Path] = typer.Option(None, help="the CA's folder (default: <out>-ca); keep it off the server"),
    local_port: Optional[int] = typer.Option(None, help="the SuperLink's loopback port (default: the address's port + 1)"),
    revoke: list[str] = typer.Option([], help="revoke a hospital: its certificate is refused, its node key unregistered"),
) -> None:
    """Create the federation's CA and the server's certificate; enroll hospitals from their requests
    (or revoke one)."""
    from server.operations.bundle import app_dir, app_hash
    from server.operations.control import server_allowlist
    from server.operations.provision import default_ca_dir, enroll as sign, provision as make, revoke as cancel

    from common.allowlist import approve

    names = [s.strip() for s in sites.split(",") if s.strip()]
    if (out / "federation.json").is_file() and not (names or enroll or revoke):
        typer.echo(_("error: {folder} is provisioned already; give --enroll REQUEST (a hospital's request) or --revoke SITE",
                     folder=out), err=True)
        raise typer.Exit(2)
    enrolled = []
    try:
        if revoke:
            for site in revoke:
                fed = cancel(out, site, ca_dir)
                typer.echo(_("revoked {site}: its certificate is on {file}; a running server refuses it and unregisters "
                             "its node key within seconds", site=site, file=fed.server_dir / "crl.pem"))
            if not names and not enroll:
                return
        new = not (out / "federation.json").is_file()
        fed, added = make(out, federation, names, address, host, ca_dir, local_port)
        for request in enroll:
            fed, req = sign(out, request, ca_dir, reenroll)
            enrolled.append(req)
    except ValueError as exc:
        typer.echo(_("error: {reason}", reason=exc), err=True)
        raise typer.Exit(2) from None
    if new:  # the server runs this aseanfl's app; anything else needs `aseanfl server approve`
        approve(server_allowlist(fed), app_hash(app_dir()), "approved at provisioning", "this server")
    typer.echo(_("federation {federation} in {folder}: hospitals reach {address}; the SuperLink listens on {superlink} "
                 "only", federation=fed.name, folder=fed.root, address=fed.address, superlink=fed.superlink))
    typer.echo(_("CA key: {file} (keep it off the server machine)", file=(ca_dir or default_ca_dir(out)).resolve() / "ca.key"))
    if added:
        typer.echo(_("trying out on one machine: the keys of {sites} were made here; in production each hospital "
                     "enrolls with `aseanfl client enroll` and its private keys never leave it", sites=", ".join(added)))
    for req in enrolled:
        typer.echo(_("enrolled {site}: request fingerprint {fingerprint} (check it with the hospital); kit with no "
                     "private key: {kit}", site=req.site, fingerprint=req.fingerprint, kit=fed.site_kit(req.site)))
    just = {r.site for r in enrolled}
    for site in fed.sites():
        if site in just:
            continue
        state = _("new") if site in added else _("kept")
        typer.echo(_("  {site} {state} kit: {kit}  (send it to the hospital)", site=f"{site:24s}", state=f"{state:5s}",
                     kit=fed.site_kit(site)))


@server_app.command("start")
def start(federation_dir: Path = FED_OPTION) -> None:
    """Run the SuperLink (TLS, registered hospitals only, state in server/state.db) in the foreground."""
    from server.operations.control import run_server

    fed = _federation(federation_dir)
    try:
        code = run_server(fed)
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(_("error: {reason}", reason=exc), err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@server_app.command("approve")
def approve_app(
    federation_dir: Path = FED_OPTION,
    sha256: Optional[str] = typer.Option(None, help="a bundle hash (aseanfl app-hash)"),
    app: Optional[Path] = typer.Option(None, help="or an app source folder (default: this aseanfl)"),
    note: str = typer.Option("", help="why / who approved it"),
) -> None:
    """Add an app bundle to the server's allow-list (its ServerApp runs nothing else)."""
    from server.operations.bundle import app_dir, app_hash
    from server.operations.control import server_allowlist

    from common.allowlist import approve
    from aseanfl.client_cli import approved_line

    fed = _federation(federation_dir)
    digest = sha256 or app_hash(app or app_dir())
    try:
        new = approve(server_allowlist(fed), digest, note, "this server")
    except ValueError as exc:
        typer.echo(_("error: {reason}", reason=exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(approved_line(new, digest, server_allowlist(fed)))


@server_app.command("register")
def register(federation_dir: Path = FED_OPTION) -> None:
    """Register hospitals provisioned after the server started (their keys may connect from now on)."""
    from server.operations.control import register_sites

    for site, node in register_sites(_federation(federation_dir)).items():
        typer.echo(_("{site}: node {node}", site=site, node=node))


def run(
    federation_dir: Path = FED_OPTION,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="federation.yaml (model, task, strategy, rounds...)"),
    rounds: Optional[int] = typer.Option(None, help="server.rounds"),
    strategy: Optional[str] = typer.Option(None, help="strategy.name"),
    set_: list[str] = typer.Option([], "--set", help="any field, dotted: --set train.lr=0.01"),
    out: Path = typer.Option(Path("runs"), help="where the run folder is downloaded to"),
    app: Optional[Path] = typer.Option(None, help="the Flower App folder (default: this aseanfl)"),
    resume: Optional[int] = typer.Option(None, "--resume", metavar="RUN_ID",
                                         help="continue a run the server lost, after its last finished round "
                                              "(same settings; default: the run's own config.yaml)"),
) -> None:
    """Start a federated run on the connected hospitals, stream its progress, download its results."""
    from medimaging.yamlconfig import ConfigError
    from server.engine.checkpoint import CheckpointError, inspect
    from server.operations.bundle import app_dir
    from server.operations.control import start_run
    from server.engine.deployment import check_run_config, run_busy, run_folder

    from aseanfl.client_cli import config_errors

    fed = _federation(federation_dir) if resume is not None else None
    old = run_folder(fed.server_dir / "runs", resume) if fed is not None else None
    if config is None and old is not None and (old / "config.yaml").is_file():
        config = old / "config.yaml"  # the settings the run was started with
    text = config.read_text() if config else ""
    named = [f"server.rounds={rounds}"] * (rounds is not None) + [f"strategy.name={strategy}"] * (strategy is not None)
    try:  # the same validation the ServerApp runs, before anything is sent
        cfg = check_run_config(text, [*set_, *named])
    except ConfigError as exc:
        typer.echo(config_errors(exc), err=True)
        raise typer.Exit(2) from None
    if cfg.task.bundle is not None:  # the ServerApp runs elsewhere: the folder by its full path
        named += [f"task.bundle={cfg.task.bundle.resolve()}"]
    if cfg.model.weights is not None:  # the ServerApp runs elsewhere: the file by its full path, pinned by its hash
        named += [f"model.weights={cfg.model.weights.resolve()}", f"model.weights_sha256={cfg.model.weights_sha256}"]
    if old is not None:
        try:
            if not old.is_dir():
                raise CheckpointError(_("no run {run} on this server ({folder} does not exist)", run=resume, folder=old))
            if run_busy(old):
                raise CheckpointError(_("run {run} is still running on this server; nothing to resume", run=resume))
            done = inspect(old, cfg)
        except CheckpointError as exc:
            typer.echo(_("error: cannot resume: {reason}", reason=exc), err=True)
            raise typer.Exit(2) from None
        typer.echo(_("resuming run {run} after round {round} of {rounds}", run=resume, round=done, rounds=cfg.server.rounds))
    fed = fed or _federation(federation_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        run_id, final, local = start_run(fed, text, [*set_, *named], app or app_dir(), out, resume=resume)
    except (PermissionError, RuntimeError) as exc:
        typer.echo(_("error: {reason}", reason=exc), err=True)
        raise typer.Exit(1) from None
    label = (_("run {run} (continuing run {resumed})", run=run_id, resumed=resume) if resume is not None
             else _("run {run}", run=run_id))
    if final == "lost":
        from server.engine.checkpoint import round_of

        folder = resume if resume is not None else run_id
        done = round_of(run_folder(fed.server_dir / "runs", folder))
        kept = _("rounds 1-{round} are kept in its folder", round=done) if done else _("no round was finished")
        typer.echo(_("{run}: the server was lost (its SuperLink stopped answering); {kept}. Once `aseanfl server start` "
                     "runs again: aseanfl run -f {federation} --resume {folder}", run=label, kept=kept,
                     federation=federation_dir, folder=folder), err=True)
        raise typer.Exit(1)
    typer.echo(_("{run}: {status}", run=label, status=run_word(final) if final else _("status unknown")))
    if local is not None:
        from server.records.outputs import untrained

        report = local / "report.md"
        typer.echo(_("results: {folder}  (report: {report})", folder=local, report=report) if report.is_file()
                   else _("results: {folder}", folder=local))
        why = untrained(local)
        if why:  # every hospital refused or failed every round: the initial model is no result
            typer.echo(_("error: {run}: {reason}", run=label, reason=why), err=True)
            raise typer.Exit(1)
    if not final.endswith("completed"):
        raise typer.Exit(1)


def status(federation_dir: Path = FED_OPTION) -> None:
    """Hospitals (registered / online) and runs on the SuperLink."""
    from server.operations.control import status as read

    info = read(_federation(federation_dir))
    console = Console()
    nodes = Table(title=_("hospitals"))
    for col in (_("site"), _("node id"), _("status"), _("online at"), _("offline at"), _("last seen at the front")):
        nodes.add_column(col)
    for n in info["nodes"]:
        nodes.add_row(n.get("site", "?"), str(n.get("node-id")), node_word(n.get("status")), str(n.get("online-at") or ""),
                      str(n.get("offline-at") or ""), str(n.get("last-seen") or ""))
    console.print(nodes)
    runs = Table(title=_("runs"))
    for col in (_("run id"), _("status"), _("elapsed")):
        runs.add_column(col)
    for r in info["runs"]:
        runs.add_row(str(r.get("run-id")), run_word(r.get("status")), str(r.get("elapsed", "")))
    console.print(runs)
    for p in info["problems"]:
        console.print(f"[red]{p}[/]")
    if info["problems"]:
        raise typer.Exit(1)


def app_hash(app: Optional[Path] = typer.Option(None, help="the Flower App folder (default: this aseanfl)")) -> None:
    """sha256 of the app bundle a run sends: hospitals approve it with `aseanfl client approve`."""
    from server.operations.bundle import app_dir, app_hash as digest

    typer.echo(digest(app or app_dir()))


@server_app.command("console")
def console(
    federation_dir: Path = FED_OPTION,
    host: str = typer.Option("127.0.0.1", help="address to listen on; beyond loopback it serves TLS"),
    port: int = typer.Option(8480, help="port"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="TLS certificate (default off loopback: the "
                                                                     "server's, issued by the federation's CA)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="its private key (PEM)"),
    idle_minutes: float = typer.Option(30.0, "--idle-minutes", help="a session ends after this long without a request"),
) -> None:
    """The coordinator's web console: hospitals, runs (live, downloadable), start and stop runs."""
    from common.web import loopback
    from server.console import build_console

    from aseanfl.client_cli import serve_console

    fed = _federation(federation_dir)
    if not loopback(host) and tls_cert is None and tls_key is None:
        tls_cert, tls_key = fed.server_dir / "server.crt", fed.server_dir / "server.key"
    serve_console(lambda: build_console(fed), f"aseanfl server console-user -f {federation_dir}", host, port,
                  tls_cert, tls_key, idle_minutes)


@server_app.command("console-user")
def console_user(federation_dir: Path = FED_OPTION, name: str = typer.Argument(..., help="the user's login name")) -> None:
    """Add a console user, or set a user's password (asked twice; or the first line of stdin)."""
    from server.console import users_path

    from aseanfl.client_cli import set_console_user

    set_console_user(users_path(_federation(federation_dir)), name)


def console_cert(
    host: list[str] = typer.Option(..., "--host", help="a name or IP the console is reached at (repeat for more)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for console.crt and console.key"),
    ca_dir: Path = typer.Option(Path("federation-ca"), help="the federation's CA folder (with ca.key)"),
) -> None:
    """Issue a TLS certificate for a web console (hospital or coordinator) from the federation's CA.
    Browsers that trust the federation's ca.crt then trust the console."""
    from server.operations.provision import console_certificate

    try:
        crt, key = console_certificate(ca_dir, host, out)
    except (ValueError, OSError) as exc:
        typer.echo(_("error: {reason}", reason=exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"console certificate for {', '.join(host)}: {crt} (key {key}); "
               f"serve it with --tls-cert {crt} --tls-key {key}")
