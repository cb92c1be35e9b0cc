"""A MONAI bundle as the task (`aseanfl simulate --bundle`, federation.yaml's `task.bundle`):
bundles made here with monai.bundle.init_bundle, trained on pneumoniamnist (classification)
and synthetic lesion masks (segmentation); every layout aseanfl refuses is one line naming the
bundle's file and field; a task whose network is not plain MONAI data is refused at hospitals."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import init_bundle
from monai.bundle.scripts import DEFAULT_INFERENCE, DEFAULT_METADATA
from pydantic import ValidationError
from typer.testing import CliRunner

from aseanfl.cli import app
from medimaging.bundles import BundleError, build_network, read_bundle
from medimaging.config import NetworkSpec
from medimaging.weights import file_sha256
from protocol.messages import TaskSpec
from server.engine.deployment import check_run_config
from server.engine.plan import TaskShape
from server.engine.updates import check_start, initial_arrays
from simulations.config import ConfigError, load_config
from simulations.federation import task_shape

from conftest import medmnist_file, simulate_here

CLASSIFIER = {"_target_": "monai.networks.nets.Classifier", "in_shape": [1, 28, 28], "classes": 2,
              "channels": [16, 32, 64], "strides": [2, 2, 2], "num_res_units": 0, "dropout": 0.1}
UNET = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": "@num_labels",
        "channels": [16, 32, 64], "strides": [2, 2], "num_res_units": 1, "norm": "batch"}


def _io(kind: str, shape: list, out_channels: int = 2) -> dict:
    image = {"type": "image", "format": "magnitude", "num_channels": 1, "spatial_shape": shape, "dtype": "float32",
             "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "image"}}
    pred = {"type": "probabilities" if kind == "classification" else "image", "format": kind,
            "num_channels": out_channels, "spatial_shape": [1, out_channels] if kind == "classification" else shape,
            "dtype": "float32", "value_range": [0, 1], "channel_def": {"0": "normal", "1": "finding"}}
    return {"inputs": {"image": image}, "outputs": {"pred": pred}}


def make_bundle(folder, network: dict, io: dict, weights: bool = True, extra: dict | None = None):
    """A bundle as MONAI's own init_bundle lays it out (its default inference.json, with `$` code
    around the network_def, as the Model Zoo's have); weights from the network, seeded."""
    inference = {**copy.deepcopy(DEFAULT_INFERENCE), "num_labels": 2, "network_def": network, **(extra or {})}
    metadata = {**copy.deepcopy(DEFAULT_METADATA), "name": folder.name, "network_data_format": io}
    torch.manual_seed(3)
    net = build_network(NetworkSpec(target=network["_target_"].split(".")[-1],
                                    args={k: (2 if v == "@num_labels" else v) for k, v in network.items()
                                          if k != "_target_"})) if weights else None
    init_bundle(folder, network=net, metadata_str=metadata, inference_str=inference)
    if not weights:
        (folder / "models" / "model.pt").unlink(missing_ok=True)
    return folder, net


@pytest.fixture(scope="module")
def cxr_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "cxr_demo", CLASSIFIER, _io("classification", [28, 28]))


def test_a_classification_bundle_is_the_task_of_a_federation(cxr_bundle, tmp_path):
    folder, trained = Path(shutil.copytree(cxr_bundle[0], tmp_path / "cxr_demo")), cxr_bundle[1]
    data = medmnist_file("pneumoniamnist")
    cfg = load_config(None, {"bundle": str(folder), "data.path": str(data), "sites": 3, "server.rounds": 2,
                             "server.output_dir": str(tmp_path)})
    assert cfg.model.name == "monai" and cfg.model.network.target == "Classifier" and cfg.model.weights == folder
    shape = task_shape(cfg)
    assert (shape.in_channels, shape.num_classes, shape.image_size) == (1, 2, 28)
    start = initial_arrays(cfg, shape).to_torch_state_dict()  # the round-0 model is the bundle's weights
    assert all(torch.equal(start[k], v) for k, v in trained.state_dict().items())
    run_dir = simulate_here(cfg)
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["bundle"] == str(folder) and written["model"]["network"]["args"]["in_shape"] == [1, 28, 28]
    assert written["model"]["weights_sha256"] == file_sha256(folder / "models" / "model.pt")
    report = (run_dir / "report.md").read_text()
    assert f"The task came from the MONAI bundle {folder}: network Classifier" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["test_auc"] > 0.85, summary  # pneumonia vs normal: well above chance (0.5)
    shutil.rmtree(folder)  # the run's own config.yaml is read as its model card without the bundle
    result = CliRunner().invoke(app, ["export", str(run_dir / "model.safetensors"), "--bundle", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert read_bundle(tmp_path / "out").network == cfg.model.network  # the trained model, a bundle again


def test_a_segmentation_bundle_with_any_multiple_of_16_trains_on_masks(tmp_path):
    folder, _ = make_bundle(tmp_path / "lesion_seg", UNET, _io("segmentation", ["16*n", "16*n"]))
    bundle = read_bundle(folder)
    assert (bundle.side, bundle.multiple, bundle.network.args["out_channels"]) == (None, 16, 2)  # @ followed
    cfg = load_config(None, {"bundle": str(folder), "data.synthetic.task": "segmentation", "sites": 2,
                             "data.synthetic.samples_per_site": 60, "server.rounds": 3, "train.lr": 0.01,
                             "server.output_dir": str(tmp_path / "runs")})
    assert task_shape(cfg).image_size == 32  # the synthetic 32 px, already a multiple of 16
    run_dir = simulate_here(cfg)
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final["test_dice"] > 0.5, final  # an untrained UNet marks nothing (Dice ~0)
    private = TaskShape(1, 2, 32, "segmentation").model(cfg, private=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in private.modules())  # DP-SGD: BatchNorm replaced
    assert check_start(cfg, TaskShape(1, 2, 32, "segmentation"), private=True) is not None  # statistics dropped


def _bad(tmp_path, name, network=CLASSIFIER, io=None, **kw):
    return make_bundle(tmp_path / name, network, io or _io("classification", [28, 28]), **kw)[0]


REFUSED = {
    "code": (dict(network={**CLASSIFIER, "dropout": "$float(__import__('os').getpid() > 0)"}, weights=False),
             "network_def.dropout: .\\$float.*is MONAI config code"),
    "own network": (dict(network={**CLASSIFIER, "_target_": "scripts.net.MyNet"}, weights=False),
                    "_target_ 'scripts.net.MyNet' is not a MONAI network aseanfl builds"),
    "logic": (dict(network={**CLASSIFIER, "_requires_": "$print(1)"}, weights=False), "_requires_ is MONAI config logic"),
    "download": (dict(network={"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                               "pretrained": True}, weights=False), "network_def.pretrained: not allowed"),
    "detection": (dict(io=_io("detection", [28, 28])), "outputs format 'detection': aseanfl trains classification"),
    "one output": (dict(io=_io("classification", [28, 28], out_channels=1)), "outputs num_channels 1"),
    "not square": (dict(io=_io("classification", [28, 32])), "is not square"),
    "segmentation of a classifier": (dict(io=_io("segmentation", [32, 32])), "but network_def's Classifier is a "
                                                                               "classification network"),
    "three outputs": (dict(network={**CLASSIFIER, "classes": 3}), "gives \\[3\\] for one image, metadata.json's "
                                                                  "outputs say \\[2\\]"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_each_bundle_aseanfl_cannot_take_is_one_line(tmp_path, case):
    kw, message = REFUSED[case]
    folder = _bad(tmp_path, "b", **kw)
    with pytest.raises(ConfigError, match=message) as caught:
        task_shape(load_config(None, {"bundle": str(folder), "data.path": str(medmnist_file("pneumoniamnist"))}))
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)


def test_torchscript_only_no_metadata_and_the_wrong_data_are_one_line(tmp_path, cxr_bundle):
    folder = _bad(tmp_path, "ts", weights=False)
    (folder / "models" / "model.ts").write_bytes(b"PK\x03\x04")
    with pytest.raises(BundleError, match="TorchScript only"):
        read_bundle(folder)
    (folder / "configs" / "metadata.json").unlink()
    with pytest.raises(BundleError, match="no configs/metadata.json"):
        read_bundle(folder)
    chest = medmnist_file("breastmnist")
    with pytest.raises(ConfigError, match="its spatial dims is 2, the synthetic data has 3"):
        task_shape(load_config(None, {"bundle": str(cxr_bundle[0]), "data.synthetic.spatial_dims": 3}))
    cfg = load_config(None, {"bundle": str(cxr_bundle[0]), "data.path": str(chest), "data.image_size": 32})
    with pytest.raises(ConfigError, match="data.image_size: 32, but bundle .* takes images of 28 a side"):
        task_shape(cfg)
    with pytest.raises(ConfigError, match="model.name=unet: bundle gives the network; leave model.name out"):
        load_config(None, {"bundle": str(cxr_bundle[0]), "model.name": "unet"})


def test_aseanfl_simulate_refuses_a_bad_bundle_with_one_line_and_no_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _bad(tmp_path, "lung_bundle", network={**CLASSIFIER, "_target_": "scripts.net.LungNet"}, weights=False)
    result = CliRunner().invoke(app, ["simulate", "--bundle", "lung_bundle", "--out", "runs"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: bundle ") and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing written
    assert lines[0] in (Path(__file__).parents[1] / "docs" / "researcher.md").read_text()  # the guide shows it


def test_task_bundle_in_federation_yaml_sets_the_task_and_the_model(cxr_bundle):
    folder, _ = cxr_bundle
    cfg = check_run_config(f"task:\n  bundle: {folder}\n", [])
    t = cfg.task
    assert (t.in_channels, t.num_classes, t.image_size, t.kind, t.spatial_dims) == (1, 2, 28, "classification", 2)
    assert cfg.model.name == "monai" and cfg.model.weights_sha256 == file_sha256(folder / "models" / "model.pt")
    for text, message in ((f"task:\n  bundle: {folder}\n  num_classes: 3\n", "task.num_classes: 3, but bundle"),
                          (f"task:\n  bundle: {folder}\nmodel:\n  name: cnn\n", "leave model.name out")):
        with pytest.raises(ConfigError, match=message):
            check_run_config(text, [])
    spec = TaskSpec(run="r", server_round=1, total_rounds=1, seed=0, model=cfg.model, train=cfg.train, in_channels=1,
                    num_classes=2, image_size=28)
    shipped = json.loads(spec.model_dump_json())  # what a hospital reads: the arguments, no path into the bundle
    assert shipped["model"]["network"] == {"target": "Classifier", "args": {k: v for k, v in CLASSIFIER.items()
                                                                           if k != "_target_"}}


@pytest.mark.parametrize("network", [
    {"target": "Classifier", "args": {"in_shape": [1, 28, 28], "classes": "$__import__('os').system('id')"}},
    {"target": "Classifier", "args": {"in_shape": [1, 28, 28], "act": {"_target_": "torch.nn.ReLU"}}},
    {"target": "os.system", "args": {}},
])
def test_a_hospital_refuses_a_task_whose_network_is_code(cxr_bundle, network):
    """A coordinator (or someone in its place) that writes the task by hand: the hospital's
    TaskSpec check refuses it before any network is built."""
    cfg = check_run_config(f"task:\n  bundle: {cxr_bundle[0]}\n", [])
    task = json.loads(TaskSpec(run="r", server_round=1, total_rounds=1, seed=0, model=cfg.model, train=cfg.train,
                               in_channels=1, num_classes=2, image_size=28).model_dump_json())
    task["model"]["network"] = network
    with pytest.raises(ValidationError):
        TaskSpec.model_validate(task)


ZOO = Path(__file__).parent / "data" / "monai_zoo"


def test_the_model_zoos_own_layouts_are_read_past_their_code():
    """Two bundles' configs as the MONAI Model Zoo ships them (tests/data/monai_zoo: `$` code,
    transforms, an evaluator around the network_def; 'classes' as a classifier's output format)."""
    spleen = check_run_config(f"task:\n  bundle: {ZOO / 'spleen_ct_segmentation'}\n", [])  # its UNet run on 96^3
    t = spleen.task
    assert (t.kind, t.spatial_dims, t.image_size, t.in_channels, t.num_classes) == ("segmentation", 3, 96, 1, 2)
    assert spleen.model.network.args["channels"] == [16, 32, 64, 128, 256] and spleen.model.weights is None
    spleen_bundle = read_bundle(ZOO / "spleen_ct_segmentation")
    assert spleen_bundle.labels == ("background", "spleen") and "trained on patches" in spleen_bundle.line()
    endoscopy = read_bundle(ZOO / "endoscopic_inbody_classification")
    assert (endoscopy.kind, endoscopy.in_channels, endoscopy.side, endoscopy.network.target) == \
        ("classification", 3, 256, "SEResNet50")
    cfg = load_config(None, {"bundle": str(endoscopy.path), "data.path": str(medmnist_file("pneumoniamnist"))})
    with pytest.raises(ConfigError, match="its input channels is 3, pneumoniamnist.npz has 1"):
        task_shape(cfg)
