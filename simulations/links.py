"""Hospitals behind network links of their own, on one machine: each hospital's daemon runs in a
Linux network namespace joined to the server's (this one) by a veth pair, so its traffic to the
federation front crosses a real interface that can be rate-limited (`tc ... tbf`, a provincial
uplink) or cut (`ip link set ... down`, a flapping link). Needs root and `ip`/`tc` (iproute2);
`unavailable()` says exactly what is missing. Everything made here is named with a random tag
and removed on exit, even after a failure (and leftovers of a killed run by `sweep()`)."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time

PREFIX = "aflk"  # namespaces and interfaces made here start with it


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    name = f"{PREFIX}probe{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def sweep() -> None:
    """Remove namespaces and interfaces a killed run of this module left behind."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in [n for n in listed if n.startswith(PREFIX)]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


class Links:
    """`count` hospital namespaces; hospital i reaches the server at `server_ip` over its own
    veth pair (server side `host(i)`, hospital side `far(i)` in namespace `ns(i)`)."""

    def __init__(self, count: int) -> None:
        self.count, self.tag = count, secrets.token_hex(2)
        self.net = random.randint(100, 199)  # 10.<net>.0.0/16, one /30 per hospital
        self.server_ip = f"10.{self.net}.255.1"

    def ns(self, i: int) -> str:
        return f"{PREFIX}{self.tag}-{i}"

    def host(self, i: int) -> str:
        return f"{PREFIX}{self.tag}h{i}"

    def far(self, i: int) -> str:
        return f"{PREFIX}{self.tag}n{i}"

    def command(self, i: int) -> list[str]:
        """Prefix that runs a command inside hospital i's namespace."""
        return ["ip", "netns", "exec", self.ns(i)]

    def __enter__(self) -> "Links":
        try:
            _ip("addr", "add", f"{self.server_ip}/32", "dev", "lo")
            for i in range(self.count):
                ns, host, far = self.ns(i), self.host(i), self.far(i)
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("link", "add", host, "type", "veth", "peer", "name", far, "netns", ns)
                _ip("addr", "add", f"10.{self.net}.{i}.1/30", "dev", host)
                _ip("link", "set", host, "up")
                _ip("addr", "add", f"10.{self.net}.{i}.2/30", "dev", far, ns=ns)
                _ip("link", "set", far, "up", ns=ns)
                _ip("route", "add", "default", "via", f"10.{self.net}.{i}.1", ns=ns)
        except subprocess.CalledProcessError as exc:
            self.__exit__()
            raise RuntimeError(f"setting up the hospitals' links failed: {' '.join(exc.cmd)}: {exc.stderr.strip()}") from None
        return self

    def limit(self, i: int, mbit: float | None) -> None:
        """Rate-limit hospital i's link both ways with a token bucket (None: no limit)."""
        for dev, ns in ((self.far(i), self.ns(i)), (self.host(i), None)):
            prefix = ["ip", "netns", "exec", ns] if ns else []
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if mbit is not None:
                subprocess.run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                                "burst", "32kbit", "latency", "400ms"], check=True, capture_output=True)

    def uplink_mbit(self, i: int, nbytes: int = 400_000) -> float:
        """Measured throughput from hospital i's namespace to the server (Mbit/s): a TCP upload
        of `nbytes`, timed at the receiving end."""
        got: dict[str, float] = {}
        with socket.socket() as server:
            server.bind((self.server_ip, 0))
            server.listen()
            server.settimeout(120)

            def receive() -> None:
                conn, _ = server.accept()
                with conn:
                    start, total = time.monotonic(), 0
                    while chunk := conn.recv(65536):
                        total += len(chunk)
                    got["seconds"], got["bytes"] = time.monotonic() - start, total

            reader = threading.Thread(target=receive)
            reader.start()
            code = (f"import socket; s = socket.create_connection(('{self.server_ip}', {server.getsockname()[1]})); "
                    f"s.sendall(bytes({nbytes})); s.close()")
            subprocess.run([*self.command(i), sys.executable, "-c", code], check=True, timeout=120)
            reader.join(timeout=120)
        return got["bytes"] * 8 / max(got["seconds"], 1e-6) / 1e6

    def cut(self, i: int) -> None:
        _ip("link", "set", self.host(i), "down")

    def restore(self, i: int) -> None:
        _ip("link", "set", self.host(i), "up")

    def __exit__(self, *exc) -> None:
        for i in range(self.count):
            _ip("link", "del", self.host(i), check=False)
            _ip("netns", "del", self.ns(i), check=False)
        _ip("addr", "del", f"{self.server_ip}/32", "dev", "lo", check=False)
