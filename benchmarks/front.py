"""What the federation's front (nginx: mutual TLS, Fleet API allow-list) adds per round.

Two numbers, measured in one run on this machine: the latency of one real, signed Fleet API call
(SendNodeHeartbeat of a registered hospital, on a kept-alive connection as the SuperNode makes
it) through the front vs straight to the SuperLink's loopback port; and a new mutual-TLS
connection through the front vs a plain-TLS one to the SuperLink. Multiplied by the Fleet
requests a hospital makes per round (benchmarks/deployment.py counts them in the front's access
log), that is the front's cost per round.

    python -m benchmarks.front [--calls 300]

Calls are paced below the front's per-certificate rate (server.operations.front.RATE_PER_S): a hospital's
SuperNode never sends faster, and a faster loop would measure the limit's 429s instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from client.operations.gate import mutual_tls
from server.operations.front import RATE_PER_S
from simulations.local_deployment import LocalDeployment

GAP_S = 1.5 / RATE_PER_S  # between the starts of two calls: two thirds of the allowed rate


def _paced(calls: int):
    """Yield `calls` times, at most one call per GAP_S."""
    for _ in range(calls):
        start = time.perf_counter()
        yield
        time.sleep(max(0.0, GAP_S - (time.perf_counter() - start)))


def _client(address: str, kit: Path, ca: Path):
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    context = mutual_tls(ca, kit / "client.crt", kit / "client.key")
    key = load_ssh_private_key((kit / "node.key").read_bytes(), None)
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperNode"), NodeAuthHttpInterceptor(key, key.public_key())]
    return FleetHttpClient(f"https://{address}", interceptors=interceptors, verify=context)


def _activate(address: str, kit: Path, ca: Path) -> int:
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key = load_ssh_private_key((kit / "node.key").read_bytes(), None)
    with _client(address, kit, ca) as client:
        return client.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()),
                                                       heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL)).node_id


def _heartbeats(address: str, kit: Path, ca: Path, calls: int, node_id: int) -> list[float]:
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node

    seconds = []
    with _client(address, kit, ca) as client:
        for _ in _paced(calls):
            start = time.perf_counter()
            res = client.SendNodeHeartbeat(SendNodeHeartbeatRequest(node=Node(node_id=node_id),
                                                                    heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL))
            seconds.append(time.perf_counter() - start)
            assert res.success
    return seconds


def _connects(address: str, kit: Path, ca: Path, calls: int, node_id: int) -> list[float]:
    """A new TLS connection (handshake with the client certificate) and one small request."""
    context = mutual_tls(ca, kit / "client.crt", kit / "client.key")
    seconds = []
    for _ in _paced(calls):
        start = time.perf_counter()
        with httpx.Client(verify=context) as client:
            client.get(f"https://{address}/aseanfl/door")
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalDeployment(Path(tmp), ["site-a"], "bench") as dep:
        assert dep.provision().returncode == 0
        dep.start_server()
        kit, ca = dep.kit("site-a"), dep.fed / "server" / "ca.crt"
        direct = f"127.0.0.1:{dep.local_port}"
        node_id = _activate(dep.address, kit, ca)
        rows = []
        for what, fn in (("signed Fleet call, kept-alive connection", _heartbeats), ("new TLS connection + request", _connects)):
            fn(dep.address, kit, ca, 20, node_id)  # warm up both paths
            fn(direct, kit, ca, 20, node_id)
            front = statistics.median(fn(dep.address, kit, ca, args.calls, node_id)) * 1000
            plain = statistics.median(fn(direct, kit, ca, args.calls, node_id)) * 1000
            rows.append((what, front, plain))
    print(f"median of {args.calls} calls each, ms (front = nginx, mutual TLS; direct = the SuperLink's loopback port); "
          f"{os.cpu_count()} CPU cores")
    print("| what | via the front | direct | added |\n|---|---|---|---|")
    for what, front, plain in rows:
        print(f"| {what} | {front:.2f} | {plain:.2f} | {front - plain:+.2f} |")


if __name__ == "__main__":
    main()
