"""A hospital's SuperNode that dies holding a task (kill -9, a crash) and is restarted at once
must not leave the round waiting for its timeout: the coordinator's SuperLink activates the node
again only once that task is counted lost (server.operations.gate.LostTaskGate). Checked against
Flower's own SQL link state, the one `aseanfl server start` runs."""

from __future__ import annotations

import time

import pytest
from flwr.proto.fleet_pb2 import ActivateNodeRequest  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
from flwr.superlink.servicer.fleet import fleet_handlers
from flwr.supercore.constant import TaskType
from flwr.supercore.error import FlowerError
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.state.schema.linkstate_models import MessageIns
from flwr.supercore.utils import uint64_to_int64
from sqlalchemy import insert

from server.operations.gate import LostTaskGate, unanswered_tasks

KEY = b"-----BEGIN PUBLIC KEY----- site-a's node key -----END PUBLIC KEY-----"


@pytest.fixture
def link(tmp_path):
    state = LinkStateFactory(str(tmp_path / "state.db"), NoOpFederationManager(), ObjectStoreFactory()).state()
    node = state.create_node("aid", "site-a", KEY, 30)
    assert state.activate_node(node, 30)
    run = state.create_run(None, None, None, {}, "default", None, None, TaskType.SERVER_APP)
    return state, node, run


def _task(state, node: int, run: int, name: str, delivered: bool = True, ttl: float = 3600) -> str:
    """A task the ServerApp sent to `node`, as Flower stores it (delivered: its SuperNode took it)."""
    with state.session() as session:
        session.execute(insert(MessageIns).values(
            message_id=name, group_id="1", run_id=uint64_to_int64(run), src_node_id=uint64_to_int64(1),
            dst_node_id=uint64_to_int64(node), reply_to_message_id="", created_at=time.time(),
            delivered_at="2026-12-06T10:00:00+00:00" if delivered else "", ttl=ttl, message_type="train",
            content=b"", error=None))
    return name


def _activate(gate, state):
    return gate(ActivateNodeRequest(public_key=KEY, heartbeat_interval=30), state)


def test_a_restarted_node_waits_until_its_lost_task_is_counted_then_activates(link):
    state, node, run = link
    lost = _task(state, node, run, "task-round-2")
    _task(state, node, run, "not-taken-yet", delivered=False)  # still queued: the new SuperNode will take it
    _task(state, node, run, "expired", ttl=0.001)
    assert unanswered_tasks(state, node) == 0  # online: its SuperNode may still answer
    assert state.deactivate_node(node)  # Flower counts it offline (heartbeats stopped)
    assert unanswered_tasks(state, node) == 1
    gate = LostTaskGate(fleet_handlers.activate_node)
    with pytest.raises(FlowerError, match="not answered yet"):
        _activate(gate, state)
    assert state.get_node_info(node_ids=[node])[0].status == "offline"  # still offline: the ServerApp sees it so
    state.delete_messages({lost})  # the ServerApp took Flower's 'node unavailable' reply for it
    assert _activate(gate, state).node_id == node
    assert state.get_node_info(node_ids=[node])[0].status == "online"


def test_a_task_nobody_polls_for_keeps_the_node_out_no_longer_than_the_grace(link):
    state, node, run = link
    _task(state, node, run, "task-of-a-dead-run")
    assert state.deactivate_node(node)
    gate = LostTaskGate(fleet_handlers.activate_node, grace=0.5)
    with pytest.raises(FlowerError):
        _activate(gate, state)
    time.sleep(0.6)
    assert _activate(gate, state).node_id == node


def test_a_reply_finished_after_the_supernodes_push_stage_is_sent_without_waiting_for_another_task():
    """Flower's SuperNode pushes replies only after taking a task, until the first reply: a task
    taken while a stopped run's task was still computing had its reply wait until the server sent
    another task (it never does first: a deployed run's class-name question waited out its 300 s
    timeout). With aseanfl's SuperNode, an empty pull with a reply waiting goes to the push stage."""
    from flwr.app import Message, Metadata, RecordDict
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from client.operations.gate import _pull_then_push_what_waits, _reply_waiting

    state = InMemoryNodeState(ObjectStoreFactory().store())
    empty = _pull_then_push_what_waits(lambda **kwargs: None)  # the server has nothing new
    assert empty(state=state) is None and not _reply_waiting(state)
    task = Message(metadata=Metadata(run_id=7, message_id="task-1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                                     group_id="classes-7", created_at=time.time(), ttl=60, message_type="query.classes"),
                   content=RecordDict())
    state.store_message(task)
    assert empty(state=state) is None  # a task being computed, no reply yet: wait as Flower does
    reply = Message(RecordDict(), reply_to=task)
    reply.metadata.__dict__["_message_id"] = "reply-1"
    state.store_message(reply)
    assert _reply_waiting(state) and empty(state=state) == 0  # not None: the loop pushes it now
    assert [m.metadata.message_id for m in state.get_messages_legacy(is_reply=True)] == ["reply-1"]  # still there to push
