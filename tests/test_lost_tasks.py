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
