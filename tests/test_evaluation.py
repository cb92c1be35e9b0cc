"""Federated evaluation's input checks (server/evaluation.py): a model file that is not
safetensors, cut short, or holds another model's tensors, and a model card that does not fit the
federation's task, are each one clear error before any hospital is contacted."""

import pytest
import torch
from safetensors.torch import save_file

from medimaging.config import ModelConfig
from medimaging.yamlconfig import ConfigError
from server.config import RunConfig
from server.evaluation import ModelCard, check_against_task, check_model_file, read_card, sha256
from server.loop import TaskShape

CARD = ModelCard(model=ModelConfig(name="cnn"), in_channels=1, num_classes=2, image_size=28)


def _model_file(tmp_path, card=CARD, name="m.safetensors"):
    torch.manual_seed(0)
    model = card.build(RunConfig())
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_good_model_file_passes_and_bad_ones_are_named(tmp_path):
    good = _model_file(tmp_path)
    tensors = check_model_file(good, CARD, RunConfig())
    assert tensors and len(sha256(good)) == 64
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a PDF of our method, not weights")
    with pytest.raises(ConfigError, match=r"notes.safetensors: not a readable safetensors file"):
        check_model_file(text, CARD, RunConfig())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"cut.safetensors: not a readable safetensors file, or cut short"):
        check_model_file(cut, CARD, RunConfig())
    three = _model_file(tmp_path, CARD.model_copy(update={"num_classes": 3}), "three.safetensors")
    with pytest.raises(ConfigError, match=r"three.safetensors: .* is float32\[3.*cnn with 2 classes .* has float32\[2"):
        check_model_file(three, CARD, RunConfig())
    other = _model_file(tmp_path, CARD.model_copy(update={"model": ModelConfig(name="resnet18")}), "resnet.safetensors")
    with pytest.raises(ConfigError, match=r"resnet.safetensors: its tensors are not cnn's \(missing .*not in the model"):
        check_model_file(other, CARD, RunConfig())
    with pytest.raises(ConfigError, match="not found"):
        check_model_file(tmp_path / "none.safetensors", CARD, RunConfig())


def test_a_model_card_must_fit_the_federations_task(tmp_path):
    check_against_task(CARD, TaskShape(1, 2, 28), "card.yaml")
    with pytest.raises(ConfigError, match=r"card.yaml: num_classes is 2, the federation's data has 3"):
        check_against_task(CARD, TaskShape(1, 3, 28), "card.yaml")
    with pytest.raises(ConfigError, match=r"card.yaml: task is classification, the federation's data has segmentation"):
        check_against_task(CARD, TaskShape(1, 2, 32, task="segmentation"), "card.yaml")
    bad = tmp_path / "card.yaml"
    bad.write_text("model: {name: vgg}\nin_channels: 1\nnum_classes: 2\nimage_size: 28\n")
    with pytest.raises(ConfigError, match=r"card.yaml: model.name: "):
        read_card(bad)
    bad.write_text("model: {name: cnn}\nin_channels: 1\nnum_classes: 2\n")
    with pytest.raises(ConfigError, match=r"card.yaml: image_size: Field required"):
        read_card(bad)


def test_a_trained_model_scored_at_three_hospitals_pools_as_on_the_union(tmp_path):
    """`aseanfl evaluate` on a simulated federation of 3 hospitals of different sizes (real
    pneumoniamnist, quantity skew): each hospital's figures equal the same computed centrally on
    its held-out cases, the pooled accuracy is exact and the pooled AUC equals the union's on the
    score grid (1e-9); the smallest hospital withholds its AUC; bad model files are refused in
    one line before any hospital is asked."""
    import json
    import subprocess
    import sys

    import numpy as np
    from safetensors.torch import load_file

    from conftest import medmnist_file
    from medimaging.scoring import GRID, _rank_auc
    from simulations.config import load_config
    from simulations.federation import site_data, task_shape
    from simulations.runner import simulate

    data = medmnist_file("pneumoniamnist")
    fed = {"data.path": str(data), "sites": 3, "partition.scheme": "quantity", "data.val_fraction": 0.1}
    run_dir = simulate(load_config(None, {**fed, "server.rounds": 2, "train.local_epochs": 1,
                                          "server.output_dir": str(tmp_path / "runs")}))
    model_file = run_dir / "model.safetensors"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "aseanfl", "evaluate", "--data", str(data), "--sites", "3",
                               "--set", "partition.scheme=quantity", "--set", "data.val_fraction=0.1", *args],
                              capture_output=True, text=True, timeout=600)

    res = cli("--model", str(model_file), "--min-cases", "30", "--out", str(tmp_path / "eval"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "pooled over 3 hospitals" in res.stdout
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["model_sha256"] == sha256(model_file)

    cfg = load_config(None, fed)
    shape = task_shape(cfg)
    card = ModelCard(model=cfg.model, in_channels=shape.in_channels, num_classes=2, image_size=shape.image_size)
    model = card.build(cfg)
    model.load_state_dict(load_file(str(model_file)))
    model.eval()
    probs, labels, released = {}, {}, []
    with torch.no_grad():
        for i, name in enumerate(cfg.sites):
            val = site_data(cfg, i, shape.image_size).val
            assert len(val) > 50 and 0 < int(val.y.sum()) < len(val)  # real, labelled, both classes
            probs[name] = torch.softmax(model(val.x), 1)[:, 1].numpy().astype(np.float64)
            labels[name] = val.y.numpy()
    sites = result["sites"]
    small = min(sites, key=lambda s: sites[s]["cases"])
    assert sites[small]["auc"]["value"] is None and "fewer than min_cases 30" in sites[small]["auc"]["withheld"]
    for name, s in sites.items():
        assert s["cases"] == len(labels[name])
        if s["auc"]["value"] is not None:
            released.append(name)
            assert s["auc"]["value"] == pytest.approx(_rank_auc(probs[name], labels[name] == 1), abs=1e-9)
            assert s["auc"]["low"] < s["auc"]["value"] < s["auc"]["high"]
    assert len(released) == 2 and small not in released
    p = np.concatenate([probs[n] for n in released])
    y = np.concatenate([labels[n] for n in released]) == 1
    binned = np.floor(np.round(p * (GRID - 1), 10)) / (GRID - 1)
    assert result["pooled"]["auc"] == pytest.approx(_rank_auc(binned, y), abs=1e-9)
    assert abs(result["pooled"]["auc"] - _rank_auc(p, y)) < 0.005
    every = np.concatenate([probs[n] for n in cfg.sites]) >= 0.5
    truth = np.concatenate([labels[n] for n in cfg.sites]) == 1
    assert result["pooled"]["accuracy"] == pytest.approx(float((every == truth).mean()), abs=1e-12)
    assert result["pooled"]["auc"] > 0.8  # the model learned: real figures, not chance
    table = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "withheld (" in table and "| **pooled** |" in table

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(model_file.read_bytes()[:1000])
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    for bad, said in ((cut, "not a readable safetensors file, or cut short"),):
        res = cli("--model", str(bad), "--out", str(tmp_path / "never"))
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr + res.stdout, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()
