"""Segmentation (MONAI UNet, Dice + cross-entropy loss, Dice per label) federated on Flower's
Simulation Engine: synthetic volumes, and 2D images with mask files on disk."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from medimaging.config import FilesConfig
from medimaging.files import decode
from medimaging.synthetic import generate_masks, site_profile
from simulations.config import ConfigError, load_config
from conftest import simulate_here as simulate  # the round loop without Ray's start
from simulations.runner import prepare_run

from test_simulate import Recorder

SEGMENTATION = {"data.synthetic.task": "segmentation", "model.name": "unet", "train.lr": 0.01}


def _rows(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def test_federated_3d_segmentation_reaches_dice(tmp_path):
    recorder = Recorder()
    cfg = load_config(None, {**SEGMENTATION, "data.synthetic.spatial_dims": 3, "data.synthetic.samples_per_site": 40,
                             "data.synthetic.test_per_site": 20, "sites": 3, "server.rounds": 5,
                             "train.batch_size": 8, "server.output_dir": str(tmp_path)})
    run_dir = simulate(cfg, recorder)
    rows = _rows(run_dir)
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["test_dice"]) > 0.7, final
    assert len(final["test_dice_per_label"].split(";")) == 1 and final["test_auc"] == "", "one lesion label; no AUC"
    last = [r for r in rows if r["round"] == "5" and r["site"] != "global"]
    assert len(last) == 3 and all(r["status"] == "ok" and float(r["val_dice"]) > 0.5 for r in last), last
    for phase, reply in recorder.replies:  # what crossed the wire: arrays, aggregate numbers, the site name
        metrics = set(reply.content.metric_records["metrics"])
        if phase != "training":
            assert metrics == {"num-examples", "val-loss", "val-accuracy", "val-auc", "val-dice"}
        assert set(reply.content.config_records) == {"site"}
    report = (run_dir / "report.md").read_text()
    assert "best round by federated validation Dice" in report and "test_dice_per_label" in report
    with safe_open(str(run_dir / "model_best.safetensors"), "pt") as f:
        assert f.metadata()["selected_by"] == "federated val_dice"
    assert "spatial_dims: 3" in (run_dir / "config.yaml").read_text()


def _disc_images(n, side, rng):
    profile = site_profile(1)
    images, masks = generate_masks(n, profile, rng)
    images = (images[:, 0] * 255).round().astype(np.uint8)
    return images, masks.astype(np.uint8)


@pytest.fixture
def mask_files(tmp_path):
    """2D images (PNG, NIfTI) with masks on disk (PNG 0/255, NIfTI 0/1), listed in a manifest,
    plus a mask of the wrong size, a mask holding a non-label value and a missing mask."""
    root = tmp_path / "export"
    (root / "img").mkdir(parents=True)
    (root / "seg").mkdir()
    images, masks = _disc_images(160, 28, np.random.default_rng(0))
    lines = ["path,mask,split"]
    for i, (img, mask) in enumerate(zip(images, masks)):
        split = "test" if i >= 130 else ""
        if i % 4 == 0:
            nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), root / "img" / f"case{i}.nii.gz")
            nib.save(nib.Nifti1Image(mask.astype(np.float32), np.eye(4)), root / "seg" / f"case{i}.nii.gz")
            lines.append(f"img/case{i}.nii.gz,seg/case{i}.nii.gz,{split}")
        else:
            Image.fromarray(img).save(root / "img" / f"case{i}.png")
            Image.fromarray(mask * 255).save(root / "seg" / f"case{i}.png")
            lines.append(f"img/case{i}.png,seg/case{i}.png,{split}")
    Image.fromarray(images[0]).save(root / "img" / "odd.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "seg" / "small.png")
    Image.fromarray(np.full(images[0].shape, 7, np.uint8)).save(root / "seg" / "seven.png")
    lines += ["img/odd.png,seg/small.png,", "img/case1.png,seg/seven.png,", "img/case2.png,seg/gone.png,"]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def test_mask_files_decode_with_every_problem_named(mask_files, tmp_path):
    cfg = FilesConfig(root=mask_files, manifest=mask_files / "manifest.csv", image_size=32, cache_dir=tmp_path / "cache",
                      classes=["background", "lesion"])
    decoded = decode(cfg)
    problems = {p.file: p.reason for p in decoded.inventory.problems}
    assert problems["img/odd.png"] == "its mask seg/small.png is [10, 10], the image [28, 28]"
    assert "holds label 7, beyond data.files.classes (2 names" in problems["img/case1.png"]
    assert problems["seg/gone.png"].startswith("mask listed in manifest.csv:")
    with np.load(decoded.cache) as npz:
        assert npz["train_images"].shape == (130, 32, 32) and npz["train_labels"].shape == (130, 32, 32)
        assert npz["test_labels"].shape == (30, 32, 32) and set(np.unique(npz["train_labels"])) == {0, 1}
        # PNG masks of 0/255 and NIfTI masks of 0/1 mean the same: lesion = 1, on the lesion's pixels.
        lesion = npz["train_images"][npz["train_labels"] == 1].mean()
        assert lesion > npz["train_images"][npz["train_labels"] == 0].mean() + 40


def test_2d_segmentation_from_mask_files_federated(mask_files, tmp_path):
    site = {"root": str(mask_files), "manifest": str(mask_files / "manifest.csv"), "image_size": 32, "classes": ["background", "lesion"],
            "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match="model.name=cnn does not fit the segmentation task"):
        prepare_run(load_config(None, {"data.files": site, "server.output_dir": str(tmp_path / "no")}))
    cfg = load_config(None, {**SEGMENTATION, "data.files": site, "sites": 2, "server.rounds": 3, "train.batch_size": 16,
                             "server.output_dir": str(tmp_path / "out")})
    run_dir = simulate(cfg)
    final = [r for r in _rows(run_dir) if r["site"] == "global"][-1]
    assert float(final["test_dice"]) > 0.7, final
    dist = json.loads((run_dir / "data_distribution.json").read_text())
    assert all(len(d["train"]) == 2 and d["train"][0] > 0 for d in dist.values()), "images per mask label, per site"


def test_segmentation_config_errors(tmp_path):
    out = {"server.output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="model.name=unet does not fit the classification task"):
        prepare_run(load_config(None, {"model.name": "unet", **out}))
    with pytest.raises(ConfigError, match="must be a multiple of 8"):
        prepare_run(load_config(None, {**SEGMENTATION, "data.image_size": 36, **out}))
    with pytest.raises(ConfigError, match="train.augment.flip: flips and rotations are for 2D classification"):
        prepare_run(load_config(None, {**SEGMENTATION, "train.augment.flip": True, **out}))
    assert not any(tmp_path.iterdir())


def test_deployed_site_trains_on_its_masks_and_refuses_another_task(mask_files, tmp_path):
    """A hospital daemon's app reading site.yaml: a segmentation task trains on its mask files and
    replies with Dice; a classification task gets an error naming the mismatch (and no file)."""
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.training.app import app as client_app
    from client.config import TrainConfig
    from protocol.messages import TaskSpec
    from client.training.site import SITE_CONFIG_KEY
    from medimaging.config import ModelConfig
    from medimaging.models import build_model

    site = tmp_path / "site.yaml"
    site.write_text(f"site: hue-central\ndata:\n  root: {mask_files}\n  manifest: {mask_files / 'manifest.csv'}\n"
                    f"  classes: [background, lesion]\n  image_size: 32\n  cache_dir: {tmp_path / 'cache'}\n")
    ctx = Context(run_id=1, node_id=1, node_config={SITE_CONFIG_KEY: str(site)}, state=RecordDict(), run_config={})
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as a SuperNode's app process has

    def ask(kind, name, message_type):
        task = TaskSpec(run="r", server_round=1, total_rounds=1, seed=0, model=ModelConfig(name=name), train=TrainConfig(local_epochs=1),
                        in_channels=1, num_classes=2, image_size=32, task=kind)
        arrays = ArrayRecord(build_model(ModelConfig(name=name), 1, 2, 32).state_dict())
        msg = Message(RecordDict({"arrays": arrays, "config": task.to_config()}), dst_node_id=1, message_type=message_type)
        return client_app(msg, ctx)

    trained = ask("segmentation", "unet", "train")
    assert not trained.has_error() and set(trained.content.array_records) == {"arrays"}
    validated = ask("segmentation", "unet", "evaluate")
    metrics = validated.content.metric_records["metrics"]
    assert 0 <= metrics["val-dice"] <= 1 and metrics["num-examples"] == 26
    wrong = ask("classification", "cnn", "train")
    assert wrong.has_error()
    assert "this hospital's data are for 2D segmentation, the run is 2D classification" in wrong.error.reason
    assert "case" not in wrong.error.reason and str(mask_files) not in wrong.error.reason
