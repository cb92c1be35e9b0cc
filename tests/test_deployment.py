"""A real deployment on 127.0.0.1: `aseanfl provision`, `aseanfl server start` (SuperLink, TLS,
node authentication, state database), four `aseanfl client start` daemons (Flower SuperNodes)
each reading its own folder of PNG files, and `aseanfl run` (Flower's Control API). Three
hospitals approved the app, one did not; the server is restarted before the run, so the run
also shows that the daemons reconnect by themselves. Every process is stopped at the end."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medimaging.synthetic import site_images

BIN = Path(sys.executable).parent
APPROVED, UNAPPROVED = ["site-a", "site-b", "site-c"], "site-d"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _aseanfl(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aseanfl"), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def _write_pngs(root: Path, index: int) -> None:
    (x, y), _ = site_images(index, 11, 90, 10)
    for j, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = root / ("lesion" if label else "normal")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img).squeeze().astype(np.uint8)).save(folder / f"patient-{index}-{j:04d}.png")


class Processes:
    def __init__(self, logs: Path):
        self.logs, self.procs = logs, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(BIN / "aseanfl"), *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

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


def _online(fed: Path) -> set[str]:
    res = _aseanfl("status", "-f", str(fed), timeout=60)
    return {line.split()[1] for line in res.stdout.splitlines() if " online " in line and line.startswith("│")}


def _wait_online(fed: Path, sites: set[str], timeout: float = 90) -> set[str]:
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        seen = _online(fed)
        if sites <= seen:
            return seen
        time.sleep(2)
    return seen


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    fed = tmp / "federation"
    address = f"127.0.0.1:{_free_port()}"
    res = _aseanfl("provision", "--federation", "asean-test", "--sites", ",".join(APPROVED), "--out", str(fed),
                   "--address", address)
    assert res.returncode == 0, res.stderr
    # a hospital joining later: provisioning it leaves the others' keys alone
    before = (fed / "sites" / "site-a" / "node.key").read_bytes()
    res = _aseanfl("provision", "--federation", "asean-test", "--sites", f"site-a,{UNAPPROVED}", "--out", str(fed),
                   "--address", address)
    assert res.returncode == 0 and f"{UNAPPROVED}" in res.stdout and "kept" in res.stdout, res.stdout
    assert (fed / "sites" / "site-a" / "node.key").read_bytes() == before

    app_hash = _aseanfl("app-hash").stdout.strip()
    assert len(app_hash) == 64
    for i, site in enumerate([*APPROVED, UNAPPROVED]):
        kit = fed / "sites" / site
        _write_pngs(tmp / "pacs" / site, i)
        text = (kit / "site.yaml").read_text().replace("/path/to/pacs-export", str(tmp / "pacs" / site))
        text = text.replace("  image_size: 64", "  image_size: 32")
        text = text.replace("  node_key: node.key\n", f"  node_key: node.key\n  runtime_port: {_free_port()}\n")
        if site != "site-a":  # site-a trains with DP-SGD (the template's default), the others without
            text = text.replace("  enabled: true", "  enabled: false")
        (kit / "site.yaml").write_text(text)
        if site != UNAPPROVED:
            res = _aseanfl("client", "approve", "-c", str(kit / "site.yaml"), "--sha256", app_hash)
            assert res.returncode == 0, res.stderr

    procs = Processes(tmp)
    try:
        procs.start("server", "server", "start", "-f", str(fed))
        for site in [*APPROVED, UNAPPROVED]:
            procs.start(site, "client", "start", "-c", str(fed / "sites" / site / "site.yaml"))
        assert _wait_online(fed, {*APPROVED, UNAPPROVED}) >= {*APPROVED, UNAPPROVED}
        procs.stop("server")  # the coordinator restarts its server: the hospitals find it again
        procs.start("server", "server", "start", "-f", str(fed))
        started = time.monotonic()
        run = _aseanfl("run", "-f", str(fed), "--rounds", "2", "--set", "task.image_size=32", "--set", "wait_for_sites=4",
                       "--set", "wait_timeout_s=120", "--out", str(tmp / "results"), timeout=480, cwd=tmp)
        seconds = time.monotonic() - started
        rogue = _rogue_supernode(tmp, fed, address)
        yield {"fed": fed, "tmp": tmp, "run": run, "seconds": seconds, "rogue": rogue, "hash": app_hash}
    finally:
        procs.stop_all()


def _rogue_supernode(tmp: Path, fed: Path, address: str) -> subprocess.CompletedProcess:
    """A node key the coordinator never registered, with the right CA: it must not get in."""
    from server.provision import provision

    other, _ = provision(tmp / "rogue", "rogue", ["intruder"], address)
    return subprocess.run(
        [str(BIN / "flower-supernode"), "--superlink", address, "--root-certificates", str(fed / "ca" / "ca.crt"),
         "--auth-supernode-private-key", str(other.site_kit("intruder") / "node.key"), "--max-retries", "1",
         "--isolation", "process", "--port", str(_free_port())],
        capture_output=True, text=True, timeout=120)


def _rows(results: Path) -> list[dict]:
    run_dir = next(results.glob("run-*"))
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_rounds_complete_and_results_download(deployed):
    run = deployed["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "finished:completed" in run.stdout
    run_dir = next((deployed["tmp"] / "results").glob("run-*"))
    for name in ("model.safetensors", "metrics.csv", "report.md", "summary.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    rows = _rows(deployed["tmp"] / "results")
    for rnd in ("1", "2"):
        ok = {r["site"] for r in rows if r["round"] == rnd and r["status"] == "ok" and r["val_auc"]}
        assert ok == set(APPROVED), (rnd, ok)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"deployed: {len(summary['round_seconds'])} rounds, round seconds {summary['round_seconds']}, "
          f"whole run incl. waiting {deployed['seconds']:.1f} s")


def test_unapproved_app_is_refused_by_the_hospital(deployed):
    rows = _rows(deployed["tmp"] / "results")
    refused = [r for r in rows if r["site"].startswith("node-")]
    assert refused and all(r["status"] == "error" for r in refused)
    assert "is not approved by hospital site-d" in deployed["run"].stdout
    # the bundle was never unpacked at site-d
    apps = deployed["fed"] / "sites" / UNAPPROVED / "state" / "flwr-home" / "apps"
    assert not apps.exists() or not any(apps.iterdir())


def test_unregistered_key_is_refused(deployed):
    rogue = deployed["rogue"]
    assert rogue.returncode != 0
    assert "Failed to activate SuperNode" in rogue.stdout + rogue.stderr


def test_audit_log_covers_every_round_and_holds_nothing_forbidden(deployed):
    fed = deployed["fed"]
    for site in APPROVED:
        res = _aseanfl("client", "audit", "-c", str(fed / "sites" / site / "site.yaml"))
        assert res.returncode == 0, res.stdout
        entries = [json.loads(line) for line in (fed / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert {(e["round"], e["type"]) for e in entries} == {(r, t) for r in ("1", "2") for t in ("train", "evaluate")}
        assert all(set(e["records"]) <= {"arrays", "metrics", "site"} for e in entries)
        raw = (fed / "sites" / site / "audit.jsonl").read_text()
        assert "patient-" not in raw and "pacs" not in raw
    # the refusing hospital logged its error replies, which carry no data
    res = _aseanfl("client", "audit", "-c", str(fed / "sites" / UNAPPROVED / "site.yaml"))
    assert res.returncode == 0, res.stdout


def test_audit_detects_an_edited_log(deployed, tmp_path):
    fed = deployed["fed"]
    kit = fed / "sites" / "site-b"
    lines = (kit / "audit.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    entry["records"]["metrics"]["entries"]["patient-name"] = "DOE^JANE"  # something that must not leave
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text((kit / "site.yaml").read_text().replace("audit_log: audit.jsonl", f"audit_log: {tmp_path / 'audit.jsonl'}")
                         .replace("approved_apps: approved-apps.yaml", f"approved_apps: {kit / 'approved-apps.yaml'}"))
    (tmp_path / "audit.jsonl").write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    res = _aseanfl("client", "audit", "-c", str(site_yaml))
    assert res.returncode == 1
    assert "hash chain breaks" in res.stdout and "metrics.patient-name is not an allowed key" in res.stdout
