"""A run whose server died mid-round continues from its checkpoint and ends exactly where an
uninterrupted run ends: same global model bytes, same rows, each round once. On the real round
loop, strategies and ClientApp (tests/inprocess.py, no engine); the deployment test kills the
real server processes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from flwr.app import MessageType
from inprocess import InProcessGrid
from safetensors.numpy import load_file

from client.training.app import build_client_app
from server.engine import checkpoint
from server.engine.rounds import run_federation
from server.records.outputs import read_rows
from simulations.config import load_config
from simulations.federation import hospital
from simulations.runner import prepare_run


class ServerDied(Exception):
    pass


def _plan(root, **sets):
    overrides = {"sites": 3, "server.rounds": 4, "train.local_epochs": 1, "data.synthetic.samples_per_site": 60, "data.synthetic.test_per_site": 20,
                 "data.image_size": 28, "server.output_dir": str(root), **sets}
    return prepare_run(load_config(None, overrides))


def _federate(plan, crash_at=None):
    """Run plan on an in-process grid; `crash_at` = (round, message type): the server dies as it
    sends the first message of that kind in that round."""
    def crash(message):
        if crash_at and (int(message.metadata.group_id), message.metadata.message_type) == crash_at:
            raise ServerDied

    def load(context, image_size):
        return hospital(plan.config, int(context.node_config["partition-id"]), image_size, plan.run_dir.parent)

    grid = InProcessGrid(build_client_app(load), len(plan.config.sites), crash)
    return run_federation(grid, plan)


def _rows(run_dir):
    return [(r["round"], r["site"], r["status"], r["train_loss"], r["val_auc"]) for r in read_rows(run_dir)]


@pytest.mark.parametrize("strategy, sets", [
    ("fedavgm", {"strategy.server_momentum": 0.9}),
    ("fedadam", {"strategy.server_lr": 0.01}),
])
def test_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, strategy, sets):
    sets = {"strategy.name": strategy, **sets}
    whole = _plan(tmp_path / "whole", **sets)
    _federate(whole)
    # the same run, its server killed while round 3's evaluation is going out (round 3's
    # training done and aggregated, nothing of round 3 written yet)
    broken = _plan(tmp_path / "broken", **sets)
    with pytest.raises(ServerDied):
        _federate(broken, crash_at=(3, MessageType.EVALUATE))
    assert max(r["round"] for r in read_rows(broken.run_dir)) == 2
    again = _plan(tmp_path / "unused", **sets)
    again.run_dir, again.resume = broken.run_dir, True
    summary = _federate(again)
    # the momentum / moments were restored, not reset: the model is the uninterrupted run's, byte for byte
    a, b = load_file(str(whole.run_dir / "model.safetensors")), load_file(str(broken.run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), strategy
    assert _rows(broken.run_dir) == _rows(whole.run_dir)  # every round once, none missing
    rounds = [r["round"] for r in read_rows(broken.run_dir) if r["site"] == "global"]
    assert rounds == [0, 1, 2, 3, 4]
    assert summary["resumed_after_round"] == 2 and len(summary["round_seconds"]) == 4
    assert json.loads((broken.run_dir / "summary.json").read_text())["best_round"] == \
        json.loads((whole.run_dir / "summary.json").read_text())["best_round"]


def test_rows_of_a_round_cut_short_after_they_were_written_are_not_kept_twice(tmp_path):
    """A crash between a round's rows and its checkpoint: the round runs again, its rows once."""
    plan = _plan(tmp_path / "run", **{"server.rounds": 3})
    with pytest.raises(ServerDied):
        _federate(plan, crash_at=(3, MessageType.TRAIN))
    rows = read_rows(plan.run_dir)
    extra = [dict(r, round=3) for r in rows if r["round"] == 2]  # round 3's rows, written just before the crash
    with (plan.run_dir / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in extra)
        f.write('{"round": 3, "site": "nan')  # and a line the crash cut in half
    plan.resume = True
    _federate(plan)
    counted = [(r["round"], r["site"]) for r in read_rows(plan.run_dir)]
    assert len(counted) == len(set(counted)) and {r for r, _ in counted} == {0, 1, 2, 3}
    csv_lines = (plan.run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(counted)


def test_adaptive_clipping_norm_is_restored(tmp_path):
    sets = {"strategy.central_dp.clipping": "server-adaptive", "strategy.central_dp.noise_multiplier": 0.1,
            "strategy.central_dp.clipping_norm": 5.0, "server.rounds": 3}
    plan = _plan(tmp_path / "run", **sets)
    with pytest.raises(ServerDied):
        _federate(plan, crash_at=(3, MessageType.TRAIN))
    from strategies.factory import build_strategy

    fresh = build_strategy(plan.config.strategy, 3)
    restored = build_strategy(plan.config.strategy, 3)
    ckpt = checkpoint.load(plan.run_dir, plan.config, restored)
    assert ckpt.round == 2
    assert restored.clipping_norm != fresh.clipping_norm == 5.0  # two rounds moved it; it comes back moved


def test_a_checkpoint_that_cannot_be_used_is_refused_and_nothing_is_changed(tmp_path):
    plan = _plan(tmp_path / "run", **{"server.rounds": 3})
    with pytest.raises(ServerDied):
        _federate(plan, crash_at=(2, MessageType.TRAIN))
    before = {p.name: p.read_bytes() for p in plan.run_dir.iterdir() if p.is_file()}

    other = _plan(tmp_path / "unused", **{"server.rounds": 3, "train.lr": 0.5})  # another config
    other.run_dir, other.resume = plan.run_dir, True
    with pytest.raises(checkpoint.CheckpointError, match="other settings"):
        _federate(other)
    ckpt = plan.run_dir / checkpoint.NAME
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # cut short (a disk that filled up, a bad copy)
    cut = {**before, checkpoint.NAME: ckpt.read_bytes()}
    plan.resume = True
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        _federate(plan)
    assert {p.name: p.read_bytes() for p in plan.run_dir.iterdir() if p.is_file()} == cut


def test_a_setting_added_later_at_its_default_keeps_older_checkpoints_resumable():
    """server.select_by came after runs were checkpointed: at its default the settings digest is
    the one written before it existed; set otherwise, the run has other settings."""
    cfg = load_config(None, {"sites": 3})
    tree = cfg.model_dump(mode="json")
    del tree["server"]["select_by"]
    for path in checkpoint.FREE:  # the digest as the code before select_by computed it
        node = tree
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    if tree["strategy"]["compression"] == checkpoint.LATER[("strategy", "compression")]:
        tree["strategy"].pop("compression")
    before = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()
    assert checkpoint.settings_digest(cfg) == before
    assert checkpoint.settings_digest(load_config(None, {"sites": 3, "server.select_by": "loss"})) != before
