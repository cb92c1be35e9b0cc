"""Classifier calibration from federated feature statistics (`strategy.calibrate_head`).

Under label skew the body a federation learns is better than its head: each hospital's few
classes pull the last layer their way (CCVR, Luo et al., NeurIPS 2021, "No fear of
heterogeneity"). After the last round every hospital computes, with the final global model and
on its own training images, the inputs of the classifier's last linear layer ("features") and
releases three sums: images per class, the features summed per class, and the features' second
moment (sum of f f^T over its images). The server adds them up, which gives exactly the pooled
class means and within-class covariance, and refits the head as the Gaussian classifier with one
shared covariance (linear discriminant analysis): w_c = S^-1 mu_c, b_c = -mu_c' S^-1 mu_c / 2 +
log prior_c. S is shrunk towards a scaled identity by the Oracle Approximating Shrinkage formula
(Chen et al., IEEE TSP 2010; as scikit-learn's `oas`), which needs only S and the image count,
so nothing is tuned. CCVR samples virtual features from such Gaussians and trains the head on
them; the closed form gives the same kind of head without sampling or a learning rate.
With `strategy.personal_heads` the server also fits each hospital its own head from the same
sums (`personal_heads`): nothing more leaves a hospital, and each gets back only its own head.

What leaves a hospital: sums over at least `min_count` images of a class; a class with fewer
images there is left out of all three (its count released as 0, which names no patient)."""

from __future__ import annotations

import numpy as np
import torch

from medimaging.datasets import Split
from medimaging.compute import device_of
from medimaging.models import last_linear
from medimaging.training import loader

MAX_FEATURES = 4096  # a d x d moment in float64: 128 MiB at this width (64 MiB sent); wider heads are refused
# A hospital's own class mean counts against the federation's as its images against this many
# (personal_heads): 100 lets a hospital with hundreds of images of a class speak for it, one with
# twenty mostly borrow. Chosen among 20, 100 and 500 on seeds 42, 1, 2, 3, 4 and checked on 5, 6, 7
# (docs/benchmarks.md#personal-heads); 100 and 500 were within 0.001 of each other.
PRIOR_IMAGES = 100.0


class CalibrationError(ValueError):
    """The model or the statistics do not allow a head refit (says what, never a value)."""


def head_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    """The classifier's last linear layer and its name in the state dict."""
    head = last_linear(model)
    if head is None:
        raise CalibrationError("the model has no linear classifier head to calibrate")
    name, layer = head
    if layer.in_features > MAX_FEATURES:
        raise CalibrationError(f"the classifier head takes {layer.in_features} features, more than the {MAX_FEATURES} "
                               "a calibration moment allows")
    return name, layer


@torch.no_grad()
def feature_sums(model: torch.nn.Module, split: Split, num_classes: int, min_count: int,
                 batch_size: int = 256) -> dict[str, np.ndarray]:
    """This hospital's release: {"count": (C,), "sum": (C, d), "moment": (d (d + 1) / 2,)} in
    float64, over the images of the classes it holds at least `min_count` images of; the moment
    is symmetric, so only its upper triangle travels (row by row: 4.2 MB rather than 8.4 at d = 1024)."""
    if split.multilabel or split.segmentation:
        raise CalibrationError("head calibration is for single-label classification")
    _, head = head_layer(model)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach().flatten(1)))
    model.eval()
    d = head.in_features
    count, sums, moment = np.zeros(num_classes), np.zeros((num_classes, d)), np.zeros((d, d))
    labels = split.y.long()
    held = torch.bincount(labels, minlength=num_classes)[:num_classes]
    released = held >= min_count  # the small-cell rule, per class
    device = device_of(model)
    try:
        for x, y in loader(split, batch_size, shuffle=False, device=device):
            seen.clear()
            model(x.to(device))
            f = seen[-1].double().cpu()
            keep = released[y.long()]
            f, y = f[keep], y.long()[keep]
            moment += (f.T @ f).numpy()
            for c in torch.unique(y).tolist():
                sums[c] += f[y == c].sum(0).numpy()
                count[c] += int((y == c).sum())
    finally:
        hook.remove()
    return {"count": count, "sum": sums, "moment": moment[np.triu_indices(d)]}


def _square(triangle: np.ndarray, d: int) -> np.ndarray:
    """The symmetric d x d matrix whose upper triangle (row by row) is `triangle`."""
    full = np.zeros((d, d))
    full[np.triu_indices(d)] = triangle
    return full + np.triu(full, 1).T


def check_sums(got: dict[str, np.ndarray], num_classes: int, d: int) -> str | None:
    """Why one hospital's release cannot be used (shapes, finite values, counts), or None."""
    want = {"count": (num_classes,), "sum": (num_classes, d), "moment": (d * (d + 1) // 2,)}
    if set(got) - set(want):
        return f"unexpected arrays {sorted(set(got) - set(want))[:3]}"
    for key, shape in want.items():
        if key not in got:
            return f"no {key!r} array"
        if tuple(got[key].shape) != shape:
            return f"{key!r} has shape {tuple(got[key].shape)}, not {shape}"
        if not np.isfinite(got[key]).all():
            return f"{key!r} holds NaN or Inf"
    count = got["count"]
    if (count < 0).any() or (count != np.round(count)).any():
        return "'count' holds a negative or fractional count"
    return None


def _shared_covariance(count: np.ndarray, sums: np.ndarray, moment: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The pooled sums -> (class means (C, d), within-class covariance shrunk by OAS, shrinkage)."""
    if (count <= 0).any():
        raise CalibrationError(f"classes {[int(c) for c in np.flatnonzero(count <= 0)]} have no released images")
    n, d = float(count.sum()), moment.shape[0]
    means = sums / count[:, None]
    within = moment - (means.T * count) @ means  # sum over images of (f - mu_y)(f - mu_y)^T
    cov = (within + within.T) / (2 * n)
    mu = np.trace(cov) / d  # OAS, as sklearn.covariance.oas writes it
    if mu <= 0:
        raise CalibrationError("the features do not vary over the images (zero covariance)")
    alpha = float(np.mean(cov ** 2))
    den = (n + 1) * (alpha - mu ** 2 / d)
    shrinkage = 1.0 if den <= 0 else min((alpha + mu ** 2) / den, 1.0)
    return means, (1 - shrinkage) * cov + shrinkage * mu * np.eye(d), float(shrinkage)


def _lda(weight: np.ndarray, means: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w, b) with w = S^-1 mu already solved: b_c = -mu_c' S^-1 mu_c / 2 + log prior_c."""
    bias = -0.5 * np.einsum("cd,cd->c", weight, means) + np.log(prior)
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise CalibrationError("the refit head is not finite")
    return weight, bias


def refit_head(count: np.ndarray, sums: np.ndarray, moment: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The pooled sums -> (weight (C, d), bias (C,), shrinkage): the shared-covariance Gaussian
    classifier, its covariance shrunk by OAS."""
    means, shrunk, shrinkage = _shared_covariance(count, sums, moment)
    weight, bias = _lda(np.linalg.solve(shrunk, means.T).T, means, count / count.sum())
    return weight, bias, shrinkage


def personal_heads(count: np.ndarray, sums: np.ndarray, moment: np.ndarray, own: list[dict[str, np.ndarray]],
                   prior_images: float = PRIOR_IMAGES) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each hospital's own head (`strategy.personal_heads`), from the pooled sums and the
    hospital's own release: the federation's covariance, with class means and class shares that
    are the hospital's own, shrunk towards the federation's as if the federation's were
    `prior_images` more images of each class (a class it released nothing of takes the
    federation's mean; a hospital that released one class keeps all the federation's means).
    Under label skew the hospitals see the same diseases in different proportions: the
    covariance needs every hospital's images, the shares (and a little the means) are where
    they differ."""
    means, shrunk, _ = _shared_covariance(count, sums, moment)
    share = count / count.sum()
    mixed, priors = [], []
    for release in own:
        n = release["count"]
        local = np.where(n[:, None] > 0, release["sum"] / np.maximum(n, 1)[:, None], means)
        # One released class: its mean alone would move the boundary (its training features sit
        # further out than its validation cases'; accuracy 1.00 -> 0.96, 0.90 -> 0.85 at such
        # hospitals), so it keeps the federation's means and only its class shares are its own.
        t = (n / (n + prior_images))[:, None] * ((n > 0).sum() > 1)
        mixed.append(t * local + (1 - t) * means)
        priors.append((n + prior_images * share) / (n.sum() + prior_images))
    if not mixed:
        return []
    c = means.shape[0]
    weights = np.linalg.solve(shrunk, np.concatenate(mixed).T).T  # one solve for every hospital's means
    return [_lda(weights[i * c:(i + 1) * c], mu, prior) for i, (mu, prior) in enumerate(zip(mixed, priors))]


def pooled(releases: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The federation's sums (exact: every release is a sum), the moment as the full d x d matrix."""
    count, sums, moment = (sum(r[k] for r in releases) for k in ("count", "sum", "moment"))
    return count, sums, _square(moment, sums.shape[1])
