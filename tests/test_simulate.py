"""End to end on Flower's Simulation Engine (Ray): learning, outputs, reproducibility, and
what the server actually receives from hospitals."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medimaging.models import build_model
from medimaging.training import evaluate
from server.engine.plan import Progress
from simulations.config import load_config
from simulations.federation import global_test, task_shape
from simulations.runner import simulate

from conftest import medmnist_file

ARGS = {"sites": 3, "server.rounds": 2, "seed": 7}


class Recorder(Progress):
    def __init__(self):
        self.replies = []

    def received(self, rnd, phase, reply):
        self.replies.append((phase, reply))


def _run_dir(parent):
    (run_dir,) = [p for p in parent.iterdir() if p.is_dir()]
    return run_dir


def test_simulate_cli_learns_writes_everything_and_is_reproducible(tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    cli = subprocess.run(
        [sys.executable, "-m", "aseanfl", "simulate", "--sites", "3", "--rounds", "2", "--seed", "7", "--out", str(out_a)],
        capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    assert "round 2/2" in cli.stdout.lower() and "global" in cli.stdout
    run_a = _run_dir(out_a)
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "model.safetensors", "model_best.safetensors",
                 "report.md", "global_auc.png", "site_auc.png", "data_distribution.png", "summary.json"):
        assert (run_a / name).stat().st_size > 0, name
    header = next(line for line in (run_a / "report.md").read_text().splitlines() if line.startswith("| site |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "test_accuracy" in columns and "test_accuracy_per_class" in columns
    assert "test_auc_per_class" not in columns, "a binary task's per-class AUCs repeat its test AUC"

    rows = list(csv.DictReader((run_a / "metrics.csv").open()))
    assert {r["site"] for r in rows} == {"nanning", "hanoi", "bangkok", "global"}
    assert [r["round"] for r in rows if r["site"] == "global"] == ["0", "1", "2"]
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["test_auc"]) > 0.65, "two rounds on the synthetic default beat chance clearly"
    for r in rows:
        if r["site"] != "global":
            assert int(r["num_train"]) > 0 and int(r["bytes_from_site"]) > 0 and float(r["val_auc"]) > 0

    # Same seed through the Python API: identical metrics, byte for byte.
    recorder = Recorder()
    run_b = simulate(load_config(None, {**ARGS, "server.output_dir": str(out_b)}), recorder)
    assert (run_a / "metrics.csv").read_text() == (run_b / "metrics.csv").read_text()
    assert (run_a / "config.yaml").read_text().replace(str(out_a), "") == (run_b / "config.yaml").read_text().replace(str(out_b), "")

    # The saved final model is the one that was evaluated.
    cfg = load_config(run_b / "config.yaml")
    shape = task_shape(cfg)
    model = build_model(cfg.model, shape.in_channels, shape.num_classes, shape.image_size)
    model.load_state_dict(load_file(str(run_b / "model.safetensors")))
    auc = evaluate(model, global_test(cfg), shape.num_classes)["auc"]
    assert abs(auc - float(final["test_auc"])) < 1e-6

    # Privacy on the real replies: model arrays, the schema's aggregate metrics, the site name. Nothing else.
    param_names = set(model.state_dict())
    assert len(recorder.replies) == 3 * 2 * 2
    for phase, reply in recorder.replies:
        content = reply.content
        assert set(content.config_records) == {"site"} and set(content.config_records["site"]) == {"name"}
        metrics = set(content.metric_records["metrics"])
        if phase == "training":
            assert set(content.array_records) == {"arrays"}
            assert set(content.array_records["arrays"]) == param_names
            assert metrics == {"num-examples", "train-loss", "steps", "epsilon"}
        else:
            assert not content.array_records
            assert metrics == {"num-examples", "val-loss", "val-accuracy", "val-auc"}
    summary = json.loads((run_b / "summary.json").read_text())
    assert summary["best_round"] in (1, 2)
    _reports_in_thai_and_vietnamese(run_a)


def _reports_in_thai_and_vietnamese(run):
    """The run's report.md written again with `aseanfl --lang th report` and `--lang vi report`
    (issue 19): translated headings and sentences, numbers as they were."""
    english = (run / "report.md").read_text()
    assert "## Final round (2)" in english and "## Global model" in english
    for lang, wanted in (("th", ["# การรันแบบสหพันธ์", "## รอบสุดท้าย (2)", "## โมเดลส่วนกลาง", "## รายโรงพยาบาล",
                                 "จำนวนรอบ: 2;", "ไฟล์: `config.yaml`"]),
                         ("vi", ["# Lượt chạy liên kết", "## Vòng cuối (2)", "## Mô hình toàn cục", "## Theo từng bệnh viện",
                                 "Số vòng: 2;", "Các tệp: `config.yaml`"])):
        res = subprocess.run([sys.executable, "-m", "aseanfl", "--lang", lang, "report", str(run)], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        text = (run / "report.md").read_text()
        assert all(w in text for w in wanted), (lang, text[:800])
        assert "Final round" not in text and "Global model" not in text
        assert "missing from font" not in res.stderr, res.stderr


@pytest.mark.parametrize("name, sets, target", [
    ("pneumoniamnist", {"sites": 4, "server.rounds": 4, "train.local_epochs": 1}, 0.90),
    ("breastmnist", {"sites": 3, "server.rounds": 5}, 0.80),  # 546 training images (ultrasound)
])
def test_medmnist_federated_reaches_target_auc(tmp_path, name, sets, target):
    cfg = load_config(None, {"data.path": str(medmnist_file(name)), "server.output_dir": str(tmp_path), **sets})
    run_dir = simulate(cfg)
    final = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["site"] == "global"][-1]
    assert final["test_auc"] >= target, final


def test_multiclass_rgb_npz_end_to_end(tmp_path):
    """A 3-class RGB MedMNIST-style file written to disk: the class is the dominant colour.
    Trained with augmentation (flips, turns and brightness keep the dominant colour)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    images = rng.integers(0, 80, (600, 28, 28, 3), dtype=np.uint8)
    images[np.arange(600), :, :, labels] += 120
    path = tmp_path / "colours.npz"
    np.savez(path, train_images=images[:500], train_labels=labels[:500, None],
             test_images=images[500:], test_labels=labels[500:, None])
    cfg = load_config(None, {"data.path": str(path), "sites": 2, "server.rounds": 2, "train.local_epochs": 1,
                             "partition.scheme": "dirichlet", "partition.alpha": 1.0, "server.output_dir": str(tmp_path),
                             "train.augment.flip": True, "train.augment.rotate_deg": 20.0, "train.augment.intensity": 0.1})
    assert task_shape(cfg).num_classes == 3 and task_shape(cfg).in_channels == 3
    run_dir = simulate(cfg)
    assert "rotate_deg: 20.0" in (run_dir / "config.yaml").read_text()
    final = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["site"] == "global"][-1]
    assert final["test_auc"] > 0.9 and final["test_accuracy"] > 0.6, final
    per_class = [float(v) for v in final["test_auc_per_class"].split(";")]  # one vs rest, per colour
    assert len(per_class) == 3 and min(per_class) > 0.8 and len(final["test_accuracy_per_class"].split(";")) == 3


def test_multilabel_npz_end_to_end(tmp_path):
    """Several findings on one image (MedMNIST's multi-label layout, as chestmnist): one sigmoid
    per finding, macro AUC over findings, federated (multi-label under DP-SGD: test_privacy)."""
    from medimaging.synthetic import multilabel_npz

    data = multilabel_npz(tmp_path / "two-findings.npz")
    cfg = load_config(None, {"data.path": str(data), "sites": 3, "server.rounds": 3, "train.local_epochs": 2,
                             "server.output_dir": str(tmp_path / "out")})
    run_dir = simulate(cfg)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["test_auc"]) > 0.78, final  # measured 0.839
    assert len(final["test_auc_per_class"].split(";")) == 2, "AUC per finding"
    assert {r["site"] for r in rows if r["round"] == "3" and r["status"] == "ok"} == {"nanning", "hanoi", "bangkok"}
    dist = json.loads((run_dir / "data_distribution.json").read_text())
    assert all(len(d["train"]) == 2 for d in dist.values())  # images with each finding, per site


def test_auc_ranks_a_confident_models_scores_without_float32_ties():
    """A confident model: every logit gap is 20-30, where a float32 softmax gives exactly 1.0 to
    all images. The positives' gaps are the larger ones, so AUC is 1; tied it would be 0.5. The
    same for several classes (one vs rest) and for findings (sigmoid)."""
    from medimaging.datasets import Split

    gap = torch.tensor([20.0, 21, 22, 23, 27, 28, 29, 30])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    binary = torch.stack([-gap / 2, gap / 2], 1)
    assert (torch.softmax(binary, 1)[:, 1] == 1).all()  # the input really ties in float32

    def model(k):  # the "images" are the logits
        net = torch.nn.Linear(k, k, bias=False)
        torch.nn.init.eye_(net.weight)
        return net

    assert evaluate(model(2), Split(binary, y), 2)["auc"] == 1.0
    three = torch.cat([binary, torch.full((8, 1), -40.0)], 1)
    scores = evaluate(model(3), Split(three, y), 3)
    assert scores["auc"] == 1.0 and scores["auc_per_class"][:2] == [1.0, 1.0]
    findings = evaluate(model(2), Split(torch.stack([gap, -gap], 1), torch.stack([y, 1 - y], 1).float()), 2)
    assert findings["auc"] == 1.0 and torch.sigmoid(gap).eq(1).all()
