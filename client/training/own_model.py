"""A hospital's own model, on its own disk: what personalization is for. Ditto's personal model,
APFL's mix, the head the server fit for this hospital (strategy.personal_heads) or FedPer's /
FedRep's / FedBN's own layers on the shared body live in the node's state for one run only; each
validation also writes the model it scored to <state>/<run>/personal/<site>/ (a simulation: the
run folder's personal/<site>/), replacing the last round's:

- model.safetensors: the plain network (APFL's mix written into its weights), as a run's
  model.safetensors is;
- card.yaml: what it is (the run's model and task), for `aseanfl export --card` (a MONAI bundle
  the hospital can use) and `aseanfl evaluate --card`;
- scores.json: the round and what it scored on this hospital's validation cases.

Nothing here is sent: it is written beside the privacy ledger, never into a reply."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import yaml

from protocol.messages import TaskSpec

def card(task: TaskSpec) -> dict:
    """The model card of the run's model (server/evaluation/federated.ModelCard's fields). Its start
    weights are left out: the file holds every weight, and their path was the server's."""
    model = task.model.model_dump(mode="json", exclude={"weights", "weights_sha256", "new_head"}, exclude_none=True)
    return {"model": model, "task": task.task, "in_channels": task.in_channels, "num_classes": task.num_classes,
            "image_size": task.image_size, "spatial_dims": task.spatial_dims, "private": task.private}


def keep_own_model(root: Path, task: TaskSpec, site: str, model: torch.nn.Module, kind: str, scores: dict) -> Path:
    """Write the hospital's own model, its card and its scores; each file whole or not at all."""
    from safetensors.torch import save_file

    folder = root / task.run / "personal" / site
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    about = {"run": task.run, "round": task.server_round, "kind": kind,  # NaN (one class here): null
             **{k: None if math.isnan(v) else v for k, v in scores.items() if isinstance(v, (int, float))}}
    header = {"run": task.run, "round": str(task.server_round), "kind": kind}
    _replace(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=header))
    _replace(folder / "card.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(card(task), sort_keys=False)))
    _replace(folder / "scores.json", lambda tmp: Path(tmp).write_text(json.dumps(about, indent=2) + "\n"))
    return folder


def _replace(path: Path, write) -> None:
    """`write(tmp)` to a private temporary file beside `path`, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
