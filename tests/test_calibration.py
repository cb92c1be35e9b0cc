"""Head calibration after the last round (strategy.calibrate_head): each hospital releases sums of
its training features, the server refits the classifier head (medimaging/calibration.py,
server/engine/calibration.py). Checked on real pneumoniamnist images: the sums pool exactly, the
closed form and its shrinkage agree with independent computations, a small class stays home, a
real federation writes a calibrated model beside the uncalibrated one, and a hospital's malformed
sums are refused and named."""

import csv
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file

from conftest import assert_own_models_kept, medmnist_file, run_plan_here
from medimaging.calibration import CalibrationError, _shared_covariance, feature_sums, head_layer, personal_heads, pooled, refit_head
from protocol.messages import FEATURES_KEY, PERSONAL_HEAD_KEY
from simulations.config import ConfigError, load_config
from simulations.federation import site_data, task_shape
from simulations.runner import prepare_run


def _cfg(tmp_path, **sets):
    return load_config(None, {"sites": 3, "server.rounds": 2, "train.local_epochs": 1, "seed": 3,
                              "data.path": str(medmnist_file("pneumoniamnist")), "partition.scheme": "dirichlet",
                              "partition.alpha": 0.3, "train.logit_adjustment": 1.0, "strategy.calibrate_head": True,
                              "server.output_dir": str(tmp_path), **sets})


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The start model and two hospitals' real training splits."""
    cfg = _cfg(tmp_path_factory.mktemp("cal"))
    shape = task_shape(cfg)
    model = shape.model(cfg)
    sites = [site_data(cfg, i, shape.image_size).train for i in range(2)]
    assert all(s.x.std() > 0.1 for s in sites), "blank images"
    return model, sites


def _features(model, split):
    seen = []
    _, head = head_layer(model)
    hook = head.register_forward_hook(lambda _m, i, _o: seen.append(i[0].flatten(1)))
    model.eval()
    with torch.no_grad():
        model(split.x)
    hook.remove()
    return seen[0].double().numpy()


def test_the_hospitals_sums_pool_to_the_lda_head_of_the_pooled_features(real):
    """Sums from two hospitals give the head that the pooled features give directly: the class
    means, the within-class covariance with OAS shrinkage as Chen et al. (2010, eq. 23) write it,
    w = S^-1 mu, b = -mu'S^-1 mu / 2 + log prior."""
    model, sites = real
    releases = [feature_sums(model, s, 2, min_count=1) for s in sites]
    weight, bias, shrinkage = refit_head(*pooled(releases))
    f = np.concatenate([_features(model, s) for s in sites])
    y = np.concatenate([s.y.numpy() for s in sites])
    assert set(np.unique(y)) == {0, 1}
    n, p = f.shape
    means = np.stack([f[y == c].mean(0) for c in (0, 1)])
    centred = f - means[y]
    s = centred.T @ centred / n
    tr, tr2 = np.trace(s), np.trace(s @ s)
    rho = min(((1 - 2 / p) * tr2 + tr ** 2) / ((n + 1 - 2 / p) * (tr2 - tr ** 2 / p)), 1.0)  # the paper's form
    assert 0 < shrinkage < 1 and shrinkage == pytest.approx(rho, rel=1e-3)
    shrunk = (1 - rho) * s + rho * tr / p * np.eye(p)
    w = np.linalg.solve(shrunk, means.T).T
    b = -0.5 * np.sum(w * means, 1) + np.log(np.bincount(y) / n)
    # the two shrinkage forms agree to ~1e-4 and the features here are one float32 batch, there batches
    assert np.linalg.norm(weight - w) < 1e-3 * np.linalg.norm(w)
    assert np.linalg.norm(bias - b) < 1e-3 * np.linalg.norm(b)


def test_a_class_with_fewer_images_than_the_floor_stays_home(real):
    """Small-cell rule: a class a hospital holds fewer than `min_count` images of is in none of the
    three sums (its count is released as 0); the moment is over the other images only."""
    model, sites = real
    split = next((s for s in sites if torch.bincount(s.y, minlength=2).min() > 0), None)
    assert split is not None, "no hospital here holds both classes"
    counts = torch.bincount(split.y, minlength=2)
    small = int(counts.argmin())
    out = feature_sums(model, split, 2, min_count=int(counts.min()) + 1)
    f, y = _features(model, split), split.y.numpy()
    kept = f[y != small]
    assert out["count"][small] == 0 and not out["sum"][small].any()
    assert out["count"][1 - small] == counts[1 - small]
    full = kept.T @ kept
    assert np.allclose(out["moment"], full[np.triu_indices(len(full))]), "the moment's upper triangle, row by row"
    assert set(out) == {"count", "sum", "moment"}


def test_refit_refuses_a_class_nobody_released():
    with pytest.raises(CalibrationError, match=r"classes \[1\] have no released images"):
        refit_head(np.array([5.0, 0.0]), np.zeros((2, 3)), np.eye(3))
    with pytest.raises(CalibrationError, match="more than the 4096"):
        head_layer(torch.nn.Sequential(torch.nn.Linear(5000, 2)))


def test_each_hospital_s_own_head_is_the_lda_head_of_its_own_means(real):
    """strategy.personal_heads: with no pull towards the federation a hospital's head is the
    shared-covariance classifier of its own class means and shares; with an endless pull it is
    the federation's head; a hospital that released one class keeps the federation's means (the
    same weights) and only its class shares change the bias."""
    model, sites = real
    both = next(s for s in sites if torch.bincount(s.y, minlength=2).min() >= 20)
    own = feature_sums(model, both, 2, min_count=20)
    one = {**own, "count": own["count"] * [1, 0], "sum": own["sum"] * [[1], [0]]}  # as a hospital with one class
    total = pooled([feature_sums(model, s, 2, min_count=20) for s in sites])
    weight, bias, _ = refit_head(*total)
    (w0, b0), = personal_heads(*total, [own], prior_images=0)
    (w1, b1), = personal_heads(*total, [one])
    means = own["sum"] / own["count"][:, None]
    _, shrunk, _ = _shared_covariance(*total)  # checked against the paper's form above
    assert np.allclose(w0, np.linalg.solve(shrunk, means.T).T)
    prior = own["count"] / own["count"].sum()
    assert np.allclose(b0, -0.5 * np.sum(w0 * means, 1) + np.log(prior))
    assert np.allclose(w1, weight) and not np.allclose(b1, bias)
    assert (b1 - bias)[0] > (b1 - bias)[1], "a hospital with one class leans towards it"
    (wf, bf), = personal_heads(*total, [own], prior_images=1e12)
    assert np.allclose(wf, weight, rtol=1e-6) and np.allclose(bf, bias, rtol=1e-6)
    assert not np.allclose(w0, weight, rtol=1e-3), "the hospital's means are the federation's: the test proves less"


def test_a_hospital_refuses_a_personal_head_that_is_not_a_head(real):
    """The server may replace the classifier head, nothing else: a 'personal head' that carries a
    body layer, or a head of another shape, is refused and nothing is kept."""
    from flwr.app import Context, RecordDict
    from client.training.personal import PERSONAL_HEAD, with_own_head

    model, _ = real
    state = model.state_dict()
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    head = {k: state[k].numpy() for k in ("final.1.weight", "final.1.bias")}
    body = next(k for k in state if not k.startswith("final."))
    for bad in ({**head, body: state[body].numpy()}, {**head, "final.1.bias": np.zeros(3, np.float32)},
                {**head, "final.1.weight": np.full_like(head["final.1.weight"], np.nan)}):
        record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in bad.items()})
        with pytest.raises(ValueError, match="does not fit this model's classifier head"):
            with_own_head(model, record, context)
    assert PERSONAL_HEAD not in context.state.array_records
    own = with_own_head(model, ArrayRecord({k: Array(-v) for k, v in head.items()}), context)
    assert torch.equal(own.state_dict()["final.1.bias"], -state["final.1.bias"])
    assert torch.equal(model.state_dict()["final.1.bias"], state["final.1.bias"]), "the global model is untouched"
    assert PERSONAL_HEAD in context.state.array_records


def _recorder(seen: dict, heads: dict | None = None, replies: list | None = None):
    """A client mod that keeps what each hospital's feature-sums reply carries (and the personal
    head it is sent), by partition; `replies`: the replies themselves."""
    def mod(msg, ctxt, call_next):
        pid = int(ctxt.node_config["partition-id"])
        if heads is not None and PERSONAL_HEAD_KEY in msg.content.array_records:
            heads[pid] = {k: a.numpy().copy() for k, a in msg.content[PERSONAL_HEAD_KEY].items()}
        reply = call_next(msg, ctxt)
        if msg.metadata.message_type == "query.features" and not reply.has_error():
            seen[pid] = {k: a.numpy().copy() for k, a in reply.content[FEATURES_KEY].items()}
            if replies is not None:
                replies.append(reply)
        return reply
    return mod


def _audited(replies: list, path) -> list:
    """The problems `aseanfl client audit` finds in a log of these replies."""
    from client.operations.audit import AuditLog, describe, verify

    problems = []
    for i, reply in enumerate(replies):
        log = AuditLog(path / f"{i}.jsonl")
        log.append(describe(reply))
        problems += [str(p) for p in verify(log.path, str(reply.content["site"]["name"])).problems]
    return problems


def test_a_federation_refits_its_head_beside_the_uncalibrated_model(tmp_path):
    """A real federation (3 hospitals, label skew, seed 3 puts single-class hospitals in it):
    model_calibrated.safetensors differs from model.safetensors in the head only; what each
    hospital sent is its class counts (at least its min_cases, 20, per class), the class sums and
    the moment, nothing else; both models are scored (server test, federated validation)."""
    plan = prepare_run(_cfg(tmp_path, **{"strategy.personal_heads": True}))
    sent, heads, replies = {}, {}, []
    run_dir = run_plan_here(plan, mods=(_recorder(sent, heads, replies),))
    summary = json.loads((run_dir / "summary.json").read_text())
    cal = summary["calibration"]
    assert cal["status"] == "calibrated" and cal["hospitals"] == 3, cal
    plain, refit = load_file(str(run_dir / "model.safetensors")), load_file(str(run_dir / cal["file"]))
    head = {"final.1.weight", "final.1.bias"}
    assert refit.keys() == plain.keys() and head < set(plain)
    assert all(torch.equal(plain[k], refit[k]) for k in plain if k not in head)
    assert not torch.equal(plain["final.1.weight"], refit["final.1.weight"])
    shape = task_shape(plan.config)
    held = [torch.bincount(site_data(plan.config, i, shape.image_size).train.y, minlength=2).numpy() for i in range(3)]
    assert len(sent) == 3
    for got in sent.values():
        assert set(got) == {"count", "sum", "moment"}
        assert got["count"].shape == (2,) and got["sum"].shape == (2, 1024) and got["moment"].shape == (1024 * 1025 // 2,)
    assert all(tuple(sent[i]["count"].astype(int)) == tuple(np.where(h >= 20, h, 0)) for i, h in enumerate(held))
    assert any(0 < h.min() < 20 or h.min() == 0 for h in held), "no hospital here lacks a class: the test proves less"
    assert cal["images"] == sum(int(g["count"].sum()) for g in sent.values())
    # the hospital's own audit accepts the release as it is, and names an array slipped in beside it
    assert _audited(replies, tmp_path / "audit") == []
    doctored = {**next(iter(sent.values())), "images": np.zeros((4, 28, 28))}
    replies[0].content[FEATURES_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in doctored.items()})
    assert _audited(replies[:1], tmp_path / "doctored") == ["line 1: feature-sums.images is not an allowed key"]
    sums_bytes = 3 * 8 * (2 + 2 * 1024 + 1024 * 1025 // 2)  # float64, three hospitals; the rest: names and headers
    assert sums_bytes <= cal["bytes_from_sites"] < sums_bytes + 3000 and cal["bytes_to_sites"] > 0 and cal["seconds"] > 0
    assert cal["test"]["uncalibrated"] > 0.7, "the federation did not learn: nothing to calibrate"
    assert 0.5 < cal["test"]["calibrated"] <= 1 and 0.5 < cal["calibrated"]["val_auc"] <= 1
    # strategy.personal_heads: each hospital was sent the head fit from its own release, no other's
    order = sorted(sent)
    expected = personal_heads(*pooled([sent[i] for i in order]), [sent[i] for i in order])
    assert sorted(heads) == order
    for i, (w, b) in zip(order, expected):
        assert set(heads[i]) == head and np.allclose(heads[i]["final.1.weight"], w) and np.allclose(heads[i]["final.1.bias"], b)
    assert len({heads[i]["final.1.bias"].tobytes() for i in order}) == 3, "the hospitals got the same head"
    scored = [v["pers_val_auc"] for v in cal["calibrated"]["sites"].values() if v["val_auc"] == v["val_auc"]]
    assert scored and all(0.5 < a <= 1 for a in scored) and 0.5 < cal["calibrated"]["pers_val_auc"] <= 1, cal
    report = (run_dir / "report.md").read_text()
    assert "## Head calibration" in report and f"`{cal['file']}`" in report and f"{cal['test']['calibrated']:.3f}" in report
    assert f"own head, fit from the same sums and kept at the hospital: federated validation AUC " \
           f"{cal['calibrated']['pers_val_auc']:.3f}" in report
    # ... and on its own disk: the global body with its own head, as it scored it
    rounds = str(plan.config.server.rounds)
    assert_own_models_kept(run_dir, {s: {"round": rounds, **v} for s, v in cal["calibrated"]["sites"].items()},
                           "personal-head")


HOSTILE = {0: ("nan", "'moment' holds NaN or Inf"), 1: ("shape", "'sum' has shape (2, 10), not (2, 1024)"),
           2: ("extra", "unexpected arrays ['images']")}  # partition index: (what it does, what the server says)


def _hostile(ctxt_index, got: dict) -> None:
    """What three member hospitals do to their feature sums before replying."""
    how = HOSTILE.get(ctxt_index, (None,))[0]
    if how == "nan":
        got["moment"][0] = np.nan
    elif how == "shape":
        got["sum"] = got["sum"][:, :10]
    elif how == "extra":  # a reply that carries more than the three sums
        got["images"] = np.zeros((4, 28, 28))


def _hostile_mod(msg, ctxt, call_next):
    reply = call_next(msg, ctxt)
    if msg.metadata.message_type != "query.features" or reply.has_error():
        return reply
    got = {k: a.numpy().copy() for k, a in reply.content[FEATURES_KEY].items()}
    _hostile(int(ctxt.node_config["partition-id"]), got)
    reply.content[FEATURES_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in got.items()})
    return reply


def test_malformed_sums_are_refused_and_each_hospital_named(tmp_path):
    """Five hospitals, three of them sending malformed sums (NaN, a wrong shape, an extra array):
    each is refused with its reason, and the head is refit from the two others."""
    plan = prepare_run(_cfg(tmp_path, **{"server.rounds": 1, "sites": 5}))
    run_dir = run_plan_here(plan, mods=(_hostile_mod,))
    cal = json.loads((run_dir / "summary.json").read_text())["calibration"]
    for index, (_how, why) in HOSTILE.items():
        site = plan.config.sites[index]
        assert cal["sites"][site] == f"rejected: {why}", cal["sites"]
    honest = [s for i, s in enumerate(plan.config.sites) if i not in HOSTILE]
    assert all(cal["sites"][s].startswith("released: ") for s in honest), cal["sites"]
    assert cal["status"] == "calibrated" and cal["hospitals"] == 2, cal


@pytest.mark.parametrize("sets, expected", [
    ({"strategy.secure_aggregation": {}}, "calibrate_head does not go with secure_aggregation"),
    ({"strategy.central_dp": {"noise_multiplier": 0.1, "clipping": "server-fixed"}}, "calibrate_head does not go with central_dp"),
    ({"strategy.personalization.method": "fedper"}, "calibrate_head does not go with personalization.method fedper"),
    ({"strategy.calibrate_head": False, "strategy.personal_heads": True}, "personal_heads needs calibrate_head: true"),
    ({"strategy.personal_heads": True, "strategy.personalization.method": "ditto"},
     "personal_heads with personalization.method ditto: choose one"),
])
def test_calibration_refuses_what_would_expose_or_has_no_global_head(tmp_path, sets, expected):
    with pytest.raises(ConfigError, match=expected):
        _cfg(tmp_path, **sets)


def test_a_hospital_under_dp_sgd_refuses_and_the_others_calibrate(tmp_path):
    """One hospital of three trains with DP-SGD (site_privacy), as one in a deployed federation
    may: the server asks all three (it cannot know a deployed hospital's policy). The DP-SGD
    hospital refuses, is named and releases nothing; the head is refit from the other two, and
    only they get a head of their own."""
    dp_site = _cfg(tmp_path).sites[0]
    plan = prepare_run(_cfg(tmp_path, **{"server.rounds": 1, "strategy.personal_heads": True, "train.logit_adjustment": 0.0,
                                         f"site_privacy.{dp_site}.enabled": True,
                                         f"site_privacy.{dp_site}.target_epsilon": 8.0}))
    assert plan.private and plan.config.site_policy(dp_site).enabled
    sent, heads = {}, {}
    run_dir = run_plan_here(plan, mods=(_recorder(sent, heads),))
    cal = json.loads((run_dir / "summary.json").read_text())["calibration"]
    assert cal["status"] == "calibrated" and cal["hospitals"] == 2, cal
    assert "not available at a hospital that trains with DP-SGD" in cal["sites"][dp_site], cal["sites"]
    assert sorted(sent) == [1, 2] and sorted(heads) == [1, 2], (sorted(sent), sorted(heads))
    assert cal["images"] == sum(int(g["count"].sum()) for g in sent.values())
    assert (run_dir / "model_calibrated.safetensors").exists()
    # the DP-SGD hospital still scores the calibrated model (a round's validation), with no head of its own
    assert cal["calibrated"]["sites"][dp_site]["pers_val_auc"] is None, cal["calibrated"]["sites"]
    assert_own_models_kept(run_dir, {s: {"round": "1", **v} for s, v in cal["calibrated"]["sites"].items() if s != dp_site},
                           "personal-head")  # and none at the DP-SGD hospital


def test_every_hospital_gets_its_own_head_when_validation_samples_fewer(tmp_path):
    """strategy.fraction_evaluate samples one hospital of three to validate each round; the
    calibration's validation still reaches all three, since each one's head travels in it."""
    plan = prepare_run(_cfg(tmp_path, **{"server.rounds": 1, "strategy.personal_heads": True,
                                         "strategy.fraction_evaluate": 0.34, "strategy.min_sites": 1}))
    sent, heads = {}, {}
    run_dir = run_plan_here(plan, mods=(_recorder(sent, heads),))
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["round"] == "1" and r["site"] != "global"]
    assert len(rows) == 3 and sum(bool(r["val_accuracy"]) for r in rows) == 1, rows  # the round: one validated
    cal = json.loads((run_dir / "summary.json").read_text())["calibration"]
    assert cal["status"] == "calibrated" and sorted(sent) == sorted(heads) == [0, 1, 2], (cal, sorted(heads))
    assert_own_models_kept(run_dir, {s: {"round": "1", **v} for s, v in cal["calibrated"]["sites"].items()},
                           "personal-head")


def test_when_every_hospital_trains_with_dp_sgd_none_releases_and_nothing_is_calibrated(tmp_path):
    """Every hospital refuses the query, each named in the summary; no calibrated model."""
    plan = prepare_run(_cfg(tmp_path, **{"server.rounds": 1, "privacy.enabled": True, "privacy.target_epsilon": 8.0,
                                         "train.logit_adjustment": 0.0}))
    assert plan.private
    sent: dict = {}
    run_dir = run_plan_here(plan, mods=(_recorder(sent),))
    cal = json.loads((run_dir / "summary.json").read_text())["calibration"]
    assert sent == {} and cal["status"] == "skipped: no hospital released feature sums", cal
    assert len(cal["sites"]) == 3
    assert all("not available at a hospital that trains with DP-SGD" in v for v in cal["sites"].values()), cal["sites"]
    assert not (run_dir / "model_calibrated.safetensors").exists()
