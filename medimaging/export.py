"""A trained model as a MONAI bundle (`aseanfl export`): the next federation, a hospital or the
contest can start from it (`--bundle`, `task.bundle`, `model.weights`), and MONAI's own tools
read it.

What is written, and nothing else (no image, label, file name or per-case score; the model's
weights are the federation's aggregate):
- configs/metadata.json: the task as network_data_format (aseanfl's inputs: images scaled to
  [-1, 1], one side), the source model file's sha256;
- configs/inference.json: the network_def alone, a MONAI class and its arguments (no `$` code);
- models/model.safetensors: the weights, LoRA adapters merged into the layers they adapt (PEFT's
  merge), so the network is plain MONAI again.
The folder is written beside its destination and moved into place once read back whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import medimaging.monai_loader  # noqa: F401  (MONAI without BERT: before any monai import)
import monai
import torch

from medimaging.bundles import Bundle, BundleError, build_network, check_network, read_bundle
from medimaging.config import ModelConfig
from medimaging.models import build_model, network_spec


class ExportError(ValueError):
    """One line naming what cannot be exported, and why."""


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with each PEFT LoRA layer merged into its base layer and replaced by it (in place):
    the state-dict names and shapes of the network before adapters were added."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


def _format(task: str, channels: int, classes: int, side: int, dims: int) -> dict:
    shape = [side] * dims
    image = {"type": "image", "format": "magnitude", "num_channels": channels, "spatial_shape": shape,
             "dtype": "float32", "value_range": [-1, 1], "is_patch_data": False}
    pred = ({"type": "probabilities", "format": "classification", "spatial_shape": [1, classes]}
            if task == "classification" else {"type": "image", "format": "segmentation", "spatial_shape": shape})
    return {"inputs": {"image": image},
            "outputs": {"pred": {**pred, "num_channels": classes, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False}}}


def export_bundle(out: Path, model_file: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, *, task: str,
                  in_channels: int, num_classes: int, image_size: int, spatial_dims: int, private: bool,
                  sha256: str, name: str) -> Bundle:
    """Write the bundle at `out` (which must not exist); the bundle as read back."""
    if out.exists():
        raise ExportError(f"--bundle {out}: already exists; give a new folder (nothing is overwritten)")
    plain = ModelConfig(**{**cfg.model_dump(), "adapters": None, "freeze": []})
    spec = network_spec(plain, in_channels, num_classes, image_size, spatial_dims)
    if spec is None:
        raise ExportError(f"model.name={cfg.name}: aseanfl changes its residual layers after MONAI builds them, so "
                          "no network_def rebuilds it; cnn, unet, densenet121 and bundle networks export")
    model = build_model(cfg, in_channels, num_classes, image_size, private, spatial_dims)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{model_file}: its tensors are not the card's model ({str(exc).splitlines()[0][:160]})") \
            from None
    weights = {k: v.contiguous() for k, v in merge_adapters(model).state_dict().items()}
    try:
        build_network(spec).load_state_dict(weights)
    except RuntimeError:  # e.g. DP-SGD's GroupNorm where MONAI's class builds BatchNorm
        raise ExportError(f"{model_file}: the trained layers are not MONAI's {spec.target} with these arguments "
                          "(DP-SGD replaced its BatchNorm with GroupNorm); train with model.norm group or "
                          "instance to export it") from None
    part = out.parent / f".{out.name}.part"
    shutil.rmtree(part, ignore_errors=True)
    try:
        (part / "configs").mkdir(parents=True)
        (part / "models").mkdir()
        meta = {"name": name, "version": "1.0.0", "task": f"{task}, trained by a federation (aseanfl)",
                "description": f"exported by aseanfl from {model_file.name} (sha256 {sha256})",
                "monai_version": monai.__version__, "pytorch_version": torch.__version__,
                "network_data_format": _format(task, in_channels, num_classes, image_size, spatial_dims)}
        (part / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        network_def = {"_target_": spec.target, **spec.args}
        (part / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}, indent=4) + "\n")
        from safetensors.torch import save_file

        save_file(weights, str(part / "models" / "model.safetensors"))
        check_network(read_bundle(part), image_size)
        part.rename(out)
    except (OSError, BundleError) as exc:
        shutil.rmtree(part, ignore_errors=True)
        raise ExportError(f"--bundle {out}: not written ({exc})") from None
    return read_bundle(out)
