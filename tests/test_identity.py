"""Who a reply is from: the node that sent it, never the name it declares (server.engine.rounds), a reply
pushed in another node's name (server.operations.gate.check_senders), and a revoked hospital that a round
does not wait for. The deployment test plays each against real processes."""

from __future__ import annotations

import json
import threading
import time

from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.node_pb2 import Node

from server.operations.gate import ForgedSender, check_senders
from server.engine.exchange import await_rejoin
from server.engine.names import impostor, learn_names, site_name, unregistered
from server.engine.plan import Plan


def _reply(node: int, declared: str | None) -> Message:
    content = RecordDict({"site": ConfigRecord({"name": declared})} if declared else {})
    meta = Metadata(run_id=1, message_id="m", src_node_id=node, dst_node_id=0, reply_to_message_id="t", group_id="1",
                    created_at=time.time(), ttl=60, message_type="train")
    return Message(metadata=meta, content=content)


def test_a_reply_is_named_by_its_node_and_a_declared_other_name_is_an_impostor():
    names = {11: "site-a", 22: "site-b"}
    liar = _reply(11, "site-b")
    assert site_name(liar, names) == "site-a" and impostor(liar, names) == "site-b"
    assert impostor(_reply(22, "site-b"), names) is None
    # an unknown node is named by what it declares, unless a known hospital holds that name
    learn_names([_reply(33, "site-c"), _reply(44, "site-a")], names)
    assert names[33] == "site-c" and 44 not in names and site_name(_reply(44, "site-a"), names) == "node-44"


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
        now = await_rejoin(_Grid([11]), {11, 33}, 600, plan, {11: "site-a", 33: "site-c (revoked)"}, 2)
    finally:
        stopper.cancel()
    assert now == {11} and problems == [] and time.monotonic() - started < 15
    # a hospital that is still registered is waited for (and named)
    registry.write_text(json.dumps({"site-a": "11", "site-c": "33"}))
    plan.stop.clear()
    waited = await_rejoin(_Grid([11]), {11, 33}, 1.5, plan, {11: "site-a", 33: "site-c"}, 2)
    assert waited == {11} and "site-c disconnected" in problems[0] and "still away" in problems[1]


def test_the_round_loop_names_an_impostor_by_its_node_and_says_when_only_validation_was_lost(tmp_path):
    """The real round loop and the deployed hospital's ClientApp on an in-process grid: the
    hospital on node 101 declares itself site-a (its site.yaml says so); site-c's validation
    reply of round 2 never arrives after it trained."""
    from flwr.app import MessageType
    from inprocess import Collect, InProcessGrid, site_yaml

    from client.training.app import app as deployed_app
    from client.training.site import SITE_CONFIG_KEY
    from server.engine.rounds import run_federation
    from server.records.outputs import read_rows
    from simulations.config import load_config
    from simulations.runner import prepare_run

    sites = {name: site_yaml(tmp_path, name, i, tmp_path / name / "state") for i, name in enumerate(["site-a", "site-b", "site-c"])}
    sites["site-b"].write_text(sites["site-b"].read_text().replace("site: site-b\n", "site: site-a\n"))
    cfg = load_config(None, {"sites": 3, "server.rounds": 2, "train.local_epochs": 1, "data.image_size": 32,
                             "server.output_dir": str(tmp_path / "runs"), "strategy.min_sites": 1,
                             "server.round_timeout_s": 2, "server.rejoin_wait_s": 0})
    plan = prepare_run(cfg)
    plan.progress = Collect()
    plan.node_names = {100 + i: name for i, name in enumerate(sites)}

    class LosesOneValidation(InProcessGrid):
        def pull_messages(self, ids):
            got = super().pull_messages(ids)
            return [m for m in got if not (m.metadata.src_node_id == 102 and m.metadata.group_id == "2"
                                           and m.metadata.message_type == MessageType.EVALUATE)]

    grid = LosesOneValidation(deployed_app, 3)
    for nid, path in zip(grid.contexts, sites.values(), strict=True):
        grid.contexts[nid].node_config = {SITE_CONFIG_KEY: str(path)}
    run_federation(grid, plan)

    rows = {(r["round"], r["site"]): r for r in read_rows(plan.run_dir)}
    for rnd in (1, 2):
        assert rows[(rnd, "site-b")]["status"] == "rejected:identity", rows[(rnd, "site-b")]
        assert rows[(rnd, "site-b")].get("train_loss") in (None, "") and rows[(rnd, "site-b")]["bytes_from_site"] > 0
        assert rows[(rnd, "site-a")]["status"] == "ok" and rows[(rnd, "site-a")]["num_train"] > 0  # its own figures only
    assert rows[(1, "global")]["status"].startswith("2 trained"), rows[(1, "global")]
    lost = rows[(2, "site-c")]
    assert lost["status"] == "validation-lost" and lost["train_loss"] not in (None, "") and lost.get("val_auc") in (None, "")
    said = "\n".join(plan.progress.problems)
    assert "the reply of site-b (its registered node key) declares itself as site-a" in said, said
    assert "site-c did not reply within 2 s; it trained this round" in said, said
