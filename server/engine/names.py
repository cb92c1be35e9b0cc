"""Who a reply is from: the node that sent it, named as the server knows it (registered node keys
in a deployment, partition ids in a simulation), never by what the reply says of itself."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Message

log = logging.getLogger("aseanfl")


def site_name(reply: Message, names: dict[int, str]) -> str:
    """The hospital a reply is from: the name the server knows its node by (registered hospital
    keys in a deployment, partition ids in a simulation), never what the reply says of itself;
    a node the server does not know is named by its id until it has declared a name no other
    node holds (`exchange`)."""
    return names.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")


def declared_name(reply: Message) -> str | None:
    """The hospital name a reply carries in its own 'site' record (its site.yaml), if any."""
    if reply.has_error() or "site" not in reply.content.config_records:
        return None
    return str(reply.content.config_records["site"].get("name", ""))


def impostor(reply: Message, names: dict[int, str]) -> str | None:
    """The name a reply declares when it is not the name of the node it came from (a hospital
    speaking as another); None when they agree or the reply declares nothing."""
    declared = declared_name(reply)
    known = names.get(reply.metadata.src_node_id)
    if declared is None or known is None or declared == known:
        return None
    return declared


def learn_names(replies: Iterable[Message], names: dict[int, str]) -> None:
    """Name a node the server did not know by the name it declared, unless another node holds
    that name (a node cannot take a known hospital's name)."""
    taken = set(names.values())
    for reply in replies:
        nid, declared = reply.metadata.src_node_id, declared_name(reply)
        if declared and nid not in names and declared not in taken:
            names[nid] = declared
            taken.add(declared)


def registered_names(registry: Path | None) -> dict[int, str]:
    """Node id -> hospital, as `aseanfl server start` registered them in server/registered.json
    (a revoked hospital's or an old key's entry is named so: 'site (revoked)')."""
    if registry is None:
        return {}
    try:
        return {int(node): site for site, node in json.loads(registry.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def unregistered(registry: Path | None, nodes: set[int]) -> set[int]:
    """Those of `nodes` that the coordinator no longer registers (revoked, or a re-enrolled
    hospital's old key), from server/registered.json (site -> node id; such entries are renamed
    'site (revoked)' or 'site (old key N)'); none when the run has no registry (a simulation)."""
    if registry is None:
        return set()
    current = {node for node, site in registered_names(registry).items() if "(" not in site}
    return {n for n in nodes if n not in current} if current else set()


class SiteOrder:
    """The grid with its node ids in a fixed order: by site name, then id. Flower samples the
    round's cohort with `random.sample(list(grid.get_node_ids()), k)`, and the ids come from a
    set of random 64-bit ids, so the same seed would ask other hospitals each run; in this order,
    the seeded `random` asks the same ones."""

    def __init__(self, grid, names: dict[int, str]) -> None:
        self._grid, self._names = grid, names

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        names = self._names
        return sorted(self._grid.get_node_ids(), key=lambda n: (n not in names, names.get(n, ""), n))


def partition_names(grid, sites: list[str] | None) -> dict[int, str]:
    """A simulation's node id -> hospital: Flower's Simulation Engine registers node i as
    partition-id i, one after the other, in its in-memory LinkState (whose node table keeps that
    order). Checked against every reply's own site name as the run goes (exchange)."""
    state = getattr(grid, "state", None)
    if not sites or state is None:
        return {}
    deadline = time.monotonic() + 60  # the engine registers its nodes while the ServerApp starts
    while len(ids := [n.node_id for n in state.get_node_info()]) < len(sites) and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(ids) != len(sites):
        log.warning("the simulation registered %d nodes for %d sites; sampling is not reproducible", len(ids), len(sites))
        return {}
    return dict(zip(ids, sites, strict=True))
