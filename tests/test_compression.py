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

from common.compression import CompressionError, apply, compress, decode
from protocol.messages import TaskSpec
from client.training.mods import RESIDUAL_KEY, compression_mod
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

    from server.engine.updates import decoded
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
    names = {}
    for node, reply in enumerate(replies, start=1):  # the server names each reply by the node it came from
        reply.metadata.__dict__["_src_node_id"] = node
        names[node] = reply.content["site"]["name"]
    rows, progress = {}, Collect()
    kept = decoded(replies, sent_model, CompressionConfig(codec="int8"), progress, 2, lambda s: rows.setdefault(s, {"site": s}),
                    names)
    assert [m.content["site"]["name"] for m in kept] == ["hanoi"]
    restored = {k: a.numpy() for k, a in kept[0].content["arrays"].items()}
    assert set(restored) == set(trained) and all(np.abs(restored[k] - trained[k]).max() < 1e-3 for k in trained)
    assert rows["bangkok"]["status"] == "rejected:decode"
    (said,) = progress.problems
    assert "update from bangkok rejected" in said and f"{name}: holds 10 int8 codes" in said, said


def _server_message(node: int, arrays: dict, config: ConfigRecord, kind=MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": config})
    return Message(content, dst_node_id=node, message_type=kind)


def test_the_global_model_goes_down_as_a_delta_against_what_each_hospital_holds(tmp_path):
    """server/engine/downlink.py with client/mods.downlink_mod: full to a hospital that holds nothing,
    one delta to one that holds the last version, a chain to one that sat rounds out, nothing new
    to one that is up to date; each rebuilds the server's model bit for bit, and one whose copy
    is gone is told so in one line and gets the full model next time."""
    from common.compression import digest
    from client.training.mods import downlink_mod
    from server.engine.downlink import Downlink

    start, _ = _model_update(0)
    down = Downlink("int8", 256, ArrayRecord({k: Array(v) for k, v in start.items()}))
    got: dict[int, dict] = {}

    def app(msg, ctxt):
        got[msg.metadata.dst_node_id] = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        return Message(RecordDict({"site": ConfigRecord({"name": "x"})}), reply_to=msg)

    sim = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n}, state=RecordDict(), run_config={})
           for n in (1, 2, 3)}
    from inprocess import site_yaml

    site = site_yaml(tmp_path, "site-a", 0, tmp_path / "state")
    deployed = lambda: Context(run_id=1, node_id=4, node_config={"site-config": str(site)}, state=RecordDict(),  # noqa: E731
                               run_config={})
    contexts = {**sim, 4: deployed()}

    def send(nodes, restart=False):
        msgs = down.outgoing([_server_message(n, down.current, _task()) for n in nodes])
        sizes = {m.metadata.dst_node_id: sum(a.numpy().nbytes for a in m.content["arrays"].values()) for m in msgs}
        replies = []
        for m in msgs:
            n = m.metadata.dst_node_id
            ctxt = deployed() if (restart and n == 4) else contexts[n]
            replies.append(private_errors(m, ctxt))
        down.replied(msgs, replies)
        return sizes, replies

    def private_errors(m, ctxt):
        from client.training.mods import private_errors_mod

        def inner(msg, c):
            return downlink_mod(msg, c, app)
        reply = private_errors_mod(m, ctxt, inner)
        reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
        return reply

    full = sum(v.nbytes for v in start.values())
    sizes, _ = send([1, 2, 3, 4])  # version 0: nobody holds anything
    assert all(s == full for s in sizes.values())
    rng = np.random.default_rng(1)
    for _ in range(3):  # three rounds: 1 and 4 hear every one, 2 only the last, 3 none
        new = {k: v + (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
               for k, v in down.current.items()}
        down.advance(ArrayRecord({k: Array(v) for k, v in new.items()}))
        nodes = [1, 4] if down.version < 3 else [1, 2, 4]
        sizes, _ = send(nodes, restart=down.version == 2)  # 4's daemon restarts: its copy is on disk
        assert sizes[1] < 0.27 * full and sizes[4] < 0.27 * full, (sizes, full)
        for n in nodes:
            assert digest(got[n]) == down.sha  # rebuilt exactly
    assert 0.5 * full < sizes[2] < 0.8 * full  # a chain of three deltas
    assert down.holds == {1: 3, 2: 3, 3: 0, 4: 3}
    sizes, _ = send([1])  # nothing changed since: nothing to send
    assert sizes[1] == 0 and digest(got[1]) == down.sha
    # the server's model follows the strategy's within the int8 error, and the error does not build up
    assert max(float(np.abs(down.current[k] - new[k]).max()) for k in new) < 1e-3
    # a hospital whose copy is gone: one line, no local detail; the full model next time
    (tmp_path / "state" / "compression" / "run-1.model.safetensors").unlink()
    down.advance(ArrayRecord({k: Array(v) for k, v in new.items()}))
    _, (reply,) = send([4], restart=True)
    assert reply.has_error() and "holds no model" in reply.error.reason and "state" not in reply.error.reason
    assert 4 not in down.holds
    sizes, (reply,) = send([4], restart=True)
    assert not reply.has_error() and sizes[4] == full and digest(got[4]) == down.sha


def test_a_federation_learns_with_compressed_models_both_ways(tmp_path):
    """int8 up and down, 5 hospitals of which 3 train each round (all validate): it learns as the
    uncompressed run does, and after the first contact each hospital downloads ~a quarter."""
    def run(name, **sets):
        from simulations.config import load_config
        from conftest import simulate_here as simulate  # the round loop without Ray's start

        cfg = load_config(None, {"sites": 5, "server.rounds": 3, "data.synthetic.samples_per_site": 200,
                                 "strategy.fraction_train": 0.6, "server.output_dir": str(tmp_path / name), **sets})
        run_dir = simulate(cfg)
        return run_dir, list(csv.DictReader((run_dir / "metrics.csv").open()))

    _, plain = run("plain")
    run_dir, rows = run("both", **{"strategy.compression.codec": "int8", "strategy.compression.downlink": "int8"})
    auc = [float(r["test_auc"]) for r in rows if r["site"] == "global"]
    plain_auc = [float(r["test_auc"]) for r in plain if r["site"] == "global"]
    assert auc[-1] > 0.65 and abs(auc[-1] - plain_auc[-1]) < 0.03, (auc, plain_auc)
    from safetensors.numpy import load_file

    fp32 = sum(v.nbytes for v in load_file(str(run_dir / "model.safetensors")).values())
    first = [int(r["bytes_to_site"]) for r in rows if r["round"] == "1" and r["site"] != "global"]
    later = [int(r["bytes_to_site"]) for r in rows if r["round"] in ("2", "3") and r["site"] != "global"]
    plain_later = [int(r["bytes_to_site"]) for r in plain if r["round"] in ("2", "3") and r["site"] != "global"]
    assert all(b > fp32 for b in first)  # first contact: the full model to train, then one delta to validate
    assert sum(later) < 0.3 * sum(plain_later), (sum(later), sum(plain_later))
    assert all(r["status"] in ("ok", "eval-only") for r in rows if r["site"] != "global" and r["round"] != "0")
