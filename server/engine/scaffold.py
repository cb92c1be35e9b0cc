"""SCAFFOLD's server side (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", Algorithm 1, option II): the global control variate c, sent with each
training task; each hospital's change of its own variate (delta c_i) comes back beside its
model and is taken out of the reply before the strategy, which averages the models as FedAvg;
then c += |S|/N x mean(delta c_i). c is kept in the run folder (control.safetensors) for resume.

Flower ships no SCAFFOLD strategy; the control variates are two extra ArrayRecords on the
messages the round already exchanges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from safetensors.numpy import load_file, save_file

from protocol.messages import CONTROL_KEY
from strategies.config import UpdateValidation

from server.engine.names import site_name
from server.engine.updates import beyond_median, l2

FILE = "control.safetensors"


class Controls:
    """The server's control variate over the shared arrays that are the model's trained parameters
    (not buffers such as BatchNorm's running statistics, which no gradient step moves)."""

    def __init__(self, shared: ArrayRecord, parameters: set[str], run_dir: Path, sites: int, resume: bool) -> None:
        self.path, self.sites = run_dir / FILE, max(sites, 1)
        self.c = {k: np.zeros(a.shape, np.float32) for k, a in shared.items() if k in parameters}
        if resume and self.path.is_file():
            self.c.update(load_file(str(self.path)))
        self.deltas: dict[str, dict[str, np.ndarray]] = {}

    def attach(self, tasks: list[Message]) -> None:
        """Each training task carries c."""
        record = ArrayRecord({k: Array(v) for k, v in self.c.items()})
        for task in tasks:
            task.content[CONTROL_KEY] = record

    def take(self, replies: list[Message], names: dict[int, str], row, problem) -> list[Message]:
        """Replies with their delta c_i taken out (kept by site); a training reply whose delta is
        missing or is not c's shape, or not finite, is left out as rejected:shape."""
        kept, self.deltas = [], {}
        for reply in replies:
            if reply.has_error() or "arrays" not in reply.content.array_records:
                kept.append(reply)  # errors and refusals go on to be reported as they are
                continue
            site = site_name(reply, names)
            record = reply.content.array_records.get(CONTROL_KEY)
            delta = {k: a.numpy() for k, a in record.items()} if record is not None else {}
            if set(delta) != set(self.c) or any(v.shape != self.c[k].shape or not np.all(np.isfinite(v))
                                                for k, v in delta.items()):
                row(site)["status"] = "rejected:shape"
                problem(f"{site} sent no usable SCAFFOLD control variate; left out (rejected:shape)")
                continue
            del reply.content[CONTROL_KEY]
            self.deltas[site] = delta
            kept.append(reply)
        return kept

    def update(self, used: list[Message], names: dict[int, str], screen: UpdateValidation | None = None,
               problem=lambda text: None) -> None:
        """c += |S|/N x mean of the used hospitals' delta c_i (N: the federation's hospitals). With
        update validation on, a delta whose norm is above norm_factor x the round's median is left
        out of c, as an update of that size is left out of the model (a hospital could otherwise
        steer every hospital's steps through c)."""
        sites = [s for s in (site_name(r, names) for r in used) if s in self.deltas]
        if screen is not None and screen.enabled and len(sites) >= screen.min_sites_for_norm:
            norms = [l2(self.deltas[s].values()) for s in sites]
            median, above = beyond_median(norms, screen.norm_factor)
            for s, norm in [(s, n) for s, n, out in zip(sites, norms, above, strict=True) if out]:
                problem(f"{s}'s SCAFFOLD control variate change has norm {norm:.3g}, above "
                        f"{screen.norm_factor * median:.3g} ({screen.norm_factor:g} x the round's median); left out of c")
                sites.remove(s)
        deltas = [self.deltas[s] for s in sites]
        if not deltas:
            return
        share = len(deltas) / max(self.sites, len(deltas))
        for k in self.c:
            self.c[k] = (self.c[k] + share * np.mean([d[k] for d in deltas], axis=0)).astype(np.float32)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        save_file(self.c, str(tmp))
        tmp.replace(self.path)
