"""What the hospital console's daemon page reads: state/daemon.json, written by the daemon at
each change (connected, waiting for the server, refused at its door, stopped), and
state/last-task.json, written by the warm worker after each task. Local files; nothing is sent."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from client.config import SiteConfig


def _path(site: SiteConfig, name: str) -> Path:
    return site.state_dir / f"{name}.json"


def write(site: SiteConfig, name: str, **values) -> None:
    path = _path(site, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**values, "updated": time.time()}) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a full disk must not stop the daemon or a task; the page then shows older news


def read(site: SiteConfig, name: str) -> dict:
    try:
        return json.loads(_path(site, name).read_text())
    except (OSError, ValueError):
        return {}


def alive(pid) -> bool:
    """The process runs (the daemon may run under another account than the console: EPERM is alive)."""
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True
    except (OSError, TypeError, ValueError):
        return False
    return True
