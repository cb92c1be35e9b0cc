"""A hospital whose data folder disappears or whose disk fills up mid-run answers with an error
that names no file (or refuses to train), loses nothing, and trains again once the problem is
gone, while the round goes on with the others. The real round loop and the deployed hospital's
ClientApp (site.yaml, its own PNG files) on an in-process grid; the full disk is a real tmpfs
(needs root: it says so where missing, and fails instead in CI)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from types import SimpleNamespace

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from inprocess import Collect, InProcessGrid, site_yaml

from client.training.app import app as deployed_app
from client.operations.audit import AuditLog, verify
from client.config import load_site
from client.operations.gate import AuditUnwritable, audited_push
from client.training.site import SITE_CONFIG_KEY
from client.operations.warm import AUDIT_DOWN, TaskRunner
from server.engine.rounds import run_federation
from server.records.outputs import read_rows
from simulations.config import load_config
from simulations.runner import prepare_run


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: `fill()` leaves it with no space, `free()` makes room again."""
    reason = None if os.geteuid() == 0 else "mounting a small tmpfs (a disk that fills up) needs root"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the full-disk tests: {reason}")
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)

    def fill():
        with open(disk / "filler", "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        probe = disk / "probe"
        with pytest.raises(OSError):
            probe.write_bytes(b"x" * 8192)  # really full
        probe.unlink(missing_ok=True)

    try:
        yield SimpleNamespace(path=disk, fill=fill, free=lambda: (disk / "filler").unlink(missing_ok=True))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_data_folder_gone_and_full_disk_mid_run_are_answered_and_the_hospital_comes_back(tmp_path, full_disk):
    sites = {"site-a": site_yaml(tmp_path, "site-a", 0, tmp_path / "site-a" / "state", dp=False),
             "site-b": site_yaml(tmp_path, "site-b", 1, full_disk.path / "state", dp=True),
             "site-c": site_yaml(tmp_path, "site-c", 2, tmp_path / "site-c" / "state", dp=False)}
    cfg = load_config(None, {"sites": 3, "server.rounds": 3, "train.local_epochs": 1, "data.image_size": 32,
                             "server.output_dir": str(tmp_path / "runs"), "strategy.min_sites": 1})
    plan = prepare_run(cfg)
    plan.progress = Collect()
    plan.node_names = {100 + i: name for i, name in enumerate(sites)}
    folder_a = load_site(sites["site-a"]).data.root
    ledger = full_disk.path / "state" / "privacy"

    def before(message):  # round 2: site-a's images are unmounted, site-b's disk is full; round 3: both back
        rnd, kind = int(message.metadata.group_id), message.metadata.message_type
        if (rnd, kind, message.metadata.dst_node_id) == (2, MessageType.TRAIN, 100):
            folder_a.rename(folder_a.with_name("site-a-unmounted"))
            full_disk.fill()
        if (rnd, kind, message.metadata.dst_node_id) == (3, MessageType.TRAIN, 100):
            folder_a.with_name("site-a-unmounted").rename(folder_a)
            full_disk.free()

    grid = InProcessGrid(deployed_app, 3, before)
    for nid, path in zip(grid.contexts, sites.values(), strict=True):
        grid.contexts[nid].node_config = {SITE_CONFIG_KEY: str(path)}
    run_federation(grid, plan)

    rows = {(r["round"], r["site"]): r for r in read_rows(plan.run_dir)}
    assert {rows[(1, s)]["status"] for s in sites} == {"ok"}, rows
    assert rows[(2, "site-a")]["status"] == "error" and rows[(2, "site-c")]["status"] == "ok"
    assert rows[(2, "site-b")]["status"] == "refused:privacy-ledger"
    assert {rows[(3, s)]["status"] for s in sites} == {"ok"}, "both hospitals train again once the problem is gone"
    said = [p for p in plan.progress.problems if "site-a" in p]
    assert any("data folder is no longer available" in p for p in said), said
    refusal = [(rnd, r.code, r.reason) for rnd, site, r in plan.progress.refusals if site == "site-b"]
    assert [r[:2] for r in refusal] == [(2, "privacy-ledger")] and "cannot be written" in refusal[0][2], refusal
    # nothing named a file or folder of the hospitals, and site-b's ledger holds rounds 1 and 3 only
    for text in said + [r[2] for r in refusal]:
        assert str(tmp_path) not in text and "patient-" not in text and str(full_disk.path) not in text, text
    entries = json.loads(next(ledger.glob("*.json")).read_text())["entries"]
    assert [e["round"] for e in entries] == [1, 3]
    assert [p.name for p in ledger.iterdir() if p.name.startswith(".")] == [], "a half-written ledger was left"


def test_a_reply_that_cannot_be_audited_does_not_leave_and_an_error_goes_instead(tmp_path, full_disk):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    path = site_yaml(tmp_path, "site-a", 0, tmp_path / "state", dp=False)
    path.write_text(path.read_text().replace("audit_log: audit.jsonl", f"audit_log: {full_disk.path / 'audit.jsonl'}"))
    site = load_site(path)
    log = AuditLog(site.audit_log)
    task = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=7, message_type=MessageType.TRAIN)
    task.metadata.__dict__["_message_id"] = "m1"
    reply = Message(RecordDict({"arrays": ArrayRecord(), "site": ConfigRecord({"name": "site-a"})}), reply_to=task)
    log.append({"run": 1, "round": "1", "type": "train", "records": {}, "bytes": 0})

    runner = TaskRunner(site)
    pushed = []
    runner.rc = SimpleNamespace(push_message=lambda client, message, context: pushed.append(message))
    runner.push = audited_push(site, runner.rc.push_message)
    assert runner.deliver(None, reply, task, None) is True and pushed == [reply]  # room on the disk: audited, sent
    full_disk.fill()
    # the audit log's last page may still take a few lines; then a reply cannot be audited
    for _ in range(100):
        if not runner.deliver(None, reply, task, None):
            break
    sent, error = pushed[:-1], pushed[-1]
    assert error.has_error() and error.error.reason == AUDIT_DOWN and all(not m.has_error() for m in sent)
    with pytest.raises(AuditUnwritable):
        runner.push(None, reply, None)
    # every reply that left is in the log, whole lines only, the chain intact
    lines = site.audit_log.read_text().splitlines()
    assert len(lines) == 1 + len(sent) and site.audit_log.read_bytes().endswith(b"\n")
    assert not verify(site.audit_log, "site-a").problems
