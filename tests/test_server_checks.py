"""The server's reply checks on real Flower Message objects: anything outside the schema is
dropped and the site named; refusals are recorded; the rest is aggregated."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from inprocess import Collect

from protocol.messages import REFUSAL_KEY, Refusal, TrainMetrics
from server.engine.exchange import checked
from server.engine.names import learn_names

_ids = iter(range(1, 1000))


@pytest.fixture(autouse=True)
def _server_identity():
    """Messages are stamped with the sender's identity, as in a ServerApp."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _reply(site: str, metrics: dict | None = None, arrays: bool = True, refusal: Refusal | None = None) -> Message:
    node = 100 + next(_ids)  # each hospital its own node: the server names a reply by its node
    out = Message(content=RecordDict({"config": ConfigRecord({"task": "{}"})}), dst_node_id=node, message_type=MessageType.TRAIN)
    out.metadata.__dict__["_message_id"] = str(next(_ids))  # as the link does when it stores a message
    content = {"site": ConfigRecord({"name": site})}
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    if arrays:
        content["arrays"] = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    if refusal is not None:
        content[REFUSAL_KEY] = refusal.record()
    return Message(content=RecordDict(content), reply_to=out)


GOOD = TrainMetrics(num_examples=10, train_loss=0.5, steps=3, epsilon=float("nan")).record()


def test_only_schema_conformant_replies_are_kept():
    leaky = dict(GOOD) | {"patient-age": 63.0}
    out = Message(content=RecordDict({}), dst_node_id=9, message_type=MessageType.TRAIN)
    out.metadata.__dict__["_message_id"] = "err"
    failed = Message(Error(code=0, reason="site data unreadable"), reply_to=out)
    replies = [
        _reply("bangkok", dict(GOOD)),
        _reply("hanoi", leaky),
        _reply("jakarta", dict(GOOD), arrays=False),
        _reply("manila", refusal=Refusal(code="privacy-budget", reason="over budget", epsilon_spent=7.9, epsilon_budget=8)),
        failed,
    ]
    progress, refusals = Collect(), {}
    names: dict[int, str] = {}
    learn_names(replies, names)  # nodes the server did not know: named by what they declared (exchange)
    kept = checked(replies, TrainMetrics, progress, 3, "training", refusals, names)
    assert [m.content.config_records["site"]["name"] for m in kept] == ["bangkok"]
    text = "\n".join(progress.problems)
    assert "hanoi sent metrics that break the schema" in text and "patient-age" in text
    assert "jakarta sent no model arrays" in text
    assert "replied with an error: site data unreadable" in text
    assert [(site, r.code) for _, site, r in progress.refusals] == [("manila", "privacy-budget")] and refusals["manila"].epsilon_spent == 7.9


def test_hospital_errors_reach_the_server_without_local_detail(caplog):
    """A hospital whose data loading fails: the reply says what kind of failure, never the path."""
    from flwr.app import Context

    from client.training.app import build_client_app
    from protocol.messages import TaskSpec
    from client.config import TrainConfig
    from medimaging.config import ModelConfig

    secret = "/pacs/export/NGUYEN_VAN_A_1957/slice_001.dcm"

    def broken_loader(context, image_size):
        raise FileNotFoundError(f"cannot read {secret}")

    task = TaskSpec(run="r", server_round=1, total_rounds=1, seed=0, model=ModelConfig(), train=TrainConfig(),
                    in_channels=1, num_classes=2, image_size=32)
    msg = Message(content=RecordDict({"config": task.to_config(), "arrays": ArrayRecord()}), dst_node_id=5,
                  message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    app = build_client_app(broken_loader)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    reply = app(message=msg, context=context)
    assert reply.has_error()
    assert reply.error.reason == "FileNotFoundError at the hospital (details in its local log)"
    assert "NGUYEN" not in reply.error.reason and secret in caplog.text, "full detail stays in the local log"


class _LinkThatLostANode:
    """Flower's grid as the ServerApp sees it when one hospital's SuperNode stopped sending
    heartbeats: the SuperLink answers for it with a NODE_UNAVAILABLE error from its own node id."""

    pull_interval = 0.01

    def __init__(self, lost: int):
        self.lost, self.sent = lost, []

    def push_messages(self, messages):
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        self.sent = list(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        from flwr.common.constant import ErrorCode

        out = []
        for m in self.sent:
            if m.metadata.message_id not in ids:
                continue
            if m.metadata.dst_node_id == self.lost:
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node unavailable"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            else:
                reply = Message(RecordDict({"site": ConfigRecord({"name": f"site-{m.metadata.dst_node_id}"})}), reply_to=m)
            out.append(reply)
        return out


def test_a_hospital_that_went_away_gets_its_own_no_reply_row_not_the_links():
    """A vanished hospital is named (from the registered node ids) with the true reason; no row
    for the SuperLink's own node id (the `node-1,error` row of before)."""
    import threading

    from server.engine.exchange import exchange

    messages = [Message(RecordDict({"config": ConfigRecord({"task": "{}"})}), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in (11, 12, 13)]
    silent = []
    replies, sent = exchange(_LinkThatLostANode(lost=13), messages, 5.0, {13: "site-c"},
                              lambda nid, nbytes, why: silent.append((nid, why)), threading.Event())
    assert sorted(sent) == ["site-11", "site-12"] and len(replies) == 2
    assert [nid for nid, _ in silent] == [13] and "went offline" in silent[0][1] and "Node unavailable" in silent[0][1]
    assert all(r.metadata.src_node_id != SUPERLINK_NODE_ID for r in replies)


def test_a_killed_daemons_port_is_free_again_at_once_but_a_live_one_is_not():
    """systemd restarts a daemon killed with -9 within seconds; its runtime port still has
    connections in TIME_WAIT, which must not read as 'in use' (the SuperNode binds over them)."""
    import socket

    from client.operations.daemon import _port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's server does
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not _port_free(port)  # a live daemon holds it
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    assert _port_free(port)
