"""A Flower Grid that hands each message to the hospitals' ClientApp in this process: the real
round loop, strategies and ClientApp without an engine, for tests that run many short
federations (no Ray start-up, one thread, so a seed reproduces a run byte for byte)."""

from __future__ import annotations

from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from server.loop import Progress


class Collect(Progress):
    """What the round loop tells its display: problem lines, and refusals as (round, site, Refusal)."""

    def __init__(self):
        self.problems, self.refusals = [], []

    def problem(self, text):
        self.problems.append(text)

    def refused(self, rnd, site, refusal):
        self.refusals.append((rnd, site, refusal))


class InProcessGrid:
    pull_interval = 0.0

    def __init__(self, client_app, num_nodes: int, crash=None) -> None:
        """`crash(message)`: called before each message is delivered; raise to stop the server there."""
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.app, self.crash, self.replies = client_app, crash, {}
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": num_nodes})
                         for i in range(num_nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            if self.crash is not None:
                self.crash(message)
            message.metadata.__dict__["_message_id"] = uuid4().hex
            self.replies[message.metadata.message_id] = self.app(message, self.contexts[message.metadata.dst_node_id])
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]
