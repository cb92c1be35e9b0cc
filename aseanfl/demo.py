"""`aseanfl demo`: the whole deployment on this machine, for a coordinator trying aseanfl before
following the production steps (docs/coordinator.md). Like NVFlare's POC mode: a federation on
loopback whose hospitals enroll as in production (their keys made in their own folders),
synthetic images at each hospital, the server (nginx front, SuperLink, executor), a daemon per
hospital and the web consoles. It starts no run: it prints the command, and Ctrl-C stops every
process it started."""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import typer

from common.i18n import _

HOSPITALS = ["nanning", "hanoi", "bangkok", "kuala-lumpur", "jakarta", "manila", "phnom-penh", "yangon"]


def _say(line: str) -> None:
    typer.echo(line)


def _fail(line: str, code: int = 2) -> None:
    typer.echo(_("error: {reason}", reason=line), err=True)
    raise typer.Exit(code)


def _user(users: Path, name: str) -> str:
    """A console user with a password made for this demo, shown once (`users`: the console's file)."""
    from common.logins import add_user

    password = secrets.token_urlsafe(12)
    add_user(users, name, password)
    return password


def demo(
    hospitals: int = typer.Option(3, "--hospitals", min=1, max=len(HOSPITALS), help="how many hospitals"),
    folder: Path = typer.Option(Path("aseanfl-demo"), "--dir", help="where the demo keeps everything (a new folder)"),
    images: int = typer.Option(150, "--images", min=20, max=2000, help="synthetic images at each hospital"),
) -> None:
    """The whole deployment on this machine: a federation on 127.0.0.1, the server, a daemon per
    hospital with synthetic images, and both web consoles. Starts no run; Ctrl-C stops it all."""
    from client.config import load_site
    from common.logins import ConsoleError
    from medimaging.yamlconfig import ConfigError
    from client.operations.console import users_path as site_users
    from server.console import users_path as server_users
    from server.operations.provision import load_federation
    from simulations.local_deployment import LocalDeployment, aseanfl

    if folder.exists() and any(folder.iterdir()):
        _fail(_("{folder} is not empty: remove it, or pass --dir with a new folder", folder=folder))
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        _fail(_("nginx is not installed (the server's front): apt-get install nginx"))
    sites = HOSPITALS[:hospitals]
    root = folder.resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(_("{folder} cannot be made ({reason})", folder=root, reason=exc.strerror))
    stop = threading.Event()
    with LocalDeployment(root, sites, "demo") as dep:
        try:
            _say(_("provisioning a federation of {count} hospitals in {folder} ...", count=len(sites), folder=root))
            done = dep.provision()
            if done.returncode != 0:
                _fail((done.stderr or done.stdout).strip().splitlines()[-1], 1)
            digest = aseanfl("app-hash").stdout.strip()
            aseanfl("server", "approve", "-f", str(dep.fed), "--sha256", digest, "--note", "aseanfl demo")
            for i, site in enumerate(sites):
                dep.prepare_site(site, i, samples=images)
                dep.approve(site, digest)  # in production each hospital's steward decides this
            _say(_("starting the server and {count} hospital daemons ...", count=len(sites)))
            dep.start_server()
            for site in sites:
                dep.start_site(site)
            online = dep.wait_online(set(sites))
            if not set(sites) <= online:
                _fail(_("not every hospital came online: see the logs in {folder}", folder=root), 1)
            # a console needs its first user before it starts
            password = _user(server_users(load_federation(dep.fed)), "coordinator")
            logins = [(_("coordinator"), dep.start_console("console-server", "server", "console", "-f", str(dep.fed)),
                       "coordinator", password)]
            for site in sites:
                config = dep.kit(site) / "site.yaml"
                password = _user(site_users(load_site(config)), "steward")
                logins.append((site, dep.start_console(f"console-{site}", "client", "console", "-c", str(config)),
                               "steward", password))
        except typer.Exit:  # a line was said already (typer's Exit is a RuntimeError too)
            raise
        except (RuntimeError, OSError, ValueError, ConsoleError, ConfigError, subprocess.SubprocessError) as exc:
            _fail(str(exc), 1)
        except KeyboardInterrupt:  # Ctrl-C while it starts: stop what has started
            _say(_("stopping ..."))
            raise typer.Exit(130) from None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        _say(_("ready: {count} hospitals online ({sites}); no run has started.", count=len(sites), sites=", ".join(sites)))
        _say(_("web consoles (user and a password made for this demo, shown once):"))
        for who, url, user, password in logins:
            _say(f"  {who:<14} {url}   {user} / {password}")
        _say(_("start a run:"))
        _say(f"  aseanfl run -f {dep.fed} --out {root / 'results'} --rounds 3 --set task.image_size=32")
        _say(_("logs: {folder}/*.log; hospitals' folders: {folder}/hospitals; Ctrl-C stops everything.", folder=root))
        while not stop.wait(1.0):
            gone = [n for n, p in dep.procs.items() if p.poll() is not None]
            if gone:
                _say(_("stopped by itself: {names}; see their logs in {folder}", names=", ".join(gone), folder=root))
                break
        _say(_("stopping ..."))
    _say(_("stopped: every process the demo started has ended."))
