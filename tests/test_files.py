"""Hospital exports on disk: DICOM (written with pydicom, plus pydicom's own sample files), NIfTI
(nibabel), PNG, with corrupt, truncated and mislabelled files. Every problem is reported with
the file and the reason; a federation trains on DICOM files and no header value leaves."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from aseanfl.cli import app
from conftest import run_plan_here
from medimaging.config import FilesConfig
from medimaging.files import decode
from medimaging.pixels import read_pixels
from medimaging.synthetic import site_images, synthetic_dicom
from inprocess import Wire
from simulations.config import ConfigError, load_config
from simulations.runner import prepare_run, simulate

PATIENT = {"PatientName": "Nguyen^Thi Lan", "PatientID": "HN-0042-7781", "InstitutionName": "Benh vien Bach Mai",
           "StudyDate": "20260314"}


def write_dicom(path, pixels, spacing=(0.7, 0.7)):
    synthetic_dicom(path, pixels, PATIENT, spacing)


@pytest.fixture
def mixed(tmp_path):
    """Two classes in every format, and one of each kind of bad file."""
    root = tmp_path / "export"
    rng = np.random.default_rng(0)
    for cls in ("normal", "pneumonia"):
        for i in range(3):
            img = rng.integers(0, 255, (40, 36), dtype=np.uint8)
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / cls / f"p{i}.png")
            write_dicom(root / cls / f"d{i}.dcm", img)
            nib.save(nib.Nifti1Image(img.astype(np.float32), np.diag([0.8, 0.8, 1, 1])), root / cls / f"n{i}.nii.gz")
    (root / "normal" / "scan.dcm").write_text("this is not a DICOM file")
    good = (root / "normal" / "p0.png").read_bytes()
    (root / "pneumonia" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated transfer
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), root / "pneumonia" / "volume.nii.gz")
    (root / "stray.png").write_bytes(good)  # not in a class folder
    return root


def test_check_data_lists_counts_and_every_unusable_file(mixed, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(f"site: bach-mai\ndata:\n  root: {mixed}\n")
    result = CliRunner().invoke(app, ["client", "check-data", "--config", str(site)], env={"COLUMNS": "200"})
    out = result.output
    assert result.exit_code == 0, out
    assert "bach-mai: 18 usable images, 4 problems" in out
    for name, reason in [("normal/scan.dcm", "not a DICOM file"), ("pneumonia/cut.png", "cannot decode as png"),
                         ("pneumonia/volume.nii.gz", "3D image of shape [8, 8, 8]"), ("stray.png", "not inside a class folder")]:
        assert name in out and reason in out, (name, out)
    assert "40x36 (18)" in out and "pixel spacing (mm): 0.7 to 0.8" in out
    assert not (mixed.parent / ".aseanfl-cache").exists()  # checking writes nothing
    guide = (Path(__file__).parents[1] / "docs" / "hospital.md").read_text()
    shown = guide.split("$ aseanfl client check-data --config site.yaml")[1].split("```")[0].splitlines()[1:]
    assert shown == out.strip().splitlines(), "docs/hospital.md shows check-data's output as it is"


def test_manifest_problems_and_splits(mixed, tmp_path):
    manifest = tmp_path / "labels.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([["normal/p0.png", "normal", "train"], ["pneumonia/p0.png", "pneumonia", "test"],
                     ["normal/p1.png", "effusion", "train"], ["normal/gone.png", "normal", "train"],
                     ["normal/p2.png", "normal", "holdout"]])
    cfg = FilesConfig(root=mixed, manifest=manifest, classes=["normal", "pneumonia"], cache_dir=tmp_path / "cache")
    decoded = decode(cfg)
    reasons = {p.file: p.reason for p in decoded.inventory.problems}
    assert "unknown class 'effusion'" in reasons["normal/p1.png"]
    assert "missing" in reasons["normal/gone.png"]
    assert "split 'holdout'" in reasons["labels.csv:6"]
    with np.load(decoded.cache) as npz:
        assert npz["train_labels"].ravel().tolist() == [0] and npz["test_labels"].ravel().tolist() == [1]


def test_cache_is_reused_and_invalidated_by_a_changed_file(mixed, tmp_path):
    cfg = FilesConfig(root=mixed, cache_dir=tmp_path / "cache")
    first = decode(cfg)
    stamp = first.cache.stat().st_mtime_ns
    again = decode(cfg)
    assert again.cache == first.cache and again.cache.stat().st_mtime_ns == stamp
    assert {p.file for p in again.inventory.problems} == {p.file for p in first.inventory.problems}
    Image.fromarray(np.zeros((40, 36), np.uint8)).save(mixed / "normal" / "p1.png")
    assert decode(cfg).cache != first.cache


def test_pydicom_sample_files_give_pixels_only():
    for name in ("CT_small.dcm", "MR_small.dcm"):
        pixels, spacing = read_pixels(get_testdata_file(name))
        assert pixels.ndim == 2 and pixels.dtype == np.float32 and spacing is not None
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert np.allclose(read_pixels(get_testdata_file("CT_small.dcm"))[0],
                       ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


def test_no_usable_images_is_a_clear_config_error(tmp_path):
    root = tmp_path / "empty"
    (root / "normal").mkdir(parents=True)
    (root / "normal" / "x.dcm").write_text("garbage")
    with pytest.raises(ConfigError, match="0 usable images at .*: no usable images"):
        simulate(load_config(None, {"data.files.root": str(root), "server.output_dir": str(tmp_path / "runs")}))


def test_federation_on_dicom_files_learns_and_no_header_leaves(tmp_path):
    root = tmp_path / "pacs"
    n = 0
    for site in range(3):
        (x, y), _ = site_images(site, 7, 120, 10)
        for img, label in zip(x, y, strict=True):
            pixels = np.round(img[0] * 255).astype(np.uint16)
            write_dicom(root / ("lesion" if label else "clear") / f"IMG{n:05d}", pixels)  # PACS style: no suffix
            n += 1
    wire = Wire()
    cfg = load_config(None, {"data.files.root": str(root), "data.files.image_size": 32,
                             "data.files.cache_dir": str(tmp_path / "cache"), "sites": 3, "server.rounds": 3,
                             "server.output_dir": str(tmp_path / "runs")})
    run_dir = run_plan_here(prepare_run(cfg, wire))
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert float([r for r in rows if r["site"] == "global"][-1]["test_auc"]) > 0.6
    assert wire.blobs
    secrets = [v.encode() for v in PATIENT.values()] + [b"Nguyen", b"HN-0042", b"IMG0", str(root).encode()]
    assert not [s for s in secrets for blob in wire.blobs if s in blob]


def test_bad_site_yaml_names_each_field(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("site: Bach Mai\ndata: {root: /nope, colour: red}\n")
    result = CliRunner().invoke(app, ["client", "check-data", "--config", str(site)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "config error: site: String should match pattern" in result.output
    assert "config error: data.colour: unknown field" in result.output


def test_deployed_site_without_usable_images_replies_with_a_clear_error_naming_no_file(tmp_path):
    """The pre-round check at a deployed hospital: the ClientApp (through its error mod, as a
    SuperNode runs it) answers with an error that says what is wrong and names no file."""
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.training.app import app as client_app
    from protocol.messages import TaskSpec
    from client.training.site import SITE_CONFIG_KEY
    from medimaging.config import ModelConfig
    from client.config import TrainConfig
    from medimaging.models import build_model

    root = tmp_path / "export" / "only-class"
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "secret-patient-name.png")
    (root / "broken-scan.png").write_bytes(b"not a png")
    site = tmp_path / "site.yaml"
    site.write_text(f"site: hue-central\ndata:\n  root: {tmp_path / 'export'}\n  image_size: 32\n")
    task = TaskSpec(run="r", server_round=1, total_rounds=1, seed=0, private=False, client_clipping="none", fedbn=False,
                    finetune_eval=False, model=ModelConfig(), train=TrainConfig(), in_channels=1, num_classes=2,
                    image_size=32)
    arrays = ArrayRecord(build_model(ModelConfig(), 1, 2, 32).state_dict())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as a SuperNode's app process has
    msg = Message(RecordDict({"arrays": arrays, "config": task.to_config()}), dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={SITE_CONFIG_KEY: str(site)}, state=RecordDict(), run_config={})
    reply = client_app(msg, ctx)
    assert reply.has_error()
    reason = reply.error.reason
    assert "fewer than two classes with usable images" in reason and "check-data" in reason
    assert "secret-patient-name" not in reason and "broken-scan" not in reason and str(tmp_path) not in reason


def test_multilabel_manifest_trains_one_sigmoid_per_finding(tmp_path):
    """Findings joined by '|' in the manifest ('none' = no finding); an unknown finding is named."""
    from medimaging.synthetic import multilabel_npz

    with np.load(multilabel_npz(tmp_path / "ml.npz", samples=400, test=100)) as npz:
        images = np.concatenate([npz["train_images"], npz["test_images"]])
        labels = np.concatenate([npz["train_labels"], npz["test_labels"]])
    root = tmp_path / "cxr"
    root.mkdir()
    lines = ["path,label,split"]
    for i, (img, (nodule, line)) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / f"x{i}.png")
        cell = "|".join(name for name, on in (("nodule", nodule), ("catheter", line)) if on) or "none"
        lines.append(f"x{i}.png,{cell},{'test' if i >= 400 else ''}")
    lines.append("x0.png,nodule|edema,")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    data = {"root": str(root), "manifest": str(root / "labels.csv"), "multilabel": True, "image_size": 32,
            "classes": ["catheter", "nodule"],
            "cache_dir": str(tmp_path / "cache")}
    decoded = decode(FilesConfig.model_validate(data))
    assert decoded.inventory.classes == ["catheter", "nodule"]
    assert [(p.file, p.reason) for p in decoded.inventory.problems] == [("x0.png", "unknown finding 'edema' (findings: catheter, nodule)")]
    with np.load(decoded.cache) as npz:
        assert npz["train_labels"].shape == (400, 2) and npz["test_labels"].shape == (100, 2)
        assert (npz["train_labels"][:, 1] == labels[:400, 0]).all(), "finding columns in the classes' order"
    # A hospital's share as the simulation gives it, trained for real (federated multi-label
    # training of the same npz layout: test_simulate.py::test_multilabel_npz_end_to_end).
    from medimaging.training import evaluate, train_epochs
    from simulations.federation import global_test, resolved, site_data, task_shape

    cfg = resolved(load_config(None, {"data.files": data, "sites": 2, "server.output_dir": str(tmp_path / "out")}))
    shape = task_shape(cfg)
    site = site_data(cfg, 0, shape.image_size)
    assert shape.num_classes == 2 and site.train.multilabel and site.train.y.dtype == torch.float32
    torch.manual_seed(0)  # the start model does not depend on the tests that ran before
    model = shape.model(cfg)
    train_epochs(model, site.train, 8, 32, 1e-3, "adam", seed=0)
    scores = evaluate(model, global_test(cfg), shape.num_classes)
    assert scores["auc"] > 0.7 and len(scores["auc_per_class"]) == 2, scores
    with pytest.raises(ValueError, match="multilabel needs a manifest"):
        decode(FilesConfig(root=root, multilabel=True, cache_dir=tmp_path / "cache"))
