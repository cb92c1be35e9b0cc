"""What an outsider, a curious hospital and a local user try against a deployed federation
(helpers for test_deployment.py, which holds the one shared deployment)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import tomli_w

from simulations.local_deployment import BIN

# Control and Runtime API paths of Flower 1.41's SuperLink, and the Fleet API's own node (un)registration
CONTROL = ["start-run", "list-runs", "stop-run", "stream-logs", "pull-artifacts", "register-node", "unregister-node",
           "list-nodes", "add-app", "start-automation"]
RUNTIME = ["acquire-task", "pull-task-input", "create-task", "push-task-output"]
PATHS = [f"/v1/control/{p}" for p in CONTROL] + [f"/v1/runtime/{p}" for p in RUNTIME] + \
        ["/v1/fleet/register-node", "/v1/fleet/unregister-node", "/docs", "/health", "/aseanfl/door"]


def marker_app(folder: Path, marker: Path) -> Path:
    """A Flower App whose mere import writes `marker`: if it ever runs, the file appears."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "takeover"\nversion = "1.0.0"\ndescription = "x"\nlicense = "MIT"\ndependencies = []\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "mallory"\n'
        '[tool.flwr.app.components]\nserverapp = "takeover:app"\nclientapp = "takeover:app"\n')
    (folder / "takeover.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\napp = None\n")
    return folder


def flwr_as(home: Path, address: str, ca: Path | None, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `flwr` CLI with a connection of its own to `address` (the outsider's, or the local user's)."""
    home.mkdir(parents=True, exist_ok=True)
    conn = {"address": address, **({"root-certificates": str(ca)} if ca else {"insecure": True})}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "target", "target": conn}}))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def post(address: str, path: str, ca: Path | bool, cert: tuple[Path, Path] | None = None,
         body: bytes = b"") -> httpx.Response:
    """One protobuf-over-HTTP POST as Flower's clients send it (ca=False: no server check, like curl -k)."""
    import ssl

    from client.gate import mutual_tls

    if cert:
        context = mutual_tls(ca, *cert)
    else:
        context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    with httpx.Client(verify=context, timeout=30) as client:
        return client.post(f"https://{address}{path}", content=body,
                           headers={"content-type": "application/protobuf", "accept": "application/protobuf"})
