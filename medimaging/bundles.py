"""A MONAI bundle as the task (`aseanfl simulate --bundle DIR`, federation.yaml's `task.bundle`).

A bundle is read, never run. MONAI's own ConfigParser evaluates `$` expressions (Python) and
instantiates any `_target_`; a coordinator's bundle would then run code at the coordinator, and
the network it defines at every hospital. So only this is taken from it:
- configs/metadata.json, `network_data_format`: one image input (channels, spatial shape) and
  one output (`classification` or `segmentation`, its channels): the task check reads these;
- configs/inference.json|yaml (or train.json|yaml), `network_def`: a network aseanfl builds
  (medimaging.config.NETWORKS), with literal arguments; `@` references to other literal
  entries are followed, `$` code is refused;
- models/model.safetensors or models/model.pt: the start weights (optional; tensors only).
Its transforms, handlers, scripts/ and TorchScript are not used: hospitals decode images with
their own pipeline (site.yaml), to the bundle's channels and size."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from medimaging.config import NETWORKS, NetworkSpec

CONFIGS = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml", "train.yml")
WEIGHTS = ("model.safetensors", "model.pt")
# how the Model Zoo's classification bundles name their output's format
CLASSIFICATION = {"classification": "classification", "classes": "classification", "labels": "classification"}
_MULTIPLE = re.compile(r"^\s*(\d*)\s*\*?\s*n\s*$")  # "16*n", "n": any multiple of 16 (of 1)


class BundleError(ValueError):
    """One line naming the bundle, its file and field, and what aseanfl cannot take."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str
    version: str
    kind: str  # classification | segmentation
    in_channels: int
    num_classes: int  # output channels: classes, or mask labels with the background
    spatial_dims: int
    side: int | None  # the input's fixed side, or None: any multiple of `multiple`
    multiple: int
    network: NetworkSpec
    weights: Path | None
    labels: tuple[str, ...]  # the output's channel_def, in channel order (may be empty)
    notes: tuple[str, ...]

    def size_for(self, native: int) -> int:
        """The side images are resized to: the bundle's own, or the data's rounded up to a multiple."""
        return self.side or -(-native // self.multiple) * self.multiple

    def check_size(self, size: int, field: str) -> None:
        if self.side is not None and size != self.side:
            raise BundleError(f"{field}: {size}, but bundle {self.path} takes images of {self.side} a side "
                              "(metadata.json inputs spatial_shape)")
        if self.side is None and size % self.multiple:
            raise BundleError(f"{field}: {size} is not a multiple of {self.multiple}, as bundle {self.path} needs "
                              "(metadata.json inputs spatial_shape)")

    def model_fields(self) -> dict:
        """model.* for the run: the bundle's network, and its weights to start from."""
        out = {"name": "monai", "network": self.network.model_dump(mode="json")}
        return {**out, "weights": str(self.path)} if self.weights else out

    def line(self) -> str:
        dims = f"{self.spatial_dims}D"
        return (f"MONAI bundle {self.name} {self.version}: {self.kind}, {dims}, {self.in_channels} channel(s) in, "
                f"{self.num_classes} out, network {self.network.target}"
                + ("" if self.weights else ", no weights (random start)") + "".join(f"; {n}" for n in self.notes))


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise BundleError(f"bundle {path}: not readable {path.suffix[1:].upper()} "
                          f"({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(tree, dict):
        raise BundleError(f"bundle {path}: expected a mapping of entries")
    return tree


def _follow(value, tree: dict, where: str, depth: int = 0):
    """`@id` references (MONAI's syntax, `::` or `#` between levels) replaced by the literal they
    name; anything else stays for NetworkSpec to check."""
    if depth > 16:
        raise BundleError(f"{where}: references nested too deep")
    if isinstance(value, str) and value.startswith("@"):
        node = tree
        for part in re.split(r"::|#", value[1:]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise BundleError(f"{where}: reference {value!r} names no entry of the config")
        return _follow(node, tree, where, depth + 1)
    if isinstance(value, list):
        return [_follow(v, tree, f"{where}.{i}", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _follow(v, tree, f"{where}.{k}", depth + 1) for k, v in value.items()}
    return value


def network_spec(folder: Path) -> tuple[NetworkSpec, Path]:
    """The bundle's network_def as a NetworkSpec, and the config file it came from."""
    configs = [folder / "configs" / n for n in CONFIGS if (folder / "configs" / n).is_file()]
    trees = [(p, _load(p)) for p in configs]
    found = [(p, t) for p, t in trees if "network_def" in t]
    if not found:
        raise BundleError(f"bundle {folder}: no configs/{{inference,train}}.{{json,yaml}} with a network_def")
    path, tree = found[0]
    where = f"bundle {path}: network_def"
    definition = _follow(tree["network_def"], tree, where)
    if not isinstance(definition, dict) or not isinstance(definition.get("_target_"), str):
        raise BundleError(f"{where}: not a mapping with a _target_ (a network built by code is not read)")
    target = definition["_target_"].removeprefix("monai.networks.nets.")
    if target not in NETWORKS:
        raise BundleError(f"{where}: _target_ {definition['_target_']!r} is not a MONAI network aseanfl builds "
                          f"({', '.join(NETWORKS)}); a bundle's own network code would run at every hospital")
    extra = [k for k in definition if k.startswith("_") and k not in ("_target_", "_desc_")]
    if extra:
        raise BundleError(f"{where}: {extra[0]} is MONAI config logic aseanfl does not run; give the arguments only")
    args = {k: v for k, v in definition.items() if not k.startswith("_")}
    try:
        return NetworkSpec(target=target, args=args), path
    except ValidationError as exc:
        said = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise BundleError(f"{where}.{said.removeprefix('args.')}") from None


def build_network(spec: NetworkSpec) -> torch.nn.Module:
    """The network a NetworkSpec names (same code at the coordinator and every hospital)."""
    import medimaging.monai_loader  # noqa: F401  (MONAI without BERT)
    import monai.networks.nets as nets

    return getattr(nets, spec.target)(**spec.args)


def _side(shape, where: str) -> tuple[int | None, int]:
    if not isinstance(shape, list) or len(shape) not in (2, 3):
        raise BundleError(f"{where}: {shape!r} is not a 2D or 3D shape")
    sides = set()
    for s in shape:
        m = _MULTIPLE.match(s) if isinstance(s, str) else None
        if isinstance(s, int) and s >= 8:
            sides.add((s, 1))
        elif m:
            sides.add((None, int(m.group(1) or 1)))
        else:
            raise BundleError(f"{where}: {s!r} is not a side aseanfl can resize to (a number >= 8, or 'k*n')")
    if len(sides) > 1:
        raise BundleError(f"{where}: {shape} is not square (cubic); aseanfl resizes every image to one side")
    return sides.pop()


def _one(section, what: str, where: str) -> dict:
    if not isinstance(section, dict) or len(section) != 1 or not isinstance(next(iter(section.values())), dict):
        raise BundleError(f"{where} network_data_format.{what}: aseanfl takes bundles with one {what[:-1]} "
                          f"(found {len(section) if isinstance(section, dict) else 'none'})")
    return next(iter(section.values()))


def _stamp(folder: Path) -> tuple:
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for sub in ("configs", "models")
                 for p in sorted((folder / sub).glob("*")) if p.is_file())


def read_bundle(folder: Path) -> Bundle:
    """The bundle at `folder`, checked; BundleError with one line otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder}: not a folder (a MONAI bundle is a folder with configs/ and models/)")
    return _read(folder, _stamp(folder))  # the path as given: it names the bundle in every message


@lru_cache(maxsize=8)
def _read(folder: Path, _stamp: tuple) -> Bundle:  # noqa: C901 - one check after another, each its own line
    meta_path = folder / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise BundleError(f"bundle {folder}: no configs/metadata.json (its network_data_format says the task)")
    meta, where = _load(meta_path), f"bundle {meta_path}:"
    formats = meta.get("network_data_format")
    if not isinstance(formats, dict):
        raise BundleError(f"{where} no network_data_format (inputs and outputs), so the task cannot be checked")
    inp, out = _one(formats.get("inputs"), "inputs", where), _one(formats.get("outputs"), "outputs", where)
    channels, classes = inp.get("num_channels"), out.get("num_channels")
    kind = out.get("format")
    kind = CLASSIFICATION.get(kind, kind) if isinstance(kind, str) else kind
    if kind not in ("classification", "segmentation"):
        raise BundleError(f"{where} outputs format {kind!r}: aseanfl trains classification and segmentation "
                          "bundles (detection, regression and generative bundles need their own losses)")
    if not isinstance(channels, int) or channels < 1 or channels > 4:
        raise BundleError(f"{where} inputs num_channels {channels!r}: aseanfl decodes 1 to 4 channels")
    if not isinstance(classes, int) or classes < 2:
        raise BundleError(f"{where} outputs num_channels {classes!r}: aseanfl's networks give one output per class "
                          "or mask label, background included (at least 2; a single sigmoid output is not read)")
    side, multiple = _side(inp.get("spatial_shape"), f"{where} inputs spatial_shape")
    dims = len(inp["spatial_shape"])
    spec, _config = network_spec(folder)
    if NETWORKS[spec.target] != kind:
        raise BundleError(f"{where} outputs format {kind}, but network_def's {spec.target} is a "
                          f"{NETWORKS[spec.target]} network")
    weights = [folder / "models" / n for n in WEIGHTS if (folder / "models" / n).is_file()]
    if not weights and (folder / "models" / "model.ts").is_file():
        raise BundleError(f"bundle {folder}: models/ holds TorchScript only (model.ts); its graph is code, not "
                          "weights. Give models/model.pt or model.safetensors")
    defs = out.get("channel_def")
    labels = tuple(str(defs[k]) for k in sorted(defs, key=lambda k: int(k) if str(k).isdigit() else 0)) \
        if isinstance(defs, dict) and len(defs) == classes else ()
    notes = []
    if inp.get("is_patch_data"):
        notes.append("trained on patches; aseanfl resizes whole images to that size")
    if inp.get("value_range") not in (None, [-1, 1]):
        notes.append(f"its input range {inp.get('value_range')} is not aseanfl's [-1, 1]: fine-tuning adapts")
    return Bundle(path=folder, name=str(meta.get("name") or folder.name), version=str(meta.get("version", "?")),
                  kind=kind, in_channels=channels, num_classes=classes, spatial_dims=dims, side=side,
                  multiple=multiple, network=spec, weights=weights[0] if weights else None, labels=labels,
                  notes=tuple(notes))


def holds_network(model) -> bool:
    """A config's model section already holds a bundle's network (a run's config.yaml): the
    bundle need not be read again, nor be there (the config is read as a model card)."""
    network = model.get("network") if isinstance(model, dict) else getattr(model, "network", None)
    return network is not None


def bundle_model(model, bundle: Bundle, field: str) -> dict:
    """A config's model section with the bundle's network and weights filled in (a file given
    as model.weights stays: e.g. last year's fine-tune of the same network)."""
    model = dict(model.model_dump() if hasattr(model, "model_dump") else model or {})
    if model.get("name") not in (None, "monai"):
        raise BundleError(f"model.name={model['name']}: {field} gives the network; leave model.name out")
    fields = bundle.model_fields()
    if model.get("weights"):
        fields.pop("weights", None)
    return {**model, **fields}


_CHECKED: set[tuple] = set()


def check_network(bundle: Bundle, size: int) -> None:
    """The network, built, takes the task's images and gives the bundle's outputs (one forward pass
    of zeros at the coordinator: hospitals then get a task their decoding fits)."""
    key = (bundle.path, bundle.network.model_dump_json(), size)
    if key in _CHECKED:
        return
    shape = (bundle.in_channels, *(size,) * bundle.spatial_dims)
    want = (1, bundle.num_classes) + ((size,) * bundle.spatial_dims if bundle.kind == "segmentation" else ())
    try:
        net = build_network(bundle.network).eval()
        with torch.no_grad():
            got = tuple(net(torch.zeros(1, *shape)).shape)
    except Exception as exc:  # noqa: BLE001 - any failure of the definition is the bundle's
        raise BundleError(f"bundle {bundle.path}: its network_def ({bundle.network.target}) does not take "
                          f"{list(shape)} images ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    if got != want:
        raise BundleError(f"bundle {bundle.path}: its network_def ({bundle.network.target}) gives {list(got[1:])} "
                          f"for one image, metadata.json's outputs say {list(want[1:])}")
    _CHECKED.add(key)
