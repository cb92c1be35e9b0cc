"""Model arrays travel packed (common/packing.py): a handful of Flower objects per message
whatever the model, every array back bit for bit and in order, a blob that does not decode
refused with its reason, the audit log still naming every tensor that left; and the hospital's
poll clock (client/operations/gate.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity
from inprocess import Collect, InProcessGrid
from safetensors.numpy import save

from common import packing
from common.packing import KEY, STYPE, PackingError, pack, unpack
from client.operations import gate
from client.training.app import build_client_app
from client.operations.audit import AuditLog, describe, verify
from medimaging.config import ModelConfig
from medimaging.models import build_model
from server.engine.rounds import run_federation
from server.records.outputs import read_rows
from simulations.config import load_config
from simulations.federation import hospital
from simulations.runner import prepare_run


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _message(arrays: ArrayRecord, record: str = "config") -> Message:
    """A task (with its config) or, record="site", a hospital's training reply as it leaves."""
    extra = ConfigRecord({"task": "{}"} if record == "config" else {"name": "site-a"})
    return Message(RecordDict({"arrays": arrays, record: extra}), dst_node_id=7, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_a_packed_message_is_a_handful_of_objects_and_unpacks_bit_for_bit(name):
    torch.manual_seed(0)
    state = build_model(ModelConfig(name=name), 1, 2, 64, False, 2).state_dict()
    plain = ArrayRecord(state)
    wire = pack(plain)
    objects = {"plain": len(get_all_nested_objects(_message(plain))), "packed": len(get_all_nested_objects(_message(wire)))}
    size = len(wire[KEY].data)
    # Message, RecordDict, ArrayRecord, one Array and its 5 MiB chunks, the config: not one Array per tensor
    assert objects["packed"] <= 5 + -(-size // (5 * 2**20)), objects
    assert objects["plain"] > len(state), objects  # an Array per tensor (identical chunks are sent once)
    back = unpack(wire)
    assert list(back) == list(plain)  # the order too: Flower's FedOpt pairs arrays by position
    for key, tensor in state.items():
        value = back[key].numpy()
        assert value.dtype == tensor.numpy().dtype and value.shape == tuple(tensor.shape), key
        assert value.tobytes() == tensor.numpy().tobytes(), key


def _blob(data: bytes) -> ArrayRecord:
    return ArrayRecord({KEY: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


@pytest.mark.parametrize("data, reason", [
    (b"abc", "too short \\(3 bytes\\)"),
    (b"\xff" * 8 + b"{}", "header claims"),
    (b"\x08" + b"\x00" * 7 + b"not json", "not readable"),
    (save({"w": np.ones(2, np.float32)}), "exactly once"),  # no order
    (save({"w": np.ones(2, np.float32)}, metadata={"order": '["w"]', "note": "patient 17"}), "other metadata"),
    (save({"w": np.ones(2, np.float32)}, metadata={"order": '["w", "w"]'}), "exactly once"),
    (save({"w": np.ones(2, np.float32)}, metadata={"order": '["w", 1]'}), "exactly once"),
    (save({"w": np.ones(2, np.float32)}, metadata={"order": '{"w": 1}'}), "exactly once"),
    (save({"w": np.ones(4, np.float32)}, metadata={"order": '["w"]'})[:-3], "do not decode"),  # cut in transit
])
def test_a_packed_record_that_does_not_decode_is_refused_with_its_reason(data, reason):
    with pytest.raises(PackingError, match=reason):
        unpack(_blob(data))


def test_records_are_shared_not_changed_and_packed_once(monkeypatch):
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32))})
    messages = [_message(arrays) for _ in range(3)]
    calls = []
    monkeypatch.setattr(packing, "pack", lambda rec: calls.append(rec) or pack(rec))
    out = packing.packed(messages)
    assert len(calls) == 1  # one model for every hospital: serialised once
    assert all(packing.is_packed(m.content["arrays"]) for m in out)
    assert list(arrays) == ["w"] and not packing.is_packed(arrays)  # the strategy's record is untouched


def test_the_audit_log_names_every_tensor_inside_a_packed_reply(tmp_path):
    state = build_model(ModelConfig(name="cnn"), 1, 2, 32, False, 2).state_dict()
    plain, wire = _message(ArrayRecord(state), "site"), _message(pack(ArrayRecord(state)), "site")
    seen, sent = describe(plain)["records"]["arrays"]["entries"], describe(wire)["records"]["arrays"]["entries"]
    assert list(sent) == list(state)
    for key, tensor in state.items():
        assert sent[key]["dtype"] == seen[key]["dtype"] == str(tensor.numpy().dtype)
        assert sent[key]["shape"] == seen[key]["shape"] == list(tensor.shape)
        assert sent[key]["bytes"] == tensor.numpy().nbytes and sent[key]["packed"] == STYPE
    body = describe(wire)
    assert body["bytes"] >= sum(t.numpy().nbytes for t in state.values())
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(body)
    report = verify(log.path, "site-a", forbidden=["patient-"])
    assert report.entries == 1 and not report.problems, report.problems
    assert json.loads(log.path.read_text())["records"]["arrays"]["entries"] == sent


class _Tampered(InProcessGrid):
    """A grid on which partition 0's training replies arrive cut short (a broken upload)."""

    def pull_messages(self, ids):
        replies = super().pull_messages(ids)
        for reply in replies:
            if (reply.metadata.src_node_id == 100 and reply.metadata.message_type == MessageType.TRAIN
                    and not reply.has_error() and "arrays" in reply.content):
                blob = reply.content["arrays"][KEY]
                reply.content["arrays"] = _blob(blob.data[: len(blob.data) // 2])
        return replies


def test_a_reply_whose_arrays_do_not_decode_is_left_out_and_named(tmp_path):
    cfg = load_config(None, {"sites": 3, "server.rounds": 1, "train.local_epochs": 1, "data.synthetic.samples_per_site": 60,
                             "data.synthetic.test_per_site": 20, "data.image_size": 28, "server.output_dir": str(tmp_path),
                             "strategy.min_sites": 2})
    plan = prepare_run(cfg)
    plan.progress = Collect()
    plan.node_names = {100 + i: site for i, site in enumerate(cfg.sites)}  # as a deployment's registered.json

    def load(context, image_size):
        return hospital(plan.config, int(context.node_config["partition-id"]), image_size, plan.run_dir.parent)

    grid = _Tampered(build_client_app(load), 3)
    run_federation(grid, plan)
    rows = {(r["round"], r["site"]): r for r in read_rows(plan.run_dir)}
    first = cfg.sites[0]
    assert rows[(1, first)]["status"] == "error", rows
    assert {rows[(1, s)]["status"] for s in cfg.sites[1:]} == {"ok"}
    assert rows[(1, "global")]["status"].startswith("2 trained"), rows[(1, "global")]
    said = [p for p in plan.progress.problems if first in p]
    assert len(said) == 1 and said[0].startswith(f"round 1 training: {first} replied with an error: the model arrays in "
                                                  "its reply do not decode: its arrays do not decode"), said


def test_a_hospital_polls_fast_after_a_task_and_slows_down_to_once_a_second(monkeypatch):
    slept = []
    monkeypatch.setattr(gate.time, "sleep", slept.append)
    clock = gate._PollClock()
    clock.sleep(3)  # Flower's wait after an empty pull, before any task: the idle rate
    assert slept == [gate.POLL_S]
    clock.answered()
    slept.clear()
    while not slept or slept[-1] < gate.POLL_S:
        clock.sleep(3)
    assert slept[0] == gate.BUSY_POLL_S and slept == sorted(slept)
    assert 5 < sum(slept) < 12 and len(slept) < 25, slept  # back to the idle rate within seconds, a few asks more
    slept.clear()
    clock.sleep(0.5)  # its wait on its own state (the local reply)
    clock.sleep(2)  # anything else Flower waits for, as it is
    assert slept == [gate.LOCAL_WAIT_S, 2]
    assert clock.monotonic() <= time.monotonic()  # everything else is the real time module


def test_a_hospital_refuses_a_task_whose_arrays_do_not_decode():
    def load(context, image_size):
        raise AssertionError("nothing of the hospital is read for a task that does not decode")

    task = _message(_blob(save({"w": np.ones(2, np.float32)}, metadata={"order": '["w"]', "note": "x"})))
    task.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={"partition-id": 0})
    reply = build_client_app(load)(task, context)
    assert reply.has_error()
    assert reply.error.reason == "PackingError at the hospital (details in its local log)", reply.error.reason
