"""Compressed updates (strategy.compression): the codecs on a real model's update, error
feedback, payloads that do not decode, the hospital's residual (kept, never sent), the config
rules, and a real simulation that learns on a quarter of the bytes."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from aseanfl.compression import CompressionError, apply, compress, decode
from client.messages import TaskSpec
from client.mods import RESIDUAL_KEY, compression_mod
from medimaging.config import ModelConfig
from medimaging.models import build_model
from medimaging.yamlconfig import ConfigError, read_config
from simulations.config import SimulationConfig


@pytest.fixture(autouse=True)
def _identity():  # messages are made as the server makes them
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _model_update(seed: int = 0) -> tuple[dict, dict]:
    """(received, trained): a real cnn's weights and the same after a small step."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="cnn"), in_channels=1, num_classes=2, image_size=28)
    received = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    trained = {k: v + (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
               for k, v in received.items()}
    return received, trained


@pytest.mark.parametrize("codec,topk,share", [("fp16", None, 0.51), ("int8", None, 0.27), ("int4", None, 0.14),
                                              ("int8", 0.1, 0.14), ("none", 0.1, 0.21)])
def test_codecs_shrink_a_real_update_and_decode_within_their_error(codec, topk, share):
    received, trained = _model_update()
    sent, _ = compress(trained, received, None, codec, 256, topk)
    assert sum(a.nbytes for a in sent.values()) <= share * sum(a.nbytes for a in trained.values())
    got = apply(received, decode(sent, received, codec, 256, topk))
    assert set(got) == set(trained) and all(got[k].shape == trained[k].shape and got[k].dtype == trained[k].dtype
                                            for k in got)
    for name, value in trained.items():
        err = np.abs(got[name].astype(np.float64) - value)
        step = np.abs(value - received[name]).max()
        if topk is None:  # each value within half a quantisation step of its block's scale
            bound = {"fp16": 1e-3, "int8": 0.5 / 127, "int4": 0.5 / 7}[codec] * step + 1e-7
            assert err.max() <= bound, (name, err.max(), bound)
        else:  # the kept values are the largest; what was dropped is never larger than what was kept
            kept = np.count_nonzero(got[name] != received[name])
            assert kept <= int(np.ceil(topk * value.size)) + 1


def test_error_feedback_keeps_the_sum_of_decoded_updates_on_track():
    received, _ = _model_update()
    rng = np.random.default_rng(1)
    drift = {}
    for feedback in (True, False):
        residual, truth, got = None, 0.0, 0.0
        for _ in range(30):
            step = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in received.items() if v.dtype.kind == "f"}
            ref = {k: received[k] for k in step}
            sent, left = compress({k: ref[k] + s for k, s in step.items()}, ref, residual, "int4", 256, 0.2)
            residual = left if feedback else None
            truth = truth + np.concatenate([s.ravel() for s in step.values()])
            got = got + np.concatenate([v.ravel() for v in decode(sent, ref, "int4", 256, 0.2).values()])
        drift[feedback] = float(np.abs(got - truth).max())
    assert drift[True] < 0.25 * drift[False], drift  # without feedback top-k drops the same small values again and again


def test_payloads_that_do_not_decode_are_named():
    received, trained = _model_update()
    sent, _ = compress(trained, received, None, "int8", 64)
    name = next(k for k in received if received[k].dtype.kind == "f")
    cases = {
        "missing": ({k: v for k, v in sent.items() if k != f"s:{name}"}, f"{name}: s:{name} missing"),
        "short": ({**sent, f"q:{name}": sent[f"q:{name}"][:-1]}, f"{name}: holds"),
        "dtype": ({**sent, f"q:{name}": sent[f"q:{name}"].astype(np.int16)}, "int8 expected"),
        "nan scale": ({**sent, f"s:{name}": np.full_like(sent[f"s:{name}"], np.nan)}, "finite float32 expected"),
        "extra": ({**sent, "q:smuggled": np.zeros(4, np.int8)}, "arrays the model has not: q:smuggled"),
    }
    for what, (arrays, said) in cases.items():
        with pytest.raises(CompressionError, match=said.replace("(", r"\(").replace(")", r"\)")):
            decode(arrays, received, "int8", 64)
    top, _ = compress(trained, received, None, "int8", 64, 0.1)
    top[f"i:{name}"] = top[f"i:{name}"][::-1].copy()
    with pytest.raises(CompressionError, match="top-k positions"):
        decode(top, received, "int8", 64, 0.1)


def _task(**kw) -> ConfigRecord:
    return TaskSpec(run="run-1", server_round=1, total_rounds=2, seed=1, model=ModelConfig(name="cnn"),
                    train={"local_epochs": 1}, in_channels=1, num_classes=2, image_size=28, **kw).to_config()


def _train_message(received: dict, config: ConfigRecord) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in received.items()}), "config": config})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_the_hospitals_residual_is_kept_between_rounds_and_never_sent(tmp_path):
    received, trained = _model_update()

    def app(msg, ctxt):
        arrays = ArrayRecord({k: Array(v) for k, v in trained.items()})
        return Message(RecordDict({"arrays": arrays}), reply_to=msg)

    # a simulated hospital: the residual lives in the Context's state, which Flower keeps per node
    ctxt = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    first = compression_mod(_train_message(received, _task(codec="int4", topk=0.3)), ctxt, app)
    assert set(first.content["arrays"]) == {p + k for k in received for p in ("q:", "s:", "i:")}
    assert RESIDUAL_KEY in ctxt.state.array_records and RESIDUAL_KEY not in first.content.array_records
    residual = {k: a.numpy() for k, a in ctxt.state[RESIDUAL_KEY].items()}
    assert max(float(np.abs(v).max()) for v in residual.values()) > 0
    second = compression_mod(_train_message(received, _task(codec="int4", topk=0.3)), ctxt, app)
    a, b = (decode({k: x.numpy() for k, x in m.content["arrays"].items()}, received, "int4", 256, 0.3) for m in (first, second))
    assert any(not np.allclose(a[k], b[k]) for k in a)  # round 2 sent what round 1 left out
    # a deployed hospital: beside its ledgers, so a restarted daemon (a new Context) goes on from it
    from inprocess import site_yaml

    site = site_yaml(tmp_path, "site-a", 0, tmp_path / "state")
    deployed = Context(run_id=1, node_id=1, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})
    compression_mod(_train_message(received, _task(codec="int8")), deployed, app)
    kept = tmp_path / "state" / "compression" / "run-1.safetensors"
    assert kept.is_file() and RESIDUAL_KEY not in deployed.state.array_records
    restarted = Context(run_id=1, node_id=1, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})
    before = kept.read_bytes()
    compression_mod(_train_message(received, _task(codec="int8")), restarted, app)
    assert kept.read_bytes() != before  # read, added and written again
    # an uncompressed task, an evaluation and a refusal pass as they are
    plain = compression_mod(_train_message(received, _task()), ctxt, app)
    assert set(plain.content["arrays"]) == set(received)


def test_compression_refuses_to_break_secure_aggregation_or_client_side_clipping():
    for sets, said in (({"strategy.compression.codec": "int8", "strategy.secure_aggregation": {}}, "SecAgg+"),
                       ({"strategy.compression.codec": "int8",
                         "strategy.central_dp": {"clipping": "client-fixed", "noise_multiplier": 0.5, "clipping_norm": 1.0}},
                        "server-fixed or server-adaptive")):
        with pytest.raises(ConfigError, match=said):
            read_config(None, sets, SimulationConfig)
    read_config(None, {"strategy.compression.codec": "int8", "strategy.central_dp": {
        "clipping": "server-fixed", "noise_multiplier": 0.5, "clipping_norm": 1.0}}, SimulationConfig)


def test_a_federation_learns_on_a_quarter_of_the_upload_bytes(tmp_path):
    """The synthetic default (3 hospitals, 2 rounds), int8 with error feedback: it learns as the
    uncompressed run does (test_simulate: AUC > 0.65), and each hospital's replies are ~26 % of
    its uncompressed model's bytes."""
    res = subprocess.run([sys.executable, "-m", "aseanfl", "simulate", "--sites", "3", "--rounds", "2", "--seed", "7",
                          "--set", "strategy.compression.codec=int8", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["test_auc"]) > 0.65, final
    from safetensors.numpy import load_file

    fp32 = sum(v.nbytes for v in load_file(str(run_dir / "model.safetensors")).values())
    sites = [r for r in rows if r["site"] != "global" and r["round"] != "0"]
    assert sites and all(r["status"] == "ok" for r in sites), sites
    shares = [int(r["bytes_from_site"]) / fp32 for r in sites]
    assert all(0.2 < s < 0.3 for s in shares), shares


def test_the_server_rejects_a_compressed_update_that_does_not_decode_naming_the_site_and_the_array():
    from inprocess import Collect

    from server.loop import _decoded
    from strategies.config import CompressionConfig

    received, trained = _model_update()
    sent_model = ArrayRecord({k: Array(v) for k, v in received.items()})
    good, _ = compress(trained, received, None, "int8", 256)
    name = next(k for k in received if received[k].dtype.kind == "f")
    bad = {**good, f"q:{name}": good[f"q:{name}"][:10]}  # another shape
    task = _train_message(received, _task(codec="int8"))
    task.metadata.__dict__["_message_id"] = "t1"
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                   "site": ConfigRecord({"name": site})}), reply_to=task)
               for site, arrays in (("hanoi", good), ("bangkok", bad))]
    rows, progress = {}, Collect()
    kept = _decoded(replies, sent_model, CompressionConfig(codec="int8"), progress, 2, lambda s: rows.setdefault(s, {"site": s}), {})
    assert [m.content["site"]["name"] for m in kept] == ["hanoi"]
    restored = {k: a.numpy() for k, a in kept[0].content["arrays"].items()}
    assert set(restored) == set(trained) and all(np.abs(restored[k] - trained[k]).max() < 1e-3 for k in trained)
    assert rows["bangkok"]["status"] == "rejected:decode"
    (said,) = progress.problems
    assert "update from bangkok rejected" in said and f"{name}: holds 10 int8 codes" in said, said
