"""Scoring a model at a hospital for federated evaluation (the contest): the only figures that
leave are those of a fixed schema, computed here from the hospital's own labelled cases.

Per hospital (`score`): the number of cases; per class the cases, and with a model's class
probabilities: AUC (binary; one-vs-rest per class and their macro mean for several classes),
accuracy, and for two classes sensitivity and specificity at the operating point (probability of
class 1 >= `threshold`), each with a 95 % percentile-bootstrap interval (seeded: the same model
and data give the same numbers). For the pooled figures the hospital also releases confusion
counts: the 2x2 table at the operating point, and cumulative counts of positives and negatives
scored at or above each point of a fixed grid (an ROC curve on the grid). For segmentation:
Dice per label, the mean over cases with an interval, plus the sums behind a global Dice.

Small-cell rule: a figure computed on fewer than `min_cases` positives or negatives (as the
figure needs them) is withheld, with the reason, and so are the counts behind it, because a
figure on very few patients can reveal them.

Pooled over hospitals (`pool`): accuracy, sensitivity, specificity and global Dice are exact
(sums of counts; 95 % Wilson intervals for the proportions); the pooled AUC is the trapezoid area under the summed grid ROC: exactly the AUC
of the union's scores rounded to the grid, an approximation of the exact pooled AUC by at most
the share of positive-negative pairs whose scores fall between the same two grid points; its 95 %
interval is a bootstrap that resamples cases within each hospital and class from the released
per-bin counts (seeded)."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

GRID = 101  # ROC points: thresholds 0.00, 0.01, ..., 1.00


class Fixed(BaseModel):
    """Nothing outside the schema: a hospital's audit checks every reply against it."""

    model_config = ConfigDict(extra="forbid")


class Interval(Fixed):
    value: float | None = None
    low: float | None = None
    high: float | None = None
    withheld: str | None = None  # why not released


class ClassCounts(Fixed):
    """One class against the rest: its cases, and the grid ROC counts (withheld with the AUC)."""

    cases: int
    auc: Interval
    tp_at: list[int] | None = None  # positives with probability >= each grid point
    fp_at: list[int] | None = None  # negatives with probability >= each grid point


class SiteScores(Fixed):
    """What a hospital releases about one model: aggregate figures only."""

    task: str  # classification | segmentation
    split: str | None = None  # the hospital's cases it was scored on: test | validation
    cases: int
    min_cases: int
    threshold: float | None = None
    accuracy: Interval | None = None
    correct: int | None = None
    sensitivity: Interval | None = None
    specificity: Interval | None = None
    confusion: dict[str, int] | None = None  # tp, fp, tn, fn at the operating point (two classes)
    auc: Interval | None = None  # binary AUC, or the macro mean over classes
    classes: list[ClassCounts] = Field(default_factory=list)
    dice: list[Interval] = Field(default_factory=list)  # per foreground label
    dice_sums: list[dict[str, float]] | None = None  # per label: intersection, predicted, truth voxels
    dp_epsilon: float | None = None  # released under epsilon-DP: every figure from Laplace-noised counts


def _rank_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half (exact)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, n in zip(first, counts, strict=True):
        ranks[order[start:start + n]] = start + (n + 1) / 2.0
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _boot(stat, n: int, rng: np.random.Generator, rounds: int) -> tuple[float, float]:
    values = []
    for _ in range(rounds):
        v = stat(rng.integers(0, n, n))
        if v is not None and not math.isnan(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _withheld(what: str, have: int, min_cases: int) -> Interval:
    return Interval(withheld=f"{have} {what}, fewer than min_cases {min_cases}")


def grid_counts(scores: np.ndarray, positive: np.ndarray, grid: int = GRID) -> tuple[list[int], list[int]]:
    """Cumulative counts of positives and of negatives scored at or above each grid point."""
    points = np.round(np.linspace(0.0, 1.0, grid), 10)
    bins = np.clip(np.floor(np.round(scores * (grid - 1), 10)).astype(int), 0, grid - 1)  # the last point at or below
    pos = np.bincount(bins[positive], minlength=grid)[::-1].cumsum()[::-1]
    neg = np.bincount(bins[~positive], minlength=grid)[::-1].cumsum()[::-1]
    assert len(points) == grid
    return pos.astype(int).tolist(), neg.astype(int).tolist()


def grid_auc(tp_at: list[int], fp_at: list[int]) -> float:
    """Trapezoid area under the ROC points (fp, tp) of cumulative grid counts."""
    tp, fp = np.asarray(tp_at, dtype=np.float64), np.asarray(fp_at, dtype=np.float64)
    if tp[0] == 0 or fp[0] == 0:
        return math.nan
    tpr = np.concatenate([tp / tp[0], [0.0]])
    fpr = np.concatenate([fp / fp[0], [0.0]])
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0))


def _auc_interval(scores, positive, min_cases, rng, rounds) -> Interval:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos < min_cases:
        return _withheld("positive cases", n_pos, min_cases)
    if n_neg < min_cases:
        return _withheld("negative cases", n_neg, min_cases)

    def stat(idx):
        p = positive[idx]
        return _rank_auc(scores[idx], p) if 0 < p.sum() < len(p) else None

    low, high = _boot(stat, len(scores), rng, rounds)
    return Interval(value=_rank_auc(scores, positive), low=low, high=high)


def _share(hits: np.ndarray, min_cases: int, what: str, rng, rounds) -> Interval:
    if len(hits) < min_cases:
        return _withheld(what, len(hits), min_cases)
    low, high = _boot(lambda idx: float(hits[idx].mean()), len(hits), rng, rounds)
    return Interval(value=float(hits.mean()), low=low, high=high)


def score(probs: np.ndarray, labels: np.ndarray, min_cases: int = 20, threshold: float = 0.5, seed: int = 0,
          rounds: int = 1000) -> SiteScores:
    """A classification model's figures at this hospital from its class probabilities (N x C)
    and the true classes (N)."""
    rng = np.random.default_rng(seed)
    labels = labels.astype(int)
    num_classes = probs.shape[1]
    n = len(labels)
    pred = (probs[:, 1] >= threshold).astype(int) if num_classes == 2 else probs.argmax(1)
    hits = pred == labels
    out = SiteScores(task="classification", cases=n, min_cases=min_cases,
                     threshold=threshold if num_classes == 2 else None,
                     accuracy=_share(hits, min_cases, "cases", rng, rounds))
    if out.accuracy.withheld is None:
        out.correct = int(hits.sum())
    for c in range(num_classes):
        positive = labels == c
        entry = ClassCounts(cases=int(positive.sum()), auc=_auc_interval(probs[:, c], positive, min_cases, rng, rounds))
        if entry.auc.withheld is None:
            entry.tp_at, entry.fp_at = grid_counts(probs[:, c], positive)
        out.classes.append(entry)
    if num_classes == 2:
        positive = labels == 1
        out.auc = out.classes[1].auc
        out.sensitivity = _share(hits[positive], min_cases, "positive cases", rng, rounds)
        out.specificity = _share(hits[~positive], min_cases, "negative cases", rng, rounds)
        if out.sensitivity.withheld is None and out.specificity.withheld is None:
            out.confusion = {"tp": int((pred[positive] == 1).sum()), "fn": int((pred[positive] == 0).sum()),
                             "tn": int((pred[~positive] == 0).sum()), "fp": int((pred[~positive] == 1).sum())}
    else:
        released = [e.auc.value for e in out.classes if e.auc.withheld is None]
        out.auc = Interval(value=float(np.mean(released))) if released else Interval(
            withheld="no class has min_cases cases in and out of it")
    return out


NOISE_BAND = 5  # under DP noise, scores are counted in bands of 0.05 (21 cells per class, not 101)


def noised_score(probs: np.ndarray, labels: np.ndarray, epsilon: float, noise_seed: int, min_cases: int = 20,
                 threshold: float = 0.5, seed: int = 0, rounds: int = 1000) -> SiteScores:
    """A two-class model's figures released under epsilon-differential privacy (Laplace
    mechanism). The hospital counts its cases per score band of 0.05, positives and negatives
    apart (one patient is in exactly one of the 2 x 21 cells: sensitivity 1), adds
    Laplace(1/epsilon) noise to every cell and rounds. The counts released for pooling are not
    clipped (sums over hospitals stay unbiased; a cell may be negative); this hospital's own
    figures come from them clipped at zero. Every figure is then computed from the noised counts
    only (post-processing): the cases, the small-cell rule, AUC on the grid, accuracy,
    sensitivity and specificity at the operating point (a grid point), and the intervals (a
    bootstrap of the noised counts, Wilson for proportions: they cover sampling, not the noise).
    `noise_seed` must be the hospital's secret: anyone who knew it could take the noise off."""
    step = round(threshold * (GRID - 1))
    if abs(step - threshold * (GRID - 1)) > 1e-9 or step % NOISE_BAND:
        raise ValueError(f"with DP noise the operating point must be a multiple of 0.05, not {threshold}")
    positive = labels.astype(int) == 1
    bins = np.clip(np.floor(np.round(probs[:, 1] * (GRID - 1), 10)).astype(int), 0, GRID - 1)
    bins -= bins % NOISE_BAND  # rounded down to the band: the cells in between stay empty (and public)
    edges = np.arange(0, GRID, NOISE_BAND)
    noise = np.random.default_rng(noise_seed)
    pos, neg = np.zeros(GRID, dtype=np.int64), np.zeros(GRID, dtype=np.int64)
    for counts, which in ((pos, positive), (neg, ~positive)):
        noised = np.bincount(bins[which], minlength=GRID)[edges] + noise.laplace(0.0, 1.0 / epsilon, len(edges))
        counts[edges] = np.rint(noised).astype(np.int64)  # unclipped: sums over hospitals stay unbiased
    # this hospital's own figures: from the noised counts clipped at zero (post-processing); the
    # counts released for pooling are the unclipped ones
    own_pos, own_neg = np.clip(pos, 0, None), np.clip(neg, 0, None)
    n_pos, n_neg = int(own_pos.sum()), int(own_neg.sum())
    tp, tn = int(own_pos[step:].sum()), int(own_neg[:step].sum())
    out = SiteScores(task="classification", cases=n_pos + n_neg, min_cases=min_cases, threshold=threshold, dp_epsilon=epsilon)
    few = [(what, n) for what, n in (("positive cases", n_pos), ("negative cases", n_neg)) if n < min_cases]
    if few:
        what, n = few[0]
        reason = _withheld(what, n, min_cases).withheld + " (noised count)"
        out.accuracy = out.sensitivity = out.specificity = out.auc = Interval(withheld=reason)
        out.classes = [ClassCounts(cases=n_neg, auc=Interval(withheld=reason)), ClassCounts(cases=n_pos, auc=Interval(withheld=reason))]
        return out
    cumulative = lambda cells: np.cumsum(cells[::-1])[::-1].tolist()  # noqa: E731
    own = ClassCounts(cases=n_pos, auc=Interval(), tp_at=cumulative(own_pos), fp_at=cumulative(own_neg))
    auc = Interval(value=grid_auc(own.tp_at, own.fp_at), **pooled_auc_interval([own], seed, rounds))
    tp_at, fp_at = cumulative(pos), cumulative(neg)
    out.classes = [ClassCounts(cases=n_neg, auc=auc), ClassCounts(cases=n_pos, auc=auc, tp_at=tp_at, fp_at=fp_at)]
    out.auc = auc
    out.correct = tp + tn
    out.confusion = {"tp": tp, "fn": n_pos - tp, "tn": tn, "fp": n_neg - tn}
    out.accuracy = Interval(value=(tp + tn) / (n_pos + n_neg), **wilson(tp + tn, n_pos + n_neg))
    out.sensitivity = Interval(value=tp / n_pos, **wilson(tp, n_pos))
    out.specificity = Interval(value=tn / n_neg, **wilson(tn, n_neg))
    return out


def segmentation_score(pred: np.ndarray, truth: np.ndarray, num_classes: int, min_cases: int = 20, seed: int = 0,
                       rounds: int = 1000) -> SiteScores:
    """A segmentation model's Dice per foreground label: per case where the label is present,
    their mean with an interval, and the voxel sums behind a global Dice (withheld on fewer than
    `min_cases` cases holding the label)."""
    rng = np.random.default_rng(seed)
    out = SiteScores(task="segmentation", cases=len(truth), min_cases=min_cases, dice_sums=[])
    for label in range(1, num_classes):
        p, t = (pred == label).reshape(len(pred), -1), (truth == label).reshape(len(truth), -1)
        inter, ps, ts = (p & t).sum(1), p.sum(1), t.sum(1)
        present = ts > 0
        if present.sum() < min_cases:
            out.dice.append(_withheld(f"cases with label {label}", int(present.sum()), min_cases))
            out.dice_sums.append({})
            continue
        per_case = 2.0 * inter[present] / (ps[present] + ts[present])
        low, high = _boot(lambda idx: float(per_case[idx].mean()), len(per_case), rng, rounds)
        out.dice.append(Interval(value=float(per_case.mean()), low=low, high=high))
        out.dice_sums.append({"intersection": float(inter.sum()), "predicted": float(ps.sum()), "truth": float(ts.sum())})
    return out


def wilson(hits: int, n: int, z: float = 1.959964) -> dict:
    """The Wilson score 95 % interval of a proportion hits/n (cases taken as independent)."""
    if n == 0:
        return {"low": None, "high": None}
    p, z2 = hits / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {"low": max(0.0, centre - half), "high": min(1.0, centre + half)}


def _bins(cumulative: list[int]) -> np.ndarray:
    c = np.asarray(cumulative, dtype=np.int64)
    return c - np.concatenate([c[1:], [0]])


def pooled_auc_interval(released: list[ClassCounts], seed: int, rounds: int = 1000) -> dict:
    """95 % percentile-bootstrap interval of the pooled grid AUC, resampling cases within each
    hospital and class (stratified) from the per-bin counts the hospitals released."""
    rng = np.random.default_rng(seed)
    pos = [np.clip(_bins(e.tp_at), 0, None) for e in released]  # DP-noised counts may dip below zero
    neg = [np.clip(_bins(e.fp_at), 0, None) for e in released]
    values = []
    for _ in range(rounds):
        tp = sum(rng.multinomial(b.sum(), b / b.sum()) for b in pos if b.sum())
        fp = sum(rng.multinomial(b.sum(), b / b.sum()) for b in neg if b.sum())
        tp_at, fp_at = np.cumsum(tp[::-1])[::-1], np.cumsum(fp[::-1])[::-1]
        values.append(grid_auc(tp_at.tolist(), fp_at.tolist()))
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"low": None, "high": None}
    return {"low": float(np.percentile(values, 2.5)), "high": float(np.percentile(values, 97.5))}


def pool(sites: list[SiteScores], seed: int = 0) -> dict:
    """The federation's figures from what the hospitals released (withheld figures are left out,
    and the hospitals they came from are named in `left_out`), with 95 % intervals in
    `intervals`: Wilson for the exact proportions, a stratified bootstrap for the pooled AUC."""
    out: dict = {"hospitals": len(sites), "cases": sum(s.cases for s in sites)}
    if sites and sites[0].task == "segmentation":
        labels = max(len(s.dice) for s in sites)
        out["global_dice"] = []
        for k in range(labels):
            sums = [s.dice_sums[k] for s in sites if s.dice_sums and s.dice_sums[k]]
            inter, total = sum(d["intersection"] for d in sums), sum(d["predicted"] + d["truth"] for d in sums)
            out["global_dice"].append(2 * inter / total if total else None)
        return out
    acc = [s for s in sites if s.correct is not None]
    out["accuracy"] = sum(s.correct for s in acc) / sum(s.cases for s in acc) if acc else None
    out["intervals"] = {}
    if acc:
        out["intervals"]["accuracy"] = wilson(sum(s.correct for s in acc), sum(s.cases for s in acc))
    conf = [s.confusion for s in sites if s.confusion]
    if conf:
        tp, fn, tn, fp = (sum(c[k] for c in conf) for k in ("tp", "fn", "tn", "fp"))
        out["sensitivity"], out["specificity"] = tp / (tp + fn), tn / (tn + fp)
        out["intervals"]["sensitivity"], out["intervals"]["specificity"] = wilson(tp, tp + fn), wilson(tn, tn + fp)
    per_class = []
    for c in range(max(len(s.classes) for s in sites) if sites else 0):
        released = [s.classes[c] for s in sites if len(s.classes) > c and s.classes[c].tp_at is not None]
        if not released:
            per_class.append(None)
            continue
        tp = np.sum([e.tp_at for e in released], axis=0)
        fp = np.sum([e.fp_at for e in released], axis=0)
        per_class.append(grid_auc(tp.tolist(), fp.tolist()))
    out["auc_per_class"] = per_class
    binary = len(per_class) == 2
    shown = [a for a in per_class if a is not None and not math.isnan(a)]
    out["auc"] = per_class[1] if binary else (float(np.mean(shown)) if shown else None)
    if binary and out["auc"] is not None:
        out["intervals"]["auc"] = pooled_auc_interval(
            [s.classes[1] for s in sites if len(s.classes) > 1 and s.classes[1].tp_at is not None], seed)
    needed = (lambda s: s.classes[1:]) if binary else (lambda s: s.classes)  # noqa: E731 - binary: class 1's counts
    out["left_out"] = sorted({i for i, s in enumerate(sites) if s.correct is None or any(
        e.tp_at is None for e in needed(s))})
    return out
