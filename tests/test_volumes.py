"""3D classification of volumes (CT/MRI): synthetic volumes federated with MONAI's 3D networks,
volumes on disk as NIfTI files and as folders of DICOM slices, and the problems they can have."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from aseanfl.cli import app
from medimaging.config import FilesConfig, ModelConfig
from medimaging.files import decode
from medimaging.pixels import read_pixels
from medimaging.models import build_model
from medimaging.synthetic import generate_volumes, site_profile, synthetic_dicom
from simulations.config import load_config
from conftest import simulate_here as simulate  # the round loop without Ray's start

PATIENT = {"PatientName": "Tran^Van Minh", "PatientID": "HCM-3318-0027", "InstitutionName": "Cho Ray Hospital"}


def test_federated_3d_classification_beats_chance(tmp_path):
    """Also server.select_by: loss, the model_best that suits few validation volumes a hospital."""
    from safetensors import safe_open

    cfg = load_config(None, {"data.synthetic.spatial_dims": 3, "data.synthetic.samples_per_site": 160,
                             "data.synthetic.test_per_site": 40, "sites": 3, "server.rounds": 4,
                             "server.select_by": "loss", "server.output_dir": str(tmp_path)})
    run_dir = simulate(cfg)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["test_auc"]) > 0.75, final  # measured 0.799 (0.604 untrained)
    assert {r["site"] for r in rows if r["round"] == "4" and r["status"] == "ok"} == {"nanning", "hanoi", "bangkok"}

    trained = [r for r in rows if r["site"] == "global" and r["round"] != "0"]
    lowest = min(trained, key=lambda r: float(r["val_loss"]))["round"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["select_by"] == "loss" and str(summary["best_round"]) == lowest
    with safe_open(str(run_dir / "model_best.safetensors"), "pt") as f:
        assert f.metadata() == {"round": lowest, "selected_by": "federated val_loss"}
    assert f"best round by federated validation loss: {lowest}" in (run_dir / "report.md").read_text()


def test_the_best_round_is_picked_by_the_configured_figure():
    """round_score: higher is better; by loss the lowest loss wins even where the AUC says
    otherwise; a round whose validation gave no AUC falls back on its loss."""
    from server.engine.updates import best_key, round_score

    noisy_auc = {"val_auc": 0.90, "val_loss": 0.60}  # a lucky AUC on 20 volumes a hospital
    pooled_fit = {"val_auc": 0.85, "val_loss": 0.45}
    by_auc, by_loss = best_key("score", "classification"), best_key("loss", "classification")
    assert (by_auc, by_loss, best_key("score", "segmentation")) == ("val_auc", "val_loss", "val_dice")
    assert round_score(noisy_auc, by_auc) > round_score(pooled_fit, by_auc)
    assert round_score(pooled_fit, by_loss) > round_score(noisy_auc, by_loss)
    assert round_score({"val_auc": float("nan"), "val_loss": 0.5}, by_auc) == -0.5
    assert round_score({"val_auc": None, "val_loss": None}, by_loss) == float("-inf")


@pytest.mark.parametrize("name", ["cnn", "smallresnet", "resnet18", "densenet121"])
def test_3d_networks_take_volumes(name):
    import torch

    model = build_model(ModelConfig(name=name), in_channels=1, num_classes=3, image_size=32, spatial_dims=3)
    assert model(torch.randn(2, 1, 32, 32, 32)).shape == (2, 3)


def _series(folder, volume, shuffle_names=True):
    """One DICOM file per slice; file names in a different order than the slices' positions."""
    order = np.random.default_rng(1).permutation(len(volume)) if shuffle_names else np.arange(len(volume))
    for k, z in enumerate(order):
        synthetic_dicom(folder / f"IM{k:04d}", volume[z], {**PATIENT, "ImagePositionPatient": [0, 0, 2.5 * z],
                                                            "SliceThickness": 2.5, "InstanceNumber": str(z + 1)})


@pytest.fixture
def volumes(tmp_path):
    """Per class: NIfTI volumes and DICOM series; plus a 2D PNG, a series with a corrupt slice
    and one whose slices differ in size."""
    root = tmp_path / "ct"
    rng = np.random.default_rng(0)
    for label, cls in enumerate(("normal", "nodule")):
        images, _ = generate_volumes(12, site_profile(0), rng)
        (root / cls).mkdir(parents=True)
        for i, vol in enumerate((images[:, 0] * 255).astype(np.uint8)):
            if i % 3 == 0:
                _series(root / cls / f"series{i}", vol)
            else:
                nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.8, 0.8, 2.0, 1])), root / cls / f"v{i}.nii.gz")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "normal" / "scout.png")
    broken = root / "nodule" / "broken"
    _series(broken, np.zeros((4, 18, 18), np.uint8), shuffle_names=False)
    (broken / "IM0002").write_bytes(b"DICM" * 10)
    odd = root / "nodule" / "odd"
    _series(odd, np.zeros((3, 18, 18), np.uint8), shuffle_names=False)
    synthetic_dicom(odd / "IM0009", np.zeros((12, 12), np.uint8), PATIENT)
    return root


def test_dicom_series_is_stacked_in_scan_order(tmp_path):
    volume = np.stack([np.full((16, 16), 10 * z, np.uint8) for z in range(6)])
    _series(tmp_path / "s", volume)
    arr, spacing = read_pixels(tmp_path / "s", spatial_dims=3)
    assert arr.shape == (6, 16, 16) and spacing == (0.7, 0.7, 2.5)
    assert [int(arr[z, 0, 0]) for z in range(6)] == [160 * z for z in range(6)], "12-bit values, position order"
    with pytest.raises(ValueError, match="set data.files.spatial_dims: 3"):
        read_pixels(tmp_path / "s")


def test_volume_files_decode_and_check_data_lists_problems(volumes, tmp_path):
    cfg = FilesConfig(root=volumes, spatial_dims=3, image_size=16, cache_dir=tmp_path / "cache")
    decoded = decode(cfg)
    problems = {p.file: p.reason for p in decoded.inventory.problems}
    assert problems["normal/scout.png"].startswith("2D image of shape [20, 20]: this task reads volumes")
    assert problems["nodule/broken"].startswith("slice IM0002: not a DICOM file")
    assert problems["nodule/odd"].startswith("slices of different sizes")
    assert len(decoded.shapes) == 24 and decoded.shapes["normal/series0"] == (24, 24, 24)
    with np.load(decoded.cache) as npz:
        n = len(npz["train_images"]) + len(npz["test_images"])
        assert n == 24 and npz["train_images"].shape[1:] == (16, 16, 16)

    site = tmp_path / "site.yaml"
    site.write_text(f"site: cho-ray\ndata:\n  root: {volumes}\n  spatial_dims: 3\n  image_size: 24\n"
                    f"  cache_dir: {tmp_path / 'cache'}\n")
    result = CliRunner().invoke(app, ["client", "check-data", "--config", str(site)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "cho-ray: 24 usable images, 3 problems" in result.output and "24x24x24 (24)" in result.output
    assert "Tran" not in result.output and "HCM-3318" not in result.output


def test_volume_files_train_a_3d_network(volumes, tmp_path):
    """The decoded volumes as a simulated hospital gets them, trained for real with a 3D cnn (the
    federated 3D path runs in test_federated_3d_classification_beats_chance)."""
    from medimaging.training import evaluate, train_epochs
    from simulations.federation import resolved, site_data, task_shape

    data = {"root": str(volumes), "spatial_dims": 3, "image_size": 24, "cache_dir": str(tmp_path / "cache")}
    cfg = resolved(load_config(None, {"data.files": data, "sites": 2, "server.output_dir": str(tmp_path / "out")}))
    shape = task_shape(cfg)
    assert (shape.spatial_dims, shape.image_size, shape.num_classes, shape.task) == (3, 24, 2, "classification")
    site = site_data(cfg, 0, shape.image_size)
    assert site.train.x.shape[1:] == (1, 24, 24, 24) and len(site.train) + len(site.val) > 6
    model = shape.model(cfg)
    loss, steps = train_epochs(model, site.train, 2, 4, 1e-3, "adam", seed=0)
    assert steps >= 4 and loss == loss
    assert 0 <= evaluate(model, site.val, 2)["accuracy"] <= 1


ADRENAL = Path(__file__).parent / "data" / "adrenalmnist3d.npz"  # MedMNIST v2 AdrenalMNIST3D, CC BY 4.0 (data/README.md)


def test_medmnist3d_run_says_it_is_3d_and_uses_the_npz_validation_split(tmp_path):
    """A real 3D MedMNIST file: the start line, config.yaml and report.md say 3D; hospitals
    validate on their share of the npz's own val split (so every figure is on the published
    splits); the wall time counts set-up; the benchmarks' centralized twin takes volumes."""
    from aseanfl.cli import _data_line
    from benchmarks.common import centralized, fresh_model

    arrays = np.load(ADRENAL)
    assert arrays["train_images"].shape == (1188, 28, 28, 28) and arrays["val_images"].shape == (98, 28, 28, 28)
    assert arrays["train_images"].std() > 10, "real volumes, not blank"
    cfg = load_config(None, {"data.path": str(ADRENAL), "sites": 3, "server.rounds": 1,
                             "server.output_dir": str(tmp_path)})
    assert "3D volumes 28x28x28, 2 classes" in _data_line(cfg.data)
    run_dir = simulate(cfg)
    config_text = (run_dir / "config.yaml").read_text()
    assert config_text.startswith("# Data: 3D volumes of 28x28x28 voxels") and "synthetic" not in config_text
    assert "Data: 3D volumes of 28x28x28 voxels" in (run_dir / "report.md").read_text()
    dist = json.loads((run_dir / "data_distribution.json").read_text())
    assert sum(sum(d["val"]) for d in dist.values()) == 98, "the npz's val split, shared out"
    assert sum(sum(d["train"]) for d in dist.values()) == 1188, "every training volume trains"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["spatial_dims"] == 3 and summary["setup_seconds"] > 0
    assert summary["seconds"] >= summary["setup_seconds"] + sum(summary["round_seconds"]) - 0.5, summary
    assert "set-up" in (run_dir / "report.md").read_text()
    model = fresh_model(cfg)  # crashed on 3D ("size mismatch ... [16, 1, 3, 3, 3]")
    assert next(model.parameters()).ndim == 5
    scores, _ = centralized(cfg, 0)  # the pooled 3D path end to end, without an epoch's training
    assert 0 < scores["auc"] <= 1


def test_fl_vs_central_takes_model_and_alpha():
    from benchmarks.fl_vs_central import config_for, parser

    args = parser().parse_args(["--data", str(ADRENAL), "--model", "smallresnet", "--scheme", "dirichlet",
                                "--alpha", "0.5", "--sites", "4"])
    cfg = config_for(args, 3, "fedavg", 1, "/tmp/unused")
    assert (cfg.model.name, cfg.partition.scheme, cfg.partition.alpha, len(cfg.sites)) == ("smallresnet", "dirichlet", 0.5, 4)
