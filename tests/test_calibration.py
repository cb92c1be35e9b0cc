"""Head calibration after the last round (strategy.calibrate_head): each hospital releases sums of
its training features, the server refits the classifier head (medimaging/calibration.py,
server/engine/calibration.py). Checked on real pneumoniamnist images: the sums pool exactly, the
closed form and its shrinkage agree with independent computations, a small class stays home, a
real federation writes a calibrated model beside the uncalibrated one, and a hospital's malformed
sums are refused and named."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file

from conftest import medmnist_file, run_plan_here
from medimaging.calibration import CalibrationError, feature_sums, head_layer, pooled, refit_head
from medimaging.datasets import Split
from protocol.messages import FEATURES_KEY
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
    assert np.allclose(out["moment"], kept.T @ kept)
    assert set(out) == {"count", "sum", "moment"}


def test_refit_refuses_a_class_nobody_released():
    with pytest.raises(CalibrationError, match=r"classes \[1\] have no released images"):
        refit_head(np.array([5.0, 0.0]), np.zeros((2, 3)), np.eye(3))
    with pytest.raises(CalibrationError, match="more than the 4096"):
        head_layer(torch.nn.Sequential(torch.nn.Linear(5000, 2)))


def _recorder(seen: list):
    """A client mod that keeps what each hospital's feature-sums reply carries."""
    def mod(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        if msg.metadata.message_type == "query.features" and not reply.has_error():
            seen.append({k: a.numpy().copy() for k, a in reply.content[FEATURES_KEY].items()})
        return reply
    return mod


def test_a_federation_refits_its_head_beside_the_uncalibrated_model(tmp_path):
    """A real federation (3 hospitals, label skew, seed 3 puts single-class hospitals in it):
    model_calibrated.safetensors differs from model.safetensors in the head only; what each
    hospital sent is its class counts (at least its min_cases, 20, per class), the class sums and
    the moment, nothing else; both models are scored (server test, federated validation)."""
    plan = prepare_run(_cfg(tmp_path))
    sent: list = []
    run_dir = run_plan_here(plan, mods=(_recorder(sent),))
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
    for got in sent:
        assert set(got) == {"count", "sum", "moment"}
        assert got["count"].shape == (2,) and got["sum"].shape == (2, 1024) and got["moment"].shape == (1024, 1024)
    released = sorted(tuple(g["count"].astype(int)) for g in sent)
    assert released == sorted(tuple(np.where(h >= 20, h, 0)) for h in held)
    assert any(0 < h.min() < 20 or h.min() == 0 for h in held), "no hospital here lacks a class: the test proves less"
    assert cal["images"] == sum(int(g["count"].sum()) for g in sent)
    sums_bytes = 3 * 8 * (2 + 2 * 1024 + 1024 * 1024)  # float64, three hospitals; the rest: names and headers
    assert sums_bytes <= cal["bytes_from_sites"] < sums_bytes + 3000 and cal["bytes_to_sites"] > 0 and cal["seconds"] > 0
    assert cal["test"]["uncalibrated"] > 0.7, "the federation did not learn: nothing to calibrate"
    assert 0.5 < cal["test"]["calibrated"] <= 1 and 0.5 < cal["calibrated"]["val_auc"] <= 1
    report = (run_dir / "report.md").read_text()
    assert "## Head calibration" in report and f"`{cal['file']}`" in report and f"{cal['test']['calibrated']:.3f}" in report


HOSTILE = {0: ("nan", "'moment' holds NaN or Inf"), 1: ("shape", "'sum' has shape (2, 10), not (2, 1024)"),
           2: ("extra", "unexpected arrays ['images']")}  # partition index: (what it does, what the server says)


def _hostile(ctxt_index, got: dict) -> None:
    """What three member hospitals do to their feature sums before replying."""
    how = HOSTILE.get(ctxt_index, (None,))[0]
    if how == "nan":
        got["moment"][0, 0] = np.nan
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
])
def test_calibration_refuses_what_would_expose_or_has_no_global_head(tmp_path, sets, expected):
    with pytest.raises(ConfigError, match=expected):
        _cfg(tmp_path, **sets)


def test_hospitals_under_dp_sgd_are_not_asked(tmp_path):
    """DP-SGD guards the hospitals' data: their feature sums would leave outside the ledger, so
    the server does not ask (and a DP hospital refuses the query; client/training/app.py)."""
    plan = prepare_run(_cfg(tmp_path, **{"server.rounds": 1, "privacy.enabled": True, "privacy.target_epsilon": 8.0,
                                         "train.logit_adjustment": 0.0}))
    sent: list = []
    run_dir = run_plan_here(plan, mods=(_recorder(sent),))
    cal = json.loads((run_dir / "summary.json").read_text())["calibration"]
    assert cal["status"].startswith("skipped: hospitals train with DP-SGD") and sent == []
    assert not (run_dir / "model_calibrated.safetensors").exists()


def test_a_dp_sgd_hospital_refuses_the_query_when_asked(tmp_path):
    """A server that asks anyway (here: one told its hospitals train without DP) gets a refusal
    from each DP-SGD hospital, named in the summary, and no calibrated model."""
    plan = prepare_run(_cfg(tmp_path, **{"server.rounds": 1, "privacy.enabled": True, "privacy.target_epsilon": 8.0,
                                         "train.logit_adjustment": 0.0}))
    assert plan.private
    plan.private = False  # the hospitals still hold their DP-SGD policy (site config), the server forgets it
    sent: list = []
    run_dir = run_plan_here(plan, mods=(_recorder(sent),))
    cal = json.loads((run_dir / "summary.json").read_text())["calibration"]
    assert sent == [] and cal["status"] == "skipped: no hospital released feature sums", cal
    assert len(cal["sites"]) == 3
    assert all("not available at a hospital that trains with DP-SGD" in v for v in cal["sites"].values()), cal["sites"]
    assert not (run_dir / "model_calibrated.safetensors").exists()
