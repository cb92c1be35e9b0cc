"""Train part of a pretrained model: layers frozen by name prefix (model.freeze) and LoRA adapters
(model.adapters, through PEFT). What is frozen keeps model.weights' values at every hospital, so
it never travels after a hospital's first round; only the trainable tensors do, both ways.

The rules every side applies the same way (the server to know what it sends and takes back, the
hospital to know what it trains and sends):
- a parameter is trainable unless a freeze prefix covers it, or adapters are on and it is
  neither an adapter's nor the classifier head's;
- a module's buffers (BatchNorm's running statistics) travel with it when any of its own
  parameters is trainable; a frozen BatchNorm stays in eval mode (it normalises with its
  pretrained statistics and never updates them), so nothing frozen changes at a hospital.
"""

from __future__ import annotations

import os
import types

import torch

from medimaging.config import ModelConfig

BODY = "body"  # model.freeze: every layer but the classifier head


class FineTuneError(ValueError):
    """model.freeze / model.adapters do not fit the model; one line naming the field."""


def _covered(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _default_targets(model: torch.nn.Module, head: set[str]) -> list[str]:
    layers = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    return [n for n, m in model.named_modules() if isinstance(m, layers) and f"{n}.weight" not in head]


def _add_lora(model: torch.nn.Module, cfg: ModelConfig, head: set[str]) -> torch.nn.Module:
    # PEFT (Hugging Face) rather than a hand-written LoRA: its layers for Conv1d/2d/3d and Linear
    # are maintained and tested, and Opacus computes their per-sample gradients (they are made of
    # plain Conv/Linear modules). inject_adapter_in_model adds the layers in place, without
    # PeftModel's wrapper, so the network keeps its own forward and state-dict names.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hospitals are offline: PEFT's Hugging Face libraries never ask the hub
    from peft import LoraConfig, inject_adapter_in_model

    a = cfg.adapters
    names = {n for n, _ in model.named_modules()}
    targets = a.targets or _default_targets(model, head)
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise FineTuneError(f"model.adapters.targets: {', '.join(unknown[:3])} name no layer of model.name="
                            f"{cfg.name} (its layers: {', '.join(_default_targets(model, set())[:6])}, ...)")
    exact = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    try:
        return inject_adapter_in_model(LoraConfig(r=a.rank, lora_alpha=a.alpha or a.rank, lora_dropout=0.0,
                                                  target_modules=exact), model)
    except ValueError as exc:  # a layer kind PEFT cannot adapt (a norm, a pooling)
        raise FineTuneError(f"model.adapters.targets: {' '.join(str(exc).split())[:200]}") from None


def fine_tune_part(model: torch.nn.Module, cfg: ModelConfig, head: set[str]) -> torch.nn.Module:
    """`model` (holding its start weights or not: adapters start as a zero change) with adapters
    added and requires_grad set as cfg says; unchanged without freeze or adapters. `head`: the
    classifier head's state-dict names (medimaging.models.head_keys), before adapters."""
    if not cfg.fine_tunes_part:
        return model
    prefixes = [p for p in cfg.freeze if p != BODY]
    unknown = [p for p in prefixes if not any(_covered(n, [p]) for n in model.state_dict())]
    if unknown:
        raise FineTuneError(f"model.freeze: {', '.join(unknown[:3])} is no layer of model.name={cfg.name} (its "
                            f"layers: {', '.join(sorted({n.split('.')[0] for n in model.state_dict()})[:8])})")
    if cfg.adapters is not None:
        model = _add_lora(model, cfg, head)
    head_modules = {k.rsplit(".", 1)[0] for k in head}
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        in_head = owner in head_modules
        frozen = _covered(name, prefixes) or (BODY in cfg.freeze and not in_head)
        if cfg.adapters is not None and "lora_" not in name and not in_head:
            frozen = True
        param.requires_grad_(not frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise FineTuneError("model.freeze: it covers every layer; nothing would be trained")
    for module in model.modules():  # a frozen BatchNorm keeps its statistics too
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.weight is not None \
                and not module.weight.requires_grad:
            _always_eval(module)
    return model


def _always_eval(module: torch.nn.Module) -> None:
    """The module normalises with its pretrained statistics and never updates them, whatever
    model.train() says (the usual way to fine-tune on top of a frozen BatchNorm)."""
    module.eval()
    module.train = types.MethodType(lambda self, mode=True: self, module)


def frozen_keys(model: torch.nn.Module) -> set[str]:
    """state_dict names that nobody trains: frozen parameters, and the buffers of modules none of
    whose own parameters is trained. Empty when everything trains."""
    out = set()
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        trained = any(p.requires_grad for _, p in own)
        dot = f"{prefix}." if prefix else ""
        out |= {dot + n for n, p in own if not p.requires_grad}
        if own and not trained:
            out |= {dot + n for n, _ in module.named_buffers(recurse=False)}
    return out


def share(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters): what the run says it fine-tunes."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
