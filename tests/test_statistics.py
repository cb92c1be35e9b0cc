"""Federated statistics (`aseanfl stats`) and one set of class names: pooled figures equal the
central computation on the union, small cells are withheld, noise stays within its stated
scale, real DICOM CT (in Hounsfield units), PNG and NIfTI files are described, and hospitals
that name or order the classes differently are refused, naming the hospitals and the names,
through the real hospital ClientApp. (The deployed `aseanfl stats -f`, its audit log and the
class check before a deployed run are in tests/test_deployment.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from inprocess import Collect, InProcessGrid
from PIL import Image

from client.config import StatisticsSite
from client.training.app import app as deployed_app
from client.training.describe import statistics
from client.training.site import SITE_CONFIG_KEY, SiteDataError, _hospital
from medimaging.stats import HU_EDGES, PPM, image_hist, site_stats
from medimaging.yamlconfig import ConfigError
from protocol.messages import DescribeSpec
from server.engine.census import check_classes
from simulations.config import load_config
from simulations.local_deployment import BIN
from simulations.statistics import simulated_hospital

SPEC = DescribeSpec(request="test", image_size=32, min_count=1)


def _simulated(sites: int = 3, policy: StatisticsSite | None = None, key: Path | None = None):
    cfg = load_config(None, {"sites": sites, "data.synthetic.samples_per_site": 120})
    out = []
    for i in range(sites):
        h = simulated_hospital(cfg, i, 32, ["normal", "lesion"], policy or StatisticsSite(min_count=1))
        if key is not None:
            h.ledger_root = key
        out.append(h)
    return out


def _union(hospitals) -> dict:
    labels = {s: np.concatenate([getattr(h.data, "train" if s == "train" else "val").y.numpy() if s != "test" else
                                 h.test.y.numpy() for h in hospitals]) for s in ("train", "validation", "test")}
    meta = [m for h in hospitals for m in h.meta]
    return site_stats("classification", ["normal", "lesion"], labels, meta, min_count=1).model_dump()


def test_pooled_statistics_equal_a_central_computation_on_the_union(tmp_path):
    from server.records.statistics import write_statistics

    hospitals = _simulated()
    sites = {h.data.name: statistics(h, SPEC) for h in hospitals}
    for s in sites.values():  # real inputs: both classes at every hospital, images spread over several levels
        assert all(c.value > 0 for c in s.cases["train"]), s.cases
        assert sum(c.value > 0 for c in s.intensity["synthetic"].counts) >= 4
    result = write_statistics(tmp_path, sites, 1, "union")
    pooled, central = result["pooled"], _union(hospitals)
    for field in ("cases", "modality", "size", "intensity"):
        assert pooled[field] == central[field], field  # exactly: integer counts and millionths of an image
    assert sum(c["value"] for c in pooled["cases"]["train"]) == sum(len(h.data.train) for h in hospitals)
    assert sum(c["value"] for c in pooled["intensity"]["synthetic"]["counts"]) == PPM * sum(len(h.meta) for h in hospitals)
    text = (tmp_path / "stats.md").read_text()
    assert "| pooled | train |" in text and (tmp_path / "stats-classes.png").stat().st_size > 5000
    assert (tmp_path / "stats-geometry.png").stat().st_size > 5000 and "![stats-geometry.png]" in text
    from server.records.statistics import data_view

    view = data_view(tmp_path)  # the console's Data page: the same rows as stats.md, columns as headed
    assert all(f"| {' | '.join(row)} |" in text for row in view["cases"] + view["intensity"])
    for _site, _mod, _unit, median, p5, p95 in view["intensity"]:
        assert float(p5) <= float(median) <= float(p95), view["intensity"]


def test_small_cells_are_withheld_and_a_pooled_cell_is_then_a_lower_bound():
    from medimaging.stats import pool

    meta = [{"modality": "CT", "side": 512, "slices": None, "spacing": 0.7, "unit": "level",
             "hist": image_hist(np.full(16, 40 if i < 3 else 200), [float(v) for v in range(16, 256, 16)])}
            for i in range(30)]
    a = site_stats("classification", ["normal", "pneumonia"], {"train": np.array([0] * 27 + [1] * 3)}, meta,
                   min_count=5)
    assert a.cases["train"][0].value == 27 and a.cases["train"][1].value is None and "fewer than 5" in a.cases["train"][1].withheld
    bins = a.intensity["CT"].counts
    assert bins[2].value is None and bins[12].value == 27 * PPM and bins[0].value == 0  # 3 images behind a bin: withheld
    b = site_stats("classification", ["normal", "pneumonia"], {"train": np.array([0] * 2 + [1] * 40)}, meta[:0],
                   min_count=5)
    assert b.cases["train"][0].value is None and b.cases["train"][1].value == 40
    p = pool([a, b])
    assert p.cases["train"][0].value == 27 and "lower bound: 1 hospital" in p.cases["train"][0].withheld
    assert "total" not in json.dumps(a.model_dump())  # no marginal beside the cells: it would give a withheld one away


def test_noise_stays_within_its_stated_scale_and_asking_again_gives_the_same_noise(tmp_path):
    (tmp_path / "evaluation-noise.key").write_bytes(bytes(range(32)))  # a fixed secret: the same draws every run
    exact = {h.data.name: statistics(h, SPEC) for h in _simulated(key=tmp_path)}
    noisy_h = _simulated(policy=StatisticsSite(min_count=1, noise_epsilon=2.0), key=tmp_path)
    noisy = {h.data.name: statistics(h, SPEC) for h in noisy_h}
    again = {h.data.name: statistics(h, SPEC) for h in noisy_h}
    assert again == noisy
    scale = next(iter(noisy.values())).noise_scale
    assert scale == pytest.approx(7 / 2.0)  # seven fields, one cell each per image, at epsilon 2
    errors = []
    for site, s in noisy.items():
        e = exact[site]
        pairs = [(n, x) for split in e.cases for n, x in zip(s.cases[split], e.cases[split], strict=True)]
        pairs += list(zip(s.size.counts, e.size.counts, strict=True))
        for n, x in pairs:
            if n.value is not None:
                errors.append(n.value - x.value)
            else:
                assert x.value < 1 + 12 * scale  # withheld only where the noised value fell below the floor
    errors = np.abs(errors)
    assert len(errors) >= 20 and errors.max() < 12 * scale and 0.3 * scale < errors.mean() < 3 * scale, errors


def _ct(path: Path, hu: np.ndarray) -> None:
    from medimaging.dicomgen import write

    write(path, (hu + 1024).astype(np.uint16), modality="CT", rescale=(1, -1024), window=(40, 400), spacing=(0.7, 0.7))


def test_statistics_of_real_dicom_ct_png_and_nifti_files(tmp_path):
    """CT in Hounsfield units from the DICOM Modality LUT (not the window), PNG pictures, NIfTI
    volumes with their slices and spacing; each hospital's own site.yaml, its own decoder."""
    import nibabel as nib

    rng = np.random.default_rng(3)
    hus = []
    for cls in ("normal", "nodule"):
        for i in range(12):
            hu = np.where(rng.random((48, 64)) < 0.4, -1000, 40 + (300 if cls == "nodule" else 0)).astype(np.int32)
            hus.append(hu)
            _ct(tmp_path / "ct" / cls / f"{i}.dcm", hu)
            img = (rng.random((40, 40)) * (120 if cls == "normal" else 250)).astype(np.uint8)
            (tmp_path / "png" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "png" / cls / f"{i}.png")
            (tmp_path / "nii" / cls).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(rng.random((20, 20, 36)).astype(np.float32), np.diag([0.8, 0.8, 2.5, 1])),
                     tmp_path / "nii" / cls / f"{i}.nii.gz")
    got = {}
    for name, dims in (("ct", 2), ("png", 2), ("nii", 3)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"site: {name}\ndata:\n  root: {tmp_path / name}\n  image_size: 16\n  spatial_dims: {dims}\n"
                        f"  cache_dir: {tmp_path / 'cache' / name}\nstate_dir: {tmp_path / 'state'}\n"
                        "statistics:\n  min_count: 1\n")  # 24 images in three splits: no cell of 10
        got[name] = statistics(_hospital(str(path), path.stat().st_mtime, 16), SPEC)
    ct = got["ct"]
    assert ct.modality["CT"].value == 24
    expected = np.sum([image_hist(h, HU_EDGES) for h in hus], axis=0)
    assert [c.value for c in ct.intensity["CT"].counts] == expected.tolist() and ct.intensity["CT"].unit == "HU"
    assert expected[HU_EDGES.index(-1000) + 1] > 0 and expected.sum() == 24 * PPM  # air and soft tissue, in HU
    assert ct.spacing.counts[2].value == 24 and ct.size.counts[1].value == 24  # 0.5-0.75 mm; 64 px
    assert ct.classes == ["nodule", "normal"] and sum(c.value for s in ct.cases.values() for c in s) == 24
    assert got["png"].modality["PNG"].value == 24 and got["png"].intensity["PNG"].unit == "level"
    nii = got["nii"]
    assert nii.modality["NIfTI"].value == 24 and nii.slices.counts[2].value == 24  # 36 slices (NIfTI's last axis): 32-64
    assert nii.spacing.counts[3].value == 24 and nii.size.counts[0].value == 24  # 0.8 mm: 0.75-1.0; 20 px
    assert nii.thickness.counts[4].value == 24 and ct.thickness is None  # 2.5 mm between slices: 2-3


def _named_pngs(root: Path, names: dict[str, int], count: int = 24) -> None:
    """One folder per class name; a class's images are bright in their own half (`names`: 0
    top, 1 bottom), which survives each image's own intensity scaling."""
    rng = np.random.default_rng(5)
    for name, half in names.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            img = rng.normal(60, 10, (32, 32))
            img[16 * half:16 * half + 16] += 120
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"img{i:03d}.png")


def _site(tmp: Path, name: str, folders: dict[str, int], extra: str = "") -> Path:
    _named_pngs(tmp / "pacs" / name, folders)
    path = tmp / name / "site.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(f"site: {name}\ndata:\n  root: {tmp / 'pacs' / name}\n  image_size: 32\n  cache_dir: "
                    f"{tmp / name / 'cache'}\nstate_dir: {tmp / name / 'state'}\nrequire_approval: false\n" + extra)
    return path


def test_site_yaml_maps_local_names_in_any_language_and_labels_follow_the_federation_order(tmp_path):
    """A Thai hospital's folders ('ปกติ' normal, 'ป่วย' sick) and an Indonesian one's ('sehat'
    healthy, which sorts after 'pneumonia') mapped onto normal / pneumonia: the labels are the
    federation's indices (the normal images, bright at the top, are class 0 at every hospital)."""
    plain = _site(tmp_path, "site-a", {"normal": 0, "pneumonia": 1})
    thai = _site(tmp_path, "site-b", {"ปกติ": 0, "ป่วย": 1}, "classes:\n  ปกติ: normal\n  ป่วย: pneumonia\n")
    bahasa = _site(tmp_path, "site-d", {"sehat": 0, "pneumonia": 1}, "classes:\n  sehat: normal\n")
    assert sorted(["sehat", "pneumonia"]) == ["pneumonia", "sehat"]  # its own order is the other way round
    for path in (plain, thai, bahasa):
        h = _hospital(str(path), path.stat().st_mtime, 32)
        assert h.classes == ["normal", "pneumonia"]
        x, y = h.data.train.x, h.data.train.y
        top = x[:, 0, :16].mean((1, 2)) - x[:, 0, 16:].mean((1, 2))
        assert (y == 0).sum() > 5 and (y == 1).sum() > 5
        assert top[y == 0].min() > 0 > top[y == 1].max(), path  # class 0 is the normal images at every hospital
    wrong = _site(tmp_path, "site-c", {"normal": 0, "pneumonia": 1}, "classes:\n  clear: normal\n")
    with pytest.raises(SiteDataError, match="clear is not one of this hospital's classes \\(normal, pneumonia\\)"):
        _hospital(str(wrong), wrong.stat().st_mtime, 32)


def _grid(paths: list[Path]) -> tuple[InProcessGrid, dict[int, str]]:
    grid = InProcessGrid(deployed_app, len(paths))
    names = {}
    for nid, path in zip(grid.contexts, paths, strict=True):
        grid.contexts[nid].node_config = {SITE_CONFIG_KEY: str(path)}
        names[nid] = path.parent.name
    return grid, names


def test_hospitals_that_name_or_order_the_classes_differently_are_refused_with_the_names(tmp_path):
    """Through the hospitals' real ClientApp: 'clear' against 'normal' is refused naming both
    hospitals and their names; mapped in site.yaml, they agree; task.classes in another order
    is refused; a hospital given a task whose classes are not its own refuses it, saying both."""
    a = _site(tmp_path, "site-a", {"normal": 0, "pneumonia": 1})
    b = _site(tmp_path, "site-b", {"clear": 0, "pneumonia": 1})
    grid, names = _grid([a, b])
    with pytest.raises(ConfigError) as err:
        check_classes(grid, names, 32, None, "c1", 60)
    said = str(err.value)
    assert "site-a: normal, pneumonia; site-b: clear, pneumonia" in said and "classes:" in said, said
    b.write_text(b.read_text() + "classes:\n  clear: normal\n")
    grid, names = _grid([a, b])
    assert check_classes(grid, names, 32, None, "c2", 60) == ["normal", "pneumonia"]
    with pytest.raises(ConfigError, match="task.classes is pneumonia, normal; hospitals site-a, site-b"):
        check_classes(grid, names, 32, ["pneumonia", "normal"], "c3", 60)
    # a hospital that joins later gets the agreed names in its task, and refuses them if they are not its own
    from server.engine.rounds import run_federation
    from simulations.runner import prepare_run

    cfg = load_config(None, {"sites": 2, "server.rounds": 1, "train.local_epochs": 1, "data.image_size": 32,
                             "server.output_dir": str(tmp_path / "runs"), "strategy.min_sites": 1})
    plan = prepare_run(cfg, Collect())
    plan.node_names, plan.classes = names, ["pneumonia", "normal"]
    run_federation(grid, plan)
    problems = " ".join(plan.progress.problems)
    assert "this hospital's classes are normal, pneumonia (in label order), the federation's pneumonia, normal" in problems, problems


def test_stats_command_describes_simulated_hospitals_and_names_bad_input_in_one_line(tmp_path):
    res = subprocess.run([str(BIN / "aseanfl"), "stats", "--sites", "3", "--out", str(tmp_path), "--min-count", "5"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    folder = next(tmp_path.glob("stats-*"))
    result = json.loads((folder / "stats.json").read_text())
    assert set(result["sites"]) == {"nanning", "hanoi", "bangkok"} and result["classes_agree"]
    assert result["pooled"]["cases"]["train"][0]["value"] > 100 and "pooled: train (normal" in res.stdout
    assert (folder / "config.yaml").is_file() and "## Cases per class and split" in (folder / "stats.md").read_text()
    for args, said in ((["--min-count", "0"], "--min-count: must be at least 1"),
                       (["--data", str(tmp_path / "missing.npz")], "missing.npz")):
        bad = subprocess.run([str(BIN / "aseanfl"), "stats", *args], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and said in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_mask_coverage_pools_exactly_and_stats_md_is_in_the_readers_language(tmp_path):
    """Segmentation: each label's summed share of the voxels, pooled as the union's; stats.md
    written in Vietnamese when that is the reader's language."""
    from common.i18n import current, set_language
    from server.records.statistics import write_statistics

    cfg = load_config(None, {"sites": 2, "data.synthetic.task": "segmentation", "data.synthetic.samples_per_site": 60})
    hospitals = [simulated_hospital(cfg, i, 32, ["background", "lesion"], StatisticsSite(min_count=1)) for i in range(2)]
    sites = {h.data.name: statistics(h, SPEC) for h in hospitals}
    masks = [m for h in hospitals for split in (h.data.train, h.data.val, h.test) for m in split.y.numpy()]
    lesion = sum(float((m == 1).mean()) for m in masks)
    assert 0 < lesion < len(masks) / 2  # real masks: some lesion, mostly background
    before = current()
    set_language("vi")
    try:
        result = write_statistics(tmp_path, sites, 1, "seg")
    finally:
        set_language(before)
    pooled = result["pooled"]["masks"]
    assert sum(c["value"] for c in pooled) == PPM * len(masks)  # every voxel of every mask, once
    assert pooled[1]["value"] / PPM == pytest.approx(lesion, abs=1e-5 * len(masks))
    assert all(s.task == "segmentation" for s in sites.values())
    text = (tmp_path / "stats.md").read_text()
    assert "## Số ca theo lớp và phần chia" in text and "## Độ phủ mặt nạ" in text, text[:500]


def test_a_statistics_reply_holds_no_file_name_folder_or_header_text(tmp_path):
    """The real ClientApp's reply to `query.stats`, from DICOM files whose header names a patient
    and whose Modality is free text: counts only; the free-text modality is released as
    'other'; no file name, folder or header string is in any value sent."""
    from medimaging.dicomgen import write
    from server.engine.census import ask, site_statistics

    root = tmp_path / "pacs"
    for cls in ("normal", "nodule"):
        for i in range(12):
            hu = np.full((32, 32), 40 if cls == "normal" else 300, np.int32)
            hu[:8] = -1000
            write(root / cls / f"DOE_JANE_{cls}_{i:03d}.dcm", (hu + 1024).astype(np.uint16), modality="DOE JANE ROOM 7",
                  rescale=(1, -1024), header={"PatientName": "DOE^JANE", "PatientID": "HN-4471"})
    path = tmp_path / "site-a" / "site.yaml"
    path.parent.mkdir()
    path.write_text(f"site: site-a\ndata:\n  root: {root}\n  image_size: 16\n  cache_dir: {tmp_path / 'cache'}\n"
                    f"state_dir: {tmp_path / 'state'}\nrequire_approval: false\nstatistics:\n  min_count: 1\n")
    grid, names = _grid([path])
    answers = ask(grid, names, DescribeSpec(request="leak", image_size=16), "stats", 60)
    reply = str(dict(answers["site-a"]))
    released = site_statistics(answers)["site-a"]
    assert released.modality["other"].value == 24 and sum(c.value for s in released.cases.values() for c in s) == 24
    for secret in ("DOE", "JANE", "HN-4471", "ROOM", str(root), "_000", ".dcm"):
        assert secret not in reply, secret


def test_check_data_shows_the_federations_classes_after_the_mapping(tmp_path):
    bahasa = _site(tmp_path, "site-d", {"sehat": 0, "pneumonia": 1}, "classes:\n  sehat: normal\n")
    res = subprocess.run([str(BIN / "aseanfl"), "client", "check-data", "-c", str(bahasa)], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ, "COLUMNS": "200"})
    assert res.returncode == 0 and "the federation's classes, in this hospital's label order: normal, pneumonia" in \
        res.stdout, res.stdout + res.stderr
    bahasa.write_text(bahasa.read_text().replace("sehat: normal", "sihat: normal"))
    res = subprocess.run([str(BIN / "aseanfl"), "client", "check-data", "-c", str(bahasa)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == "config error: site.yaml classes: sihat is not one of this " \
        "hospital's classes (pneumonia, sehat)", res.stderr
