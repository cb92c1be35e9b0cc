"""Federated evaluation's figures (medimaging/scoring.py): each hospital's, with intervals and the
small-cell rule, and the pooled ones, checked against the same computed centrally on the union."""

import math

import numpy as np
import pytest
from monai.metrics import compute_roc_auc
import torch

from medimaging.scoring import GRID, _rank_auc, grid_auc, grid_counts, pool, score, segmentation_score


def _site(rng, n_pos, n_neg, shift=1.2):
    """Probabilities of class 1 from two overlapping normal score distributions."""
    logit = np.concatenate([rng.normal(shift, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)])
    p1 = 1 / (1 + np.exp(-logit))
    labels = np.concatenate([np.ones(n_pos, int), np.zeros(n_neg, int)])
    return np.stack([1 - p1, p1], axis=1), labels


def test_pooled_figures_equal_the_same_figures_on_the_union_of_the_hospitals():
    rng = np.random.default_rng(0)
    sites = [_site(rng, 60, 140), _site(rng, 90, 90, shift=0.8), _site(rng, 30, 250, shift=1.6)]
    scores = [score(p, y, seed=i) for i, (p, y) in enumerate(sites)]
    probs, labels = np.concatenate([p for p, _ in sites]), np.concatenate([y for _, y in sites])
    pooled = pool(scores)
    # exact: accuracy, sensitivity, specificity from summed counts
    pred = (probs[:, 1] >= 0.5).astype(int)
    assert pooled["accuracy"] == pytest.approx(float((pred == labels).mean()), abs=1e-12)
    assert pooled["sensitivity"] == pytest.approx(float(pred[labels == 1].mean()), abs=1e-12)
    assert pooled["specificity"] == pytest.approx(float(1 - pred[labels == 0].mean()), abs=1e-12)
    # the pooled AUC is the union's AUC on the grid: exact to 1e-9 against it computed centrally
    binned = np.floor(np.round(probs[:, 1] * (GRID - 1), 10)) / (GRID - 1)
    assert pooled["auc"] == pytest.approx(_rank_auc(binned, labels == 1), abs=1e-9)
    central = float(compute_roc_auc(torch.from_numpy(probs[:, 1]), torch.from_numpy(labels)))
    assert abs(pooled["auc"] - central) < 0.002, (pooled["auc"], central)  # what the grid costs
    # and it is not the average of the hospitals' AUCs
    mean_of_sites = float(np.mean([s.auc.value for s in scores]))
    assert abs(mean_of_sites - central) > abs(pooled["auc"] - central)
    # each hospital's own AUC is exact (ties half), as MONAI computes it
    for s, (p, y) in zip(scores, sites, strict=True):
        assert s.auc.value == pytest.approx(float(compute_roc_auc(torch.from_numpy(p[:, 1]), torch.from_numpy(y))), abs=1e-12)
        assert s.auc.low < s.auc.value < s.auc.high


def test_intervals_cover_the_true_auc_and_the_same_input_gives_the_same_numbers():
    true = float(0.5 * math.erfc(-1.2 / 2))  # P(N(1.2,1) > N(0,1)) = Phi(1.2 / sqrt 2)
    covered = 0
    for rep in range(60):
        p, y = _site(np.random.default_rng(100 + rep), 60, 120)
        s = score(p, y, seed=rep, rounds=300)
        covered += s.auc.low <= true <= s.auc.high
    assert covered >= 51, covered  # a 95 % interval: about 57 of 60; 51 is p < 0.01 for a true 95 %
    p, y = _site(np.random.default_rng(1), 40, 40)
    assert score(p, y, seed=3) == score(p, y, seed=3)


def test_a_small_hospital_withholds_what_would_rest_on_too_few_patients():
    rng = np.random.default_rng(2)
    p, y = _site(rng, 12, 300)  # 12 positives, below min_cases 20
    s = score(p, y)
    assert s.auc.value is None and "12 positive cases, fewer than min_cases 20" in s.auc.withheld
    assert s.sensitivity.value is None and s.specificity.value is not None
    assert s.confusion is None and s.classes[1].tp_at is None and s.classes[1].fp_at is None
    assert s.accuracy.value is not None and s.cases == 312
    big = score(*_site(rng, 80, 80))
    pooled = pool([s, big])
    assert pooled["left_out"] == [0]
    assert pooled["auc"] == pytest.approx(grid_auc(big.classes[1].tp_at, big.classes[1].fp_at), abs=1e-12)
    assert pooled["sensitivity"] == big.confusion["tp"] / (big.confusion["tp"] + big.confusion["fn"])


def test_grid_counts_are_an_roc_curve():
    scores = np.array([0.0, 0.004, 0.5, 0.505, 0.999, 1.0])
    positive = np.array([False, True, False, True, True, True])
    tp, fp = grid_counts(scores, positive)
    assert tp[0] == 4 and fp[0] == 2 and tp[50] == 3 and fp[50] == 1 and tp[51] == 2 and tp[100] == 1 and fp[100] == 0
    assert grid_auc(tp, fp) == pytest.approx(_rank_auc(np.floor(scores * 100) / 100, positive), abs=1e-12)


def test_several_classes_and_segmentation():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    s = score(probs, labels)
    assert s.sensitivity is None and len(s.classes) == 3 and all(c.auc.value > 0.7 for c in s.classes)
    assert s.auc.value == pytest.approx(np.mean([c.auc.value for c in s.classes]))
    # segmentation: global Dice pooled from voxel sums equals it on the union
    truth = rng.integers(0, 3, (50, 8, 8))
    pred = np.where(rng.random((50, 8, 8)) < 0.8, truth, rng.integers(0, 3, (50, 8, 8)))
    a, b = segmentation_score(pred[:25], truth[:25], 3), segmentation_score(pred[25:], truth[25:], 3)
    pooled = pool([a, b])
    for label in (1, 2):
        p, t = pred == label, truth == label
        assert pooled["global_dice"][label - 1] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()), abs=1e-12)
    assert all(d.low < d.value < d.high for d in a.dice)
    few = segmentation_score(pred[:5], truth[:5], 3)
    assert all(d.withheld and "fewer than min_cases 20" in d.withheld for d in few.dice)


def _binary(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    p1 = np.clip(0.35 * labels + 0.65 * rng.random(n), 0, 1)
    return np.stack([1 - p1, p1], 1), labels


def test_dp_noised_figures_come_from_noised_counts_only_and_repeat_for_the_same_secret_seed():
    """site.yaml evaluation.noise_epsilon: Laplace noise on the per-band counts, every figure
    from the noised counts (so they agree with each other), the same figures for the same
    secret seed, other noise for another; at epsilon 1 on 400 cases the AUC moves little, and
    the noise grows as epsilon shrinks; few (noised) cases are withheld; it pools as any hospital."""
    from medimaging.scoring import grid_auc, noised_score

    probs, labels = _binary(400, 3)
    exact = score(probs, labels, 20)
    a = noised_score(probs, labels, 1.0, 11, 20)
    assert a == noised_score(probs, labels, 1.0, 11, 20) and a.dp_epsilon == 1.0
    b = noised_score(probs, labels, 1.0, 12, 20)
    assert a.classes[1].tp_at != b.classes[1].tp_at and a.classes[1].tp_at != exact.classes[1].tp_at
    # released for pooling: the noised counts as they are; the hospital's own figures: them clipped at zero
    cells = lambda at: np.clip(np.asarray(at) - np.append(at[1:], 0), 0, None)  # noqa: E731
    tp_at, fp_at = (np.cumsum(cells(at)[::-1])[::-1] for at in (a.classes[1].tp_at, a.classes[1].fp_at))
    assert a.cases == tp_at[0] + fp_at[0] == a.classes[0].cases + a.classes[1].cases
    c = a.confusion
    assert a.correct == c["tp"] + c["tn"] and c["tp"] == tp_at[50] and c["fp"] == fp_at[50]
    assert a.sensitivity.value == c["tp"] / (c["tp"] + c["fn"]) and a.auc.value == grid_auc(list(tp_at), list(fp_at))
    assert sum(a.classes[1].tp_at[i] != a.classes[1].tp_at[i + 1] for i in range(100)) <= 21  # bands of 0.05
    assert a.auc.low < a.auc.value < a.auc.high
    moved = [abs(noised_score(probs, labels, 1.0, s, 20).auc.value - exact.auc.value) for s in range(40)]
    assert 0 < float(np.mean(moved)) < 0.03 and max(moved) < 0.1, moved  # measured: 0.015 and 0.07
    spread = {eps: np.std([noised_score(probs, labels, eps, s, 20).cases for s in range(60)]) for eps in (0.2, 2.0)}
    assert spread[0.2] > 4 * spread[2.0] > 0, spread  # Laplace scale 1/epsilon
    small_probs, small_labels = _binary(30, 4)
    few = noised_score(small_probs, small_labels, 1.0, 5, 20)
    assert few.auc.withheld and "(noised count)" in few.auc.withheld and few.classes[1].tp_at is None
    pooled = pool([a, exact])
    assert pooled["left_out"] == [] and pooled["cases"] == a.cases + exact.cases
    with pytest.raises(ValueError, match="multiple of 0.05"):
        noised_score(probs, labels, 1.0, 1, 20, threshold=0.333)


def test_a_hospitals_noise_seed_is_its_own_secret_and_fixed_per_model(tmp_path):
    import os
    from types import SimpleNamespace

    from client.training.contest import NOISE_KEY_FILE, noise_seed
    from protocol.messages import EvaluationSpec
    from medimaging.config import ModelConfig

    spec = EvaluationSpec(evaluation="e", model_sha256="a" * 64, model=ModelConfig(name="cnn"), in_channels=1,
                          num_classes=2, image_size=28)
    here, there = SimpleNamespace(ledger_root=tmp_path / "h1"), SimpleNamespace(ledger_root=tmp_path / "h2")
    first = noise_seed(here, spec, "test", 20)
    assert (os.stat(tmp_path / "h1" / NOISE_KEY_FILE).st_mode & 0o777) == 0o600
    assert noise_seed(here, spec, "test", 20) == first  # the same model scored again: the same noise
    assert noise_seed(here, spec.model_copy(update={"model_sha256": "b" * 64}), "test", 20) != first
    assert noise_seed(there, spec, "test", 20) != first  # another hospital's secret
