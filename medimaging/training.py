"""Local training and evaluation loops, and the metrics they report."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import medimaging.monai_loader  # noqa: F401  (MONAI without BERT: before any monai import)
from monai.losses import DiceLoss
from monai.metrics import compute_dice, compute_roc_auc
from torch.utils.data import DataLoader, TensorDataset

from medimaging.augment import augmenter
from medimaging.compute import autocast, device_of
from medimaging.config import AugmentConfig
from medimaging.datasets import Split


def loader(split: Split, batch_size: int, shuffle: bool, seed: int = 0, device: torch.device | None = None) -> DataLoader:
    """Batches of the in-memory split (no per-image decoding: the decoded cache is one tensor);
    pinned host memory when they go to a GPU, so the copy overlaps the computation."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    pin = device is not None and device.type == "cuda"
    return DataLoader(TensorDataset(split.x, split.y), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      pin_memory=pin)


SGD_MOMENTUM = 0.9


def make_optimizer(model: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers (model.freeze) stay as they are
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)


def proximal_step(model: torch.nn.Module, mu: float, lr: float) -> Callable[[], None] | None:
    """FedProx's proximal term mu/2 ||w - w_global||^2, taken as its own gradient step after each
    optimizer step (w -= lr * mu * (w - w_global)); `model` holds w_global now. As a step on the
    weights alone it stays outside DP-SGD's per-sample clipping, which it needs no part of."""
    if mu <= 0:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step() -> None:
        for p, anchor in zip(params, anchors, strict=True):
            p.sub_(lr * mu * (p - anchor))

    return step


class MultiLabelLoss(torch.nn.BCEWithLogitsLoss):
    """Binary cross-entropy per finding, averaged per image first, so `reduction="none"` gives one
    loss per image (what Opacus' ghost clipping sets and expects)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_image = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
        return {"none": per_image, "sum": per_image.sum()}.get(self.reduction, per_image.mean())


class SegmentationLoss(torch.nn.Module):
    """MONAI's soft Dice loss over the foreground labels plus voxel-wise cross-entropy, both
    averaged per image, so `reduction="none"` gives one loss per image (Opacus' ghost clipping)."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
        per_image = ce + self.dice(logits, target[:, None]).flatten(1).mean(1)
        return {"none": per_image, "sum": per_image.sum()}.get(self.reduction, per_image.mean())


class LogitAdjustedLoss(torch.nn.CrossEntropyLoss):
    """Cross-entropy on logits + tau log(prior), the prior being this split's class shares (add-one
    smoothed, so an absent class gets a large negative offset, not -inf). Training alone sees the
    offset; the model's own logits are then calibrated for balanced classes (Menon et al. 2021)."""

    def __init__(self, split: Split, tau: float) -> None:
        super().__init__()
        self.tau, self.counts = tau, torch.bincount(split.y).double() + 1

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        counts = self.counts  # classes beyond the largest label held here are absent: count 0 + 1
        counts = torch.cat([counts, counts.new_ones(max(0, logits.shape[1] - len(counts)))])
        offset = self.tau * torch.log(counts / counts.sum())
        return super().forward(logits + offset.to(logits.device, logits.dtype), target)


def loss_for(split: Split, logit_adjustment: float = 0.0) -> torch.nn.Module:
    """Cross-entropy over classes (with `logit_adjustment` > 0: LogitAdjustedLoss), one sigmoid per
    finding for a multi-label task, Dice + cross-entropy for segmentation."""
    if logit_adjustment > 0:
        if split.segmentation or split.multilabel:
            raise ValueError("train.logit_adjustment is for single-label classification")
        return LogitAdjustedLoss(split, logit_adjustment)
    if split.segmentation:
        return SegmentationLoss()
    return MultiLabelLoss() if split.multilabel else torch.nn.CrossEntropyLoss()


def run_epochs(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Callable[[int], Iterable], epochs: int,
    loss_fn: Callable | None = None, after_step: Callable[[], None] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None, precision: torch.dtype | None = None,
    correct: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """The training loop (`correct`: changes the gradients before each step, e.g. SCAFFOLD's);
    `batches(epoch)` yields (x, y) on the CPU, `augment` changes x there (its
    own seeded generator), then both go to the model's device. `precision`: the autocast dtype of
    the forward pass and loss (None: fp32); fp16 steps through a grad scaler. Returns (mean loss
    of the last epoch, steps)."""
    loss_fn = loss_fn or torch.nn.CrossEntropyLoss()
    device = device_of(model)
    scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None
    model.train()
    steps, last_loss = 0, math.nan
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for x, y in batches(epoch):
            opt.zero_grad()
            if augment is not None:
                x = augment(x)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                loss = loss_fn(model(x), y)
            if scaler is None:
                loss.backward()
                if correct is not None:
                    correct()
                opt.step()
            else:
                scaler.scale(loss).backward()
                if correct is not None:
                    scaler.unscale_(opt)  # the correction is in true gradient units
                    correct()
                scaler.step(opt)
                scaler.update()
            if after_step is not None:
                after_step()
            steps += 1
            total += loss.item() * len(y)
            seen += len(y)
        last_loss = total / max(seen, 1)
    return last_loss, steps


def train_epochs(
    model: torch.nn.Module, split: Split, epochs: int, batch_size: int, lr: float, optimizer: str, seed: int,
    proximal_mu: float = 0.0, augment: AugmentConfig | None = None, precision: torch.dtype | None = None,
    correct: Callable[[], None] | None = None, logit_adjustment: float = 0.0,
) -> tuple[float, int]:
    """Plain (non-private) local training, in place; returns (last-epoch loss, steps)."""
    opt = make_optimizer(model, optimizer, lr)
    batches = lambda epoch: loader(split, batch_size, shuffle=True, seed=seed + epoch, device=device_of(model))  # noqa: E731
    return run_epochs(model, opt, batches, epochs, loss_for(split, logit_adjustment), after_step=proximal_step(model, proximal_mu, lr),
                      augment=augmenter(augment, seed) if augment else None, precision=precision, correct=correct)


def auc(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """ROC AUC: binary, or macro one-vs-rest for several classes; NaN where undefined. `probs` may
    be any per-class scores that rank the images as the probabilities do (`ranking_scores`)."""
    present = torch.unique(labels)
    if len(present) < 2:
        return math.nan
    if num_classes == 2:
        return float(compute_roc_auc(probs[:, 1], labels))
    onehot = torch.nn.functional.one_hot(labels, num_classes)
    keep = [c for c in range(num_classes) if c in present]  # classes absent locally have no AUC
    return float(compute_roc_auc(probs[:, keep], onehot[:, keep], average="macro"))


def ranking_scores(logits: torch.Tensor) -> torch.Tensor:
    """Per-class scores that rank images as softmax probabilities do, without their ties: a float32
    softmax rounds every probability above 1 - 6e-8 to exactly 1 (a logit gap above ~17, common in a
    confident model), so a positive and a negative image there tie and AUC counts half a pair.
    log-softmax in float64 keeps the order down to gaps of ~700 (seed 2's FedAvg model in
    docs/benchmarks.md: 251 tied validation images at one hospital; its mean AUC 0.9339 -> 0.9378)."""
    return torch.log_softmax(logits.double(), dim=1)


def _one_vs_rest(scores: torch.Tensor, positive: torch.Tensor) -> float:
    return float(compute_roc_auc(scores, positive.long())) if 0 < positive.sum() < len(positive) else math.nan


def multilabel_scores(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-finding sigmoid: loss, accuracy over all (image, finding) pairs, macro AUC over the
    findings that are both present and absent here; AUC and accuracy per finding."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()
    probs = torch.sigmoid(logits)
    hits = ((probs > 0.5).float() == y).float()
    keep = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    ranks = logits.double()  # sigmoid is monotone: the logits rank as the probabilities do, without ties at 0 and 1
    value = float(compute_roc_auc(ranks[:, keep], y[:, keep], average="macro")) if keep else math.nan
    return {"loss": loss, "accuracy": hits.mean().item(), "auc": value,
            "auc_per_class": [_one_vs_rest(ranks[:, k], y[:, k]) for k in range(y.shape[1])],
            "accuracy_per_class": hits.mean(0).tolist()}


def dice_scores(model: torch.nn.Module, split: Split, num_classes: int, batch_size: int) -> dict:
    """Segmentation: loss, voxel accuracy, Dice per foreground label (mean over the images where
    the label is present; MONAI's compute_dice) and their mean as `dice`. AUC is NaN."""
    loss_fn, losses, correct, voxels, dice = SegmentationLoss(), [], 0, 0, []
    device = device_of(model)
    for x, y in loader(split, batch_size, shuffle=False):
        logits = model(x.to(device, non_blocking=True)).float().cpu()  # scores on the CPU, as the labels
        losses.append(loss_fn(logits, y) * len(y))
        pred = logits.argmax(1)
        correct, voxels = correct + int((pred == y).sum()), voxels + y.numel()
        onehot = lambda t: torch.nn.functional.one_hot(t, num_classes).movedim(-1, 1)  # noqa: E731
        dice.append(compute_dice(onehot(pred), onehot(y), include_background=False, ignore_empty=True))
    per_label = torch.cat(dice).nanmean(0)  # NaN where a label is absent from every image here
    present = per_label[~per_label.isnan()]
    return {"loss": float(sum(losses)) / len(split), "accuracy": correct / voxels, "auc": math.nan,
            "dice": float(present.mean()) if len(present) else math.nan,
            "dice_per_label": [round(float(v), 4) for v in per_label]}


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, batch_size: int = 256, precision: torch.dtype | None = None) -> torch.Tensor:
    """The model's outputs (logits) for every image of `split`, in order, in float32 on the CPU;
    batches run on the model's device."""
    model.eval()
    device = device_of(model)
    with autocast(device, precision):
        return torch.cat([model(x.to(device, non_blocking=True)).float().cpu()
                          for x, _ in loader(split, batch_size, shuffle=False, device=device)])


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, num_classes: int, batch_size: int = 256,
             precision: torch.dtype | None = None) -> dict[str, float]:
    """Loss, accuracy and AUC of `model` on `split`, and per class (or finding) AUC and accuracy;
    for segmentation Dice per label instead (see dice_scores). Batches run on the model's
    device; the scores are computed on the CPU."""
    model.eval()
    if split.segmentation:
        return dice_scores(model, split, num_classes, max(1, batch_size // 16))
    logits = predict(model, split, batch_size, precision)
    if split.multilabel:
        return multilabel_scores(logits, split.y)
    loss = torch.nn.functional.cross_entropy(logits, split.y).item()
    correct, ranks = (logits.argmax(1) == split.y).float(), ranking_scores(logits)  # softmax keeps the argmax
    return {"loss": loss, "accuracy": correct.mean().item(), "auc": auc(ranks, split.y, num_classes),
            # one vs rest per class; accuracy per class = the share of its images called that class
            "auc_per_class": [_one_vs_rest(ranks[:, c], split.y == c) for c in range(num_classes)],
            "accuracy_per_class": [correct[split.y == c].mean().item() if (split.y == c).any() else math.nan
                                   for c in range(num_classes)]}
