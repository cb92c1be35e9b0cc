"""A real deployment on 127.0.0.1: `aseanfl provision`, `aseanfl server start` (SuperLink, TLS,
node authentication, state database), four `aseanfl client start` daemons (Flower SuperNodes)
each reading its own folder of PNG files, and `aseanfl run` (Flower's Control API). Three
hospitals approved the app, one did not; the server is restarted before the run, so the run
also shows that the daemons reconnect by themselves. Every process is stopped at the end."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest
from processes import live_processes

from simulations.local_deployment import BIN, LocalDeployment, aseanfl, free_port

APPROVED, UNAPPROVED = ["site-a", "site-b", "site-c"], "site-d"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    with LocalDeployment(tmp, APPROVED, "asean-test") as dep:
        assert dep.provision().returncode == 0
        # a hospital joining later: provisioning it leaves the others' keys alone
        before = (dep.kit("site-a") / "node.key").read_bytes()
        res = dep.provision(["site-a", UNAPPROVED])
        assert res.returncode == 0 and UNAPPROVED in res.stdout and "kept" in res.stdout, res.stdout
        assert (dep.kit("site-a") / "node.key").read_bytes() == before
        app_hash = aseanfl("app-hash").stdout.strip()
        assert len(app_hash) == 64
        for i, site in enumerate([*APPROVED, UNAPPROVED]):
            dep.prepare_site(site, i, dp=site == "site-a")  # site-a trains with DP-SGD, the others without
            if site != UNAPPROVED:
                assert dep.approve(site, app_hash).returncode == 0
        dep.start_server()
        for site in [*APPROVED, UNAPPROVED]:
            dep.start_site(site)
        assert dep.wait_online({*APPROVED, UNAPPROVED}) >= {*APPROVED, UNAPPROVED}
        dep.stop("server")  # the coordinator restarts its server: the hospitals find it again
        dep.start_server()
        started = time.monotonic()
        run = dep.run("--rounds", "2", "--set", "task.image_size=32", "--set", "wait_for_sites=4",
                      "--set", "wait_timeout_s=120", timeout=480)
        seconds = time.monotonic() - started
        rogue = _rogue_supernode(tmp, dep.fed, dep.address)
        yield {"fed": dep.fed, "tmp": tmp, "run": run, "seconds": seconds, "rogue": rogue, "hash": app_hash}
    time.sleep(2)
    assert _processes_using(tmp) == [], "processes left running after the deployment test"


def _processes_using(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (servers, daemons, SuperNodes, app processes)."""
    return [cmd for _, cmd in live_processes().values() if str(folder) in cmd]


def _rogue_supernode(tmp: Path, fed: Path, address: str) -> subprocess.CompletedProcess:
    """A node key the coordinator never registered, with the right CA: it must not get in."""
    from server.provision import provision

    other, _ = provision(tmp / "rogue", "rogue", ["intruder"], address)
    return subprocess.run(
        [str(BIN / "flower-supernode"), "--superlink", address, "--root-certificates", str(fed / "ca" / "ca.crt"),
         "--auth-supernode-private-key", str(other.site_kit("intruder") / "node.key"), "--max-retries", "1",
         "--isolation", "process", "--port", str(free_port())],
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
        res = aseanfl("client", "audit", "-c", str(fed / "sites" / site / "site.yaml"))
        assert res.returncode == 0, res.stdout
        entries = [json.loads(line) for line in (fed / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert {(e["round"], e["type"]) for e in entries} == {(r, t) for r in ("1", "2") for t in ("train", "evaluate")}
        assert all(set(e["records"]) <= {"arrays", "metrics", "site"} for e in entries)
        raw = (fed / "sites" / site / "audit.jsonl").read_text()
        assert "patient-" not in raw and "pacs" not in raw
    # the refusing hospital logged its error replies, which carry no data
    res = aseanfl("client", "audit", "-c", str(fed / "sites" / UNAPPROVED / "site.yaml"))
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
    res = aseanfl("client", "audit", "-c", str(site_yaml))
    assert res.returncode == 1
    assert "hash chain breaks" in res.stdout and "metrics.patient-name is not an allowed key" in res.stdout


def test_run_config_errors_are_named_before_anything_is_sent(tmp_path):
    bad = tmp_path / "federation.yaml"
    bad.write_text("task:\n  num_classes: 1\nstrategy:\n  name: fedsomething\n")
    res = aseanfl("run", "-f", str(tmp_path / "nowhere"), "--config", str(bad), "--set", "server.rounds=0")
    assert res.returncode == 2
    for field in ("task.num_classes", "strategy.name", "server.rounds"):
        assert f"config error: {field}" in res.stderr, res.stderr
