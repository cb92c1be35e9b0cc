"""A Flower Grid that hands each message to the hospitals' ClientApp in this process: the real
round loop, strategies and ClientApp without an engine, for tests that run many short
federations (no Ray start-up, one thread, so a seed reproduces a run byte for byte)."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from server.engine.plan import Progress
from simulations.local_deployment import write_pngs


class Collect(Progress):
    """What the round loop tells its display: problem lines, and refusals as (round, site, Refusal)."""

    def __init__(self):
        self.problems, self.refusals = [], []

    def problem(self, text):
        self.problems.append(text)

    def refused(self, rnd, site, refusal):
        self.refusals.append((rnd, site, refusal))


class Wire(Collect):
    """Collect, and the bytes of every reply the server got (arrays, metric and config values, the
    metadata, an error's reason), for tests that look for what must not leave a hospital."""

    def __init__(self):
        super().__init__()
        self.blobs = []

    def received(self, rnd, phase, reply):
        self.blobs.append(json.dumps(reply.metadata.__dict__, default=str).encode())
        if not reply.has_content():  # an error reply
            self.blobs.append(str(reply.error.reason).encode())
            return
        content = reply.content
        self.blobs += [a.data for rec in content.array_records.values() for a in rec.values()]
        for rec in list(content.metric_records.values()) + list(content.config_records.values()):
            self.blobs += [str(v).encode() for v in rec.values()]


def _wire(message: Message) -> Message:
    """The message as the other side gets it over the wire (Flower's protobuf, there and back): a
    copy of its own, as a real transport gives, so that nothing one side changes reaches the other
    (a strategy sends one RecordDict to every hospital)."""
    return message_from_proto(message_to_proto(message))


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
            reply = self.app(_wire(message), self.contexts[message.metadata.dst_node_id])
            self.replies[message.metadata.message_id] = _wire(reply)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        """Grid.send_and_receive, which SecAgg+'s legacy workflow calls: every reply is here at once."""
        return self.pull_messages(self.push_messages(messages))


def site_yaml(root: Path, name: str, index: int, state: Path, dp: bool = False, extra: str = "",
              threads: int | None = 1, device: str = "auto", samples: int = 60) -> Path:
    """A deployed hospital's site.yaml under root/name, reading `samples` (60) synthetic PNGs of its own
    (simulations.local_deployment.write_pngs, never blank); `threads`: its compute.threads (1:
    it shares the test machine; None: every core); `extra`: more YAML lines."""
    data = root / "pacs" / name
    write_pngs(data, index, samples=samples)
    path = root / name / "site.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(f"site: {name}\ndata:\n  root: {data}\n  image_size: 32\n  cache_dir: {root / name / 'cache'}\n"
                    f"privacy:\n  enabled: {str(dp).lower()}\n  target_epsilon: 50\nstate_dir: {state}\n"
                    f"audit_log: audit.jsonl\nrequire_approval: false\ncompute:\n  device: {device}\n"
                    + (f"  threads: {threads}\n" if threads else "") + extra)
    return path
