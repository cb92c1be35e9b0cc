"""A whole deployment on one machine (loopback): provisioned federation, `aseanfl server start`,
one `aseanfl client start` daemon per hospital reading its own folder of PNG files. For trying
the deployment out, for its tests and for the deployed-vs-simulated benchmark. Every process is
started in its own session and stopped (with its children) on exit.

Hospitals enroll as in production (docs/hospital.md): each one's keys are made in its own folder
(`hospitals/<site>`, which stands for the hospital's machine) by `aseanfl client enroll`, the
coordinator signs the request into `federation/sites/<site>` (no private key) and the hospital
installs that kit with `aseanfl client install-kit`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medimaging.synthetic import site_images

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aseanfl(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aseanfl"), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def write_pngs(root: Path, index: int, samples: int = 90, seed: int = 11) -> None:
    """A synthetic hospital export: one folder per class of 8-bit PNGs (the images are floats in
    [0, 1]: scaled to 0-255, never blank)."""
    (x, y), _ = site_images(index, seed, samples, 10)
    pixels = np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    assert pixels.std() > 5, "synthetic hospital images came out blank"
    for j, (img, label) in enumerate(zip(pixels, y, strict=True)):
        folder = root / ("lesion" if label else "normal")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.squeeze()).save(folder / f"patient-{index}-{j:04d}.png")


class LocalDeployment:
    def __init__(self, root: Path, sites: list[str], name: str = "local", host: str = "127.0.0.1"):
        """`host`: the front's address (another loopback address, e.g. 127.0.0.2, stands for the
        server's public interface); the SuperLink itself is on 127.0.0.1 at `local_port`."""
        self.root, self.sites, self.name = root, sites, name
        self.fed = root / "federation"
        self.address = f"{host}:{free_port()}"
        self.local_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    def provision(self, sites: list[str] | None = None) -> subprocess.CompletedProcess:
        """Create the federation if need be and enroll the hospitals not enrolled yet; the
        provision command's result (its stdout has every step's lines; a failed step's result
        is returned as it is)."""
        from common.enrollment import REQUEST

        said, new = [], [s for s in sites or self.sites if not (self.kit(s) / "node.key").exists()]
        for site in new:
            res = aseanfl("client", "enroll", "--site", site, "--dir", str(self.kit(site)))
            if res.returncode != 0:
                return res
            said.append(res.stdout)
        requests = [arg for site in new for arg in ("--enroll", str(self.kit(site) / REQUEST))]
        res = aseanfl("provision", "--federation", self.name, *requests, "--out", str(self.fed), "--address",
                      self.address, "--local-port", str(self.local_port))
        if res.returncode != 0:
            return res
        said.append(res.stdout)
        for site in new:
            installed = aseanfl("client", "install-kit", "--kit", str(self.fed / "sites" / site), "--dir", str(self.kit(site)))
            if installed.returncode != 0:
                return installed
            said.append(installed.stdout)
        return subprocess.CompletedProcess(res.args, 0, "".join(said), res.stderr)

    def kit(self, site: str) -> Path:
        """The hospital's own folder: its keys, site.yaml, audit log and state (its machine)."""
        return self.root / "hospitals" / site

    def prepare_site(self, site: str, index: int, image_size: int = 32, dp: bool = False, samples: int = 90,
                     threads: int | None = 1) -> Path:
        """Write the site's images and fill in its site.yaml; returns the site.yaml. `threads`:
        its compute.threads (1: the hospitals share this one machine, as simulated ones do;
        None: the kit's default, every core)."""
        data = self.root / "pacs" / site
        write_pngs(data, index, samples)
        path = self.kit(site) / "site.yaml"
        text = path.read_text().replace("/path/to/pacs-export", str(data))
        text = text.replace("  image_size: 64", f"  image_size: {image_size}")
        text = text.replace("  node_key: node.key\n", f"  node_key: node.key\n  runtime_port: {free_port()}\n", 1)
        if not dp:
            text = text.replace("  enabled: true", "  enabled: false")
        if threads is not None:
            text = text.replace("  # threads: 8 ", f"  threads: {threads}  ", 1)
        path.write_text(text)
        return path

    def approve(self, site: str, sha256: str) -> subprocess.CompletedProcess:
        return aseanfl("client", "approve", "-c", str(self.kit(site) / "site.yaml"), "--sha256", sha256)

    def start(self, name: str, *args: str, prefix: list[str] | tuple = ()) -> subprocess.Popen:
        """`prefix`: e.g. `ip netns exec NS` (simulations.links), which execs into the command."""
        with open(self.root / f"{name}.log", "ab") as out:
            proc = subprocess.Popen([*prefix, str(BIN / "aseanfl"), *args], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_console(self, name: str, *args: str, timeout: float = 60) -> str:
        """Start a web console (`server console -f ...` or `client console -c ...`) on a free
        loopback port; its address once it answers."""
        import httpx

        port = free_port()
        proc = self.start(name, *args, "--port", str(port))
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(url + "/login", timeout=2)
                return url
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"the console {name} did not come up; see {self.root / (name + '.log')}")

    def start_server(self, timeout: float = 120) -> None:
        """Start the server and wait until it has registered every provisioned hospital (a SuperNode
        that connects before that is refused and retries with Flower's growing back-off)."""
        log = self.root / "server.log"
        ready = "registered hospitals only"  # run_server's line once registration is done
        before = log.read_text(errors="replace").count(ready) if log.exists() else 0
        proc = self.start("server", "server", "start", "-f", str(self.fed))
        deadline = time.monotonic() + timeout
        while log.read_text(errors="replace").count(ready) <= before:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up; see {log}")
            time.sleep(0.3)

    def start_site(self, site: str, prefix: list[str] | tuple = ()) -> None:
        self.start(site, "client", "start", "-c", str(self.kit(site) / "site.yaml"), prefix=prefix)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def online(self) -> set[str]:
        res = aseanfl("status", "-f", str(self.fed), timeout=60)
        return {line.split()[1] for line in res.stdout.splitlines() if " online " in line and line.startswith("│")}

    def wait_online(self, sites: set[str], timeout: float = 120) -> set[str]:
        deadline, seen = time.monotonic() + timeout, set()
        while time.monotonic() < deadline:
            seen = self.online()
            if sites <= seen:
                return seen
            time.sleep(2)
        return seen

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return aseanfl("run", "-f", str(self.fed), "--out", str(self.root / "results"), *args, timeout=timeout,
                       cwd=self.root)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
