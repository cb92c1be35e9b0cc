"""Who a reply is from: the node that sent it, never the name it declares (server.loop), a reply
pushed in another node's name (server.gate.check_senders), and a revoked hospital that a round
does not wait for. The deployment test plays each against real processes."""

from __future__ import annotations

import json
import threading
import time

from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.node_pb2 import Node

from server.gate import ForgedSender, check_senders
from server.loop import Plan, _await_rejoin, _site_name, impostor, learn_names, unregistered


def _reply(node: int, declared: str | None) -> Message:
    content = RecordDict({"site": ConfigRecord({"name": declared})} if declared else {})
    meta = Metadata(run_id=1, message_id="m", src_node_id=node, dst_node_id=0, reply_to_message_id="t", group_id="1",
                    created_at=time.time(), ttl=60, message_type="train")
    return Message(metadata=meta, content=content)


def test_a_reply_is_named_by_its_node_and_a_declared_other_name_is_an_impostor():
    names = {11: "site-a", 22: "site-b"}
    liar = _reply(11, "site-b")
    assert _site_name(liar, names) == "site-a" and impostor(liar, names) == "site-b"
    assert impostor(_reply(22, "site-b"), names) is None
    # an unknown node is named by what it declares, unless a known hospital holds that name
    learn_names([_reply(33, "site-c"), _reply(44, "site-a")], names)
    assert names[33] == "site-c" and 44 not in names and _site_name(_reply(44, "site-a"), names) == "node-44"


def test_a_push_in_another_nodes_name_is_refused():
    from flwr.common.serde import message_to_proto

    own, other = _reply(11, "site-a"), _reply(22, "site-b")
    check_senders(PushMessagesRequest(node=Node(node_id=11), messages_list=[message_to_proto(own)]))
    try:
        check_senders(PushMessagesRequest(node=Node(node_id=11), messages_list=[message_to_proto(other)]))
    except ForgedSender as exc:
        assert "node 11 pushed a reply that claims to come from node 22" in str(exc)
    else:
        raise AssertionError("a reply in another node's name was let through")


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_a_round_does_not_wait_for_a_revoked_hospital(tmp_path):
    registry = tmp_path / "registered.json"
    registry.write_text(json.dumps({"site-a": "11", "site-c (revoked)": "33"}))
    assert unregistered(registry, {11, 33}) == {33} and unregistered(None, {11, 33}) == set()
    plan = Plan(config=None, shape=None, run_dir=tmp_path, registry=registry)
    problems = []
    plan.progress.problem = problems.append
    stopper = threading.Timer(20, plan.stop.set)  # were it to wait, the run's stop would end the wait
    stopper.start()
    try:
        started = time.monotonic()
        now = _await_rejoin(_Grid([11]), {11, 33}, 600, plan, {11: "site-a", 33: "site-c (revoked)"}, 2)
    finally:
        stopper.cancel()
    assert now == {11} and problems == [] and time.monotonic() - started < 15
    # a hospital that is still registered is waited for (and named)
    registry.write_text(json.dumps({"site-a": "11", "site-c": "33"}))
    plan.stop.clear()
    waited = _await_rejoin(_Grid([11]), {11, 33}, 1.5, plan, {11: "site-a", 33: "site-c"}, 2)
    assert waited == {11} and "site-c disconnected" in problems[0] and "still away" in problems[1]
