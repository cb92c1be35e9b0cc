"""SCAFFOLD at a hospital (Karimireddy et al. 2020, Algorithm 1, option II): every local SGD step
is corrected by c - c_i (the server's control variate minus this hospital's own), and after
training c_i+ = c_i - c + (x - y) / (K lr), with x the model received, y the model trained and
K the steps taken. Our SGD has momentum 0.9, whose steps are 1 / (1 - 0.9) times lr x gradient
once under way, so lr there is lr / (1 - momentum) (with plain lr the variates came out ten times
too large and a pneumoniamnist federation diverged in its second round). c_i stays in the node's
state (never sent); the reply carries delta c_i.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message

from medimaging.training import SGD_MOMENTUM
from protocol.messages import CONTROL_KEY

STATE_KEY = "scaffold-control"  # this hospital's c_i, in the node's own state


class LocalControl:
    def __init__(self, msg: Message, context: Context, model: torch.nn.Module) -> None:
        if CONTROL_KEY not in msg.content.array_records:
            raise ValueError("a SCAFFOLD task came without the server's control variate")
        self.c = {k: torch.from_numpy(a.numpy().copy()) for k, a in msg.content[CONTROL_KEY].items()}
        params = dict(model.named_parameters())
        if not set(self.c) <= set(params) or any(params[k].shape != v.shape for k, v in self.c.items()):
            raise ValueError("the server's SCAFFOLD control variate does not fit this model")
        held = context.state.array_records.get(STATE_KEY)
        self.ci = ({k: torch.from_numpy(a.numpy().copy()) for k, a in held.items()} if held is not None
                   and set(held) == set(self.c) else {k: torch.zeros_like(v) for k, v in self.c.items()})
        self.params = {k: params[k] for k in self.c}
        self.x = {k: p.detach().cpu().clone() for k, p in self.params.items()}
        self.shift = {k: (self.c[k] - self.ci[k]).to(p.device) for k, p in self.params.items()}

    def correct(self) -> None:
        """grad += c - c_i, so the step follows the federation's direction, not only this hospital's."""
        for k, p in self.params.items():
            if p.grad is not None:
                p.grad.add_(self.shift[k])

    def finish(self, context: Context, steps: int, lr: float) -> ArrayRecord:
        """Keep c_i+ in the node's state; return delta c_i = c_i+ - c_i for the reply."""
        new, delta, step = {}, {}, max(steps, 1) * lr / (1 - SGD_MOMENTUM)
        for k, p in self.params.items():
            y = p.detach().cpu()
            new[k] = self.ci[k] - self.c[k] + (self.x[k] - y) / step
            delta[k] = (new[k] - self.ci[k]).float()
        context.state[STATE_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in new.items()})
        return ArrayRecord({k: Array(v.numpy()) for k, v in delta.items()})
