"""What an outsider, a curious hospital and a local user try against a deployed federation
(helpers for test_deployment.py, which holds the one shared deployment)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import tomli_w

from simulations.local_deployment import BIN

# Control and Runtime API paths of Flower 1.41-1.42's SuperLink, and the Fleet API's own node (un)registration
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

    from client.operations.gate import mutual_tls

    if cert:
        context = mutual_tls(ca, *cert)
    else:
        context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    with httpx.Client(verify=context, timeout=30) as client:
        return client.post(f"https://{address}{path}", content=body,
                           headers={"content-type": "application/protobuf", "accept": "application/protobuf"})


def signed_headers(node_key: Path) -> dict[str, str]:
    """Flower's SuperNode authentication headers, signed with `node_key` (an OpenSSH EC key)."""
    from base64 import b64encode

    from cryptography.hazmat.primitives import serialization
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = serialization.load_ssh_private_key(node_key.read_bytes(), None)
    stamp = now().isoformat()
    return {FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public_key_to_bytes(key.public_key())).decode("ascii"),
            TIMESTAMP_HEADER: stamp, FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(key, stamp.encode("ascii"))).decode()}


def fleet_post(address: str, path: str, ca: Path, cert: tuple[Path, Path], node_key: Path, body: bytes) -> httpx.Response:
    """A Fleet API call as a SuperNode makes it: mutual TLS with `cert`, signed with `node_key`."""
    from client.operations.gate import mutual_tls

    headers = {"content-type": "application/protobuf", "accept": "application/protobuf", **signed_headers(node_key)}
    with httpx.Client(verify=mutual_tls(ca, *cert), timeout=60) as client:
        return client.post(f"https://{address}{path}", content=body, headers=headers)


def raw_post(address: str, path: str, ca: Path, cert: tuple[Path, Path], size: int, chunked: bool = False,
             headers: dict[str, str] | None = None) -> str:
    """POST `size` bytes of junk (announced with Content-Length, or sent chunked) with a member's
    certificate, as far as the server lets it; the status line and body it answered."""
    import socket

    from client.operations.gate import mutual_tls

    host, port = address.rsplit(":", 1)
    piece = os.urandom(1 << 20)
    with socket.create_connection((host, int(port)), timeout=60) as raw, \
            mutual_tls(ca, *cert).wrap_socket(raw, server_hostname=host) as tls:
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        tls.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/protobuf\r\n{extra}{length}"
                    "\r\nConnection: close\r\n\r\n".encode())
        sent = 0
        try:
            while sent < size:
                tls.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                tls.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading: its answer is what counts
        said = b""
        try:
            while chunk := tls.recv(65536):
                said += chunk
                if b"\r\n\r\n" in said and len(said) > 200:
                    break
        except OSError:
            pass
    return said.decode(errors="replace")


def rss_mib(pid: int) -> float:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def forged_reply(state_db: Path, victim: int, signer: int) -> bytes | None:
    """A push-messages request, to be signed by node `signer`, answering the newest task of
    node `victim` that is still open, in the victim's name (its task id is read from the
    SuperLink's database: a leaked id); None while the victim has no task."""
    import sqlite3

    from flwr.app import Error, Message, Metadata, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_object_tree

    signed = victim - (1 << 64) if victim >= 1 << 63 else victim  # SQLite keeps node ids as signed 64-bit
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=10) as db:
        found = db.execute("SELECT message_id, run_id, group_id, message_type, created_at, ttl FROM message_ins "
                           "WHERE dst_node_id = ? AND message_id NOT IN (SELECT reply_to_message_id FROM message_res) "
                           "ORDER BY created_at DESC LIMIT 1", (signed,)).fetchone()
    if found is None:
        return None
    task_id, run_id, group_id, message_type, created_at, ttl = found
    run_id += (1 << 64) if run_id < 0 else 0  # signed in SQLite, unsigned on the wire
    task = Message(metadata=Metadata(run_id=run_id, message_id=task_id, src_node_id=0, dst_node_id=victim,
                                     reply_to_message_id="", group_id=group_id, created_at=created_at, ttl=ttl,
                                     message_type=message_type), content=RecordDict())
    reply = Message(Error(code=0, reason=f"answered by node {signer} in node {victim}'s name"), reply_to=task)
    reply.metadata.__dict__["_message_id"] = reply.object_id  # as a SuperNode names what it pushes
    assert reply.metadata.src_node_id == victim and reply.metadata.reply_to_message_id == task_id
    request = PushMessagesRequest(node=Node(node_id=signer), messages_list=[message_to_proto(reply)],
                                  message_object_trees=[get_object_tree(reply)])
    return request.SerializeToString()
