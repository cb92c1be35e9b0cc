"""Federated evaluation's input checks (server/evaluation/federated.py): a model file that is not
safetensors, cut short, or holds another model's tensors, and a model card that does not fit the
federation's task, are each one clear error before any hospital is contacted."""

import json

import pytest
import torch
from safetensors.torch import save_file

from medimaging.config import ModelConfig
from medimaging.yamlconfig import ConfigError
from server.engine.config import RunConfig
from server.evaluation.federated import ModelCard, check_against_task, check_model_file, read_card, sha256
from server.engine.plan import TaskShape

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
    import subprocess
    import sys

    import numpy as np
    from safetensors.torch import load_file

    from conftest import medmnist_file
    from medimaging.scoring import GRID, _rank_auc
    from simulations.config import load_config
    from simulations.federation import site_data, task_shape
    from conftest import simulate_here as simulate  # the round loop without Ray's start

    data = medmnist_file("pneumoniamnist")
    fed = {"data.path": str(data), "sites": 3, "partition.scheme": "quantity", "data.val_fraction": 0.1}
    run_dir = simulate(load_config(None, {**fed, "server.rounds": 2, "train.local_epochs": 1, "server.cross_site": True,
                                          "server.cross_site_min_cases": 30, "server.output_dir": str(tmp_path / "runs")}))
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
            probs[name] = torch.softmax(model(val.x).double(), 1)[:, 1].numpy()
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
    band = result["pooled"]["intervals"]
    assert band["auc"]["low"] < result["pooled"]["auc"] < band["auc"]["high"]
    assert band["accuracy"]["low"] < result["pooled"]["accuracy"] < band["accuracy"]["high"]

    # cross-site (server.cross_site): the global model's row is the same model scored as above, the
    # hospitals' own final-round models are other models, the small hospital's column is withheld
    cross = json.loads((run_dir / "cross_site.json").read_text())
    assert cross["rows"] == ["global", *sorted(cfg.sites)] and cross["sites"] == sorted(cfg.sites)
    assert cross["models"]["global"]["model_sha256"] != cross["models"][cfg.sites[0]]["model_sha256"]
    for name in released:
        assert cross["matrix"]["global"][name] == pytest.approx(sites[name]["auc"]["value"], abs=1e-9)
        assert all(0.6 < cross["matrix"][m][name] <= 1 for m in cross["rows"])  # every model learned something
    assert {m: cross["matrix"][m][small] for m in cross["rows"]} == {m: None for m in cross["rows"]}
    assert len({cross["matrix"][m][released[0]] for m in cross["rows"]}) == len(cross["rows"])  # four models
    report = (run_dir / "report.md").read_text()
    assert "## Cross-site evaluation" in report and (run_dir / "cross_site.png").stat().st_size > 10_000
    assert (run_dir / "cross_site.csv").read_text().splitlines()[0] == "model," + ",".join(sorted(cfg.sites))

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(model_file.read_bytes()[:1000])
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    for bad, said in ((cut, "not a readable safetensors file, or cut short"),):
        res = cli("--model", str(bad), "--out", str(tmp_path / "never"))
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr + res.stdout, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_cross_site_refuses_what_would_show_one_hospitals_protected_model():
    from server.engine.config import RunConfig

    for extra, said in (({"strategy": {"secure_aggregation": {}}}, "never sees one hospital's model"),
                        ({"strategy": {"fedbn": True}}, "normalisation layers")):
        with pytest.raises(ValueError, match=said):
            RunConfig.model_validate({"server": {"cross_site": True}, **extra})


def _reply(scores_json: str, extra: dict | None = None):
    from flwr.app import ConfigRecord, Message, RecordDict

    record = {"json": scores_json, "model-sha256": "ab" * 32, **(extra or {})}
    msg = Message(RecordDict({"scores": ConfigRecord(record), "site": ConfigRecord({"name": "site-a"})}), dst_node_id=1,
                  message_type="evaluate.contest")
    msg.metadata.group_id = "eval-x"
    return msg


def test_an_evaluation_reply_holds_the_fixed_schema_and_the_audit_flags_anything_else(tmp_path):
    """Real figures from medimaging/scoring.py pass the hospital's audit; a reply carrying one
    more field in its figures (patient ids), or one more key, or no model hash, is flagged."""
    import numpy as np

    from client.operations.audit import AuditLog, describe, verify
    from medimaging.scoring import score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    real = score(np.stack([1 - probs, probs], 1), labels, 20)
    assert real.auc.value > 0.6 and real.classes[1].tp_at[0] == int(labels.sum())
    good = tmp_path / "good.jsonl"
    AuditLog(good).append(describe(_reply(real.model_dump_json())))
    report = verify(good, "site-a")
    assert report.problems == [] and report.models == {"ab" * 32}
    leaky = real.model_dump(mode="json") | {"patient_ids": ["P-0001", "P-0002"]}
    bad = tmp_path / "bad.jsonl"
    log = AuditLog(bad)
    log.append(describe(_reply(json.dumps(leaky))))
    log.append(describe(_reply(real.model_dump_json(), {"scores_per_case": "0.91,0.12"})))
    no_hash = _reply(real.model_dump_json())
    no_hash.content["scores"]["model-sha256"] = ""
    log.append(describe(no_hash))
    problems = verify(bad, "site-a").problems
    assert any("line 1: scores.json is not the fixed schema" in p and "patient_ids" in p for p in problems), problems
    assert any("line 2: scores.scores_per_case is not an allowed key" in p for p in problems), problems
    assert any("line 3: scores without the sha256" in p for p in problems), problems


def test_a_hospital_scores_only_the_model_whose_sha256_was_named():
    import hashlib

    from client.training.contest import MODEL_KEY, model_record, received_model
    from protocol.messages import EvaluationSpec
    from client.training.site import SiteDataError
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in CARD.build(RunConfig()).state_dict().items()})
    spec = EvaluationSpec(evaluation="e", model_sha256=hashlib.sha256(blob).hexdigest(), model=CARD.model, in_channels=1,
                          num_classes=2, image_size=28)
    assert set(received_model(spec, {MODEL_KEY: model_record(blob)})) == set(CARD.build(RunConfig()).state_dict())
    swapped = bytearray(blob)
    swapped[-1] ^= 1  # one weight changed in transit, or another model sent under this hash
    with pytest.raises(SiteDataError, match="not .* as the evaluation names it; nothing was scored"):
        received_model(spec, {MODEL_KEY: model_record(bytes(swapped))})


def test_a_hospital_with_noise_epsilon_scores_under_dp_the_same_way_twice(tmp_path):
    """A hospital's ClientApp path (client/contest.score_model) with site.yaml
    evaluation.noise_epsilon: figures released under DP, repeatable for the same model, unlike
    the plain figures; segmentation or several classes are refused rather than released plainly."""
    import hashlib

    from safetensors.torch import save

    from client.training.app import Hospital
    from client.training.contest import MODEL_KEY, model_record, score_model
    from protocol.messages import EvaluationSpec
    from client.training.site import SiteDataError
    from medimaging.datasets import SiteData, Split
    from medimaging.synthetic import site_images

    (x, y), _ = site_images(0, 3, 400, 10)
    split = Split(torch.as_tensor(x, dtype=torch.float32)[:, :, :28, :28], torch.as_tensor(y).long().flatten())
    assert split.x.std() > 0.1 and 0 < int(split.y.sum()) < len(split)  # real images, both classes
    blob = save({k: v.contiguous() for k, v in CARD.build(RunConfig()).state_dict().items()})
    spec = EvaluationSpec(evaluation="e", model_sha256=hashlib.sha256(blob).hexdigest(), model=CARD.model, in_channels=1,
                          num_classes=2, image_size=28, split="validation")
    content = {MODEL_KEY: model_record(blob)}
    plain = Hospital(data=SiteData(name="site-a", train=split, val=split), ledger_root=tmp_path)
    noisy = Hospital(data=SiteData(name="site-a", train=split, val=split), ledger_root=tmp_path, noise_epsilon=1.0)
    a, b, exact = score_model(spec, content, noisy), score_model(spec, content, noisy), score_model(spec, content, plain)
    assert a == b and a.dp_epsilon == 1.0 and exact.dp_epsilon is None
    assert a.classes[1].tp_at != exact.classes[1].tp_at and a.split == "validation"
    with pytest.raises(SiteDataError, match="DP noise only"):
        score_model(spec.model_copy(update={"num_classes": 3}), content, noisy)
