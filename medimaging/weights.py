"""Pretrained weights for the global model's start (`model.weights`): a safetensors file, a PyTorch
state dict (read with weights_only: no pickled code runs), a torchvision-layout ResNet or
DenseNet checkpoint mapped onto MONAI's network, or a MONAI bundle folder (its network
definition in configs/ is built and checked against the run's model, its weights read from
models/). Nothing is downloaded: hospitals and often coordinators are offline.

Adapted, and said so: a first convolution trained on RGB onto grey-scale images (the three
filters summed, the usual transfer to one channel); BatchNorm running statistics where the
run's model normalises with GroupNorm (dropped: GroupNorm keeps none). Refused, in one line
naming the tensors: a missing or extra tensor, another shape; a classifier head for another
class count unless `model.new_head` asks for a fresh one."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

_DENSE = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(weight|bias|running_mean|running_var)$")
_STATS = ("running_mean", "running_var", "num_batches_tracked")


class WeightsError(ValueError):
    """One line naming the file and what does not fit."""


@dataclass
class Loaded:
    path: Path
    sha256: str
    format: str
    new_head: list[str] = field(default_factory=list)  # tensors started afresh (model.new_head)
    notes: list[str] = field(default_factory=list)  # what was adapted

    def line(self) -> str:
        said = "; ".join([*self.notes] + ([f"new head: {', '.join(self.new_head)} re-initialised"] if self.new_head else []))
        return f"started from {self.path} ({self.format}, sha256 {self.sha256[:12]})" + (f": {said}" if said else "")


def file_sha256(path: Path) -> str:
    """sha256 of a weights file, or of a bundle's weights file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundle(folder: Path, model: torch.nn.Module) -> Path:
    """A MONAI bundle's weights file, once its network definition is checked against `model`
    (read as data by medimaging/bundles.py: no bundle code runs)."""
    from medimaging.bundles import WEIGHTS, BundleError, build_network, network_spec

    weights = [p for p in (folder / "models" / n for n in WEIGHTS) if p.is_file()]
    if not weights:
        raise WeightsError(f"model.weights {folder}: not a MONAI bundle this reads (needs configs/inference.json or "
                           "train.json with a network_def, and models/model.pt or models/model.safetensors)")
    try:
        spec, config = network_spec(folder)
        network = build_network(spec)
    except BundleError as exc:
        raise WeightsError(f"model.weights {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any error of the bundle's own definition is the bundle's
        raise WeightsError(f"model.weights {folder}: its network_def does not build "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    theirs, ours = network.state_dict(), model.state_dict()
    differ = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape][:3]
    if differ or any(k not in ours and not k.endswith(_STATS) for k in theirs):  # BatchNorm's statistics: _adapt
        raise WeightsError(f"model.weights {folder}: the bundle's network ({type(network).__name__}) is not the run's "
                           f"model.name (first tensors that differ: {', '.join(differ) or 'extra tensors'}); set "
                           "model.name to the bundle's network")
    return weights[0]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors"
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"model.weights {path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file it cannot read
        raise WeightsError(f"model.weights {path}: not a safetensors file or a PyTorch state dict of tensors "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    for key in ("state_dict", "model", "network", "model_state_dict"):  # checkpoints that wrap the state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"model.weights {path}: holds no state dict (a mapping of tensor names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, "PyTorch state dict"


def _adapt(tensors: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """torchvision's layout onto MONAI's, RGB onto grey, BatchNorm statistics GroupNorm has no use for."""
    out = {}
    for key, value in tensors.items():
        m = _DENSE.match(key)
        key = f"{m.group(1)}.layers.{m.group(2)}{m.group(3)}.{m.group(4)}" if m else key
        key = {"classifier.weight": "class_layers.out.weight", "classifier.bias": "class_layers.out.bias"}.get(key, key)
        out[key] = value
    if any(_DENSE.match(k) or k.startswith("classifier.") for k in tensors):
        notes.append("torchvision DenseNet layout mapped onto MONAI's")
    dropped = [k for k in out if k.endswith(_STATS) and k not in ours]
    if dropped:
        notes.append(f"{len(dropped)} BatchNorm running statistics dropped (the run's model.norm keeps none)")
        out = {k: v for k, v in out.items() if k not in dropped}
    for key, value in list(out.items()):
        target = ours.get(key)
        if target is not None and value.ndim >= 3 and value.shape[1] == 3 and target.shape[1] == 1 \
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            out[key] = value.sum(1, keepdim=True)
            notes.append(f"{key}: its 3 input channels (RGB) summed onto the model's 1")
    return out


def load_weights(model: torch.nn.Module, path: Path, new_head: bool, head: set[str]) -> Loaded:
    """Load `path` into `model` (in place); `head`: the classifier's tensors (medimaging.models.head_keys)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"model.weights {path}: not found (nothing is downloaded: give a local file or bundle folder)")
    ours = model.state_dict()
    source, kind = (_bundle(path, model), "MONAI bundle") if path.is_dir() else (path, None)
    tensors, read_kind = _read(source)
    notes: list[str] = []
    tensors = _adapt(tensors, ours, notes)
    fresh = []
    for key in sorted(head, key=lambda k: (not k.endswith("weight"), k)):  # the weight says it best
        if key not in tensors or tensors[key].shape != ours[key].shape:
            if not new_head:
                got = f"{list(tensors[key].shape)}" if key in tensors else "missing"
                raise WeightsError(f"model.weights {path}: the classifier head {key} is {got}, the run's model has "
                                   f"{list(ours[key].shape)} (another class count); set model.new_head: true to start a "
                                   "new head")
            fresh.append(key)
            tensors.pop(key, None)
    missing = [k for k in ours if k not in tensors and k not in fresh]
    extra = sorted(set(tensors) - set(ours))
    wrong = [f"{k} {list(tensors[k].shape)} (the model's {list(ours[k].shape)})" for k in ours
             if k in tensors and tensors[k].shape != ours[k].shape]
    if missing or extra or wrong:
        said = "; ".join(p for p in (f"missing {', '.join(missing[:3])}" if missing else "",
                                     f"not in the model: {', '.join(extra[:3])}" if extra else "",
                                     f"other shapes: {', '.join(wrong[:3])}" if wrong else "") if p)
        raise WeightsError(f"model.weights {path}: does not fit the run's model ({len(missing)} missing, {len(extra)} "
                           f"extra, {len(wrong)} of another shape: {said})")
    state = {**ours, **{k: v.to(ours[k].dtype) for k, v in tensors.items()}}
    model.load_state_dict(state)
    return Loaded(path=path, sha256=file_sha256(source), format=kind or read_kind, new_head=fresh, notes=notes)


def start_model(model: torch.nn.Module, cfg, head: set[str]) -> Loaded | None:
    """`model` started from cfg.weights when set (checked against cfg.weights_sha256 when that is
    set: the file a run started from must not change under its resume); None without weights."""
    if cfg.weights is None:
        return None
    loaded = load_weights(model, cfg.weights, cfg.new_head, head)
    if cfg.weights_sha256 is not None and loaded.sha256 != cfg.weights_sha256:
        raise WeightsError(f"model.weights {cfg.weights}: its sha256 is {loaded.sha256}, not model.weights_sha256 "
                           f"{cfg.weights_sha256} (the file changed since the run was set up)")
    return loaded
