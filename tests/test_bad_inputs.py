"""Inputs a new user really gives (issue 15, found by trying aseanfl as one): each gets one clear
line naming the file, field or site, a non-zero exit where the command cannot do its job, and no
traceback or library warning on the terminal. Every input is made by the test and checked to be
what it claims (a 16-bit PNG really holds values above 255, a link really is broken)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from inprocess import Collect, InProcessGrid, site_yaml
from PIL import Image
from typer.testing import CliRunner

from aseanfl.cli import app
from client.training.app import app as deployed_app
from client.training.site import SITE_CONFIG_KEY
from medimaging import dicomgen
from medimaging.config import FilesConfig
from medimaging.files import decode
from medimaging.pixels import read_pixels
from server.engine.rounds import run_federation
from server.records.report import write_report
from simulations.config import load_config
from simulations.runner import SimulationFailed, nothing_trained, prepare_run


def cli(*args: str, cwd=None, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "aseanfl", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_16_bit_png_is_read_at_full_depth(tmp_path):
    values = np.linspace(0, 60000, 40 * 36).reshape(40, 36).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "xray.png")
    with Image.open(tmp_path / "xray.png") as img:
        assert img.mode.startswith("I") and np.asarray(img).max() > 255  # really a 16-bit file
    pixels, _ = read_pixels(tmp_path / "xray.png")
    assert np.array_equal(pixels, values.astype(np.float32))
    for cls in ("a", "b"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(values + 100 * i).save(tmp_path / "root" / cls / f"{i}.tiff")
    decoded = decode(FilesConfig(root=tmp_path / "root", cache_dir=tmp_path / "cache", image_size=32))
    images = np.load(decoded.cache)["train_images"]
    assert not decoded.inventory.problems and (images == 255).mean() < 0.05  # not 99.6 % white


def test_broken_and_looping_links_in_a_class_folder_are_named(tmp_path):
    root = tmp_path / "export"
    for cls in ("normal", "effusion"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "normal" / "moved.png").symlink_to(tmp_path / "elsewhere" / "moved.png")
    (root / "effusion" / "loop").symlink_to(root / "effusion" / "loop")
    (root / "effusion" / "again").symlink_to(root / "effusion")  # a folder that links back to itself
    other = tmp_path / "mount" / "xray"
    other.mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(other / "m.png")
    (root / "normal" / "mounted").symlink_to(other)  # a folder on another mount: read
    assert not (root / "normal" / "moved.png").exists() and (root / "normal" / "moved.png").is_symlink()
    site = tmp_path / "site.yaml"
    site.write_text(f"site: vientiane\ndata:\n  root: {root}\n")
    result = CliRunner().invoke(app, ["client", "check-data", "-c", str(site)], env={"COLUMNS": "80"})
    lines = result.output.splitlines()
    assert result.exit_code == 0 and "vientiane: 5 usable images, 3 problems" in result.output, result.output
    assert any(line.startswith("skipped normal/moved.png: a broken link (its target ") for line in lines), result.output
    assert "skipped effusion/loop: a link loop" in lines
    assert any(line.startswith("skipped effusion/again: a link loop") for line in lines), result.output


def _npz(path, train_images, train_labels, test_images=None, test_labels=None):
    np.savez(path, train_images=train_images, train_labels=train_labels,
             test_images=train_images if test_images is None else test_images,
             test_labels=train_labels if test_labels is None else test_labels)
    return str(path)


def test_bad_npz_files_are_one_line_config_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40)[:, None] % 2
    short = _npz(tmp_path / "short.npz", images, labels[:30])
    assert "train_labels holds 30 labels for 40 train_images" in one_line_error(cli("simulate", "--data", short))
    single = _npz(tmp_path / "single.npz", images, np.zeros((40, 1), np.int64))
    assert "every label is 0; a classifier needs at least two classes" in one_line_error(cli("simulate", "--data", single))
    nan = images.astype(np.float32) / 255
    nan[3, 4, 5] = np.nan
    line = one_line_error(cli("simulate", "--data", _npz(tmp_path / "nan.npz", nan, labels)))
    assert "train_images: 1 images hold NaN or infinite values" in line
    wide = _npz(tmp_path / "wide.npz", images.astype(np.float32), labels)  # floats in 0-255
    assert "float images must lie in [0, 1] (found 0 to 254)" in one_line_error(cli("simulate", "--data", wide))
    line = one_line_error(cli("simulate", "--data", "README.md", cwd=os.path.dirname(os.path.dirname(__file__))))
    assert "data.path: README.md is not an .npz file" in line and "pickle" not in line


def test_binary_or_empty_config_files_are_one_line_errors(tmp_path):
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)) * 8)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "not a text file" in one_line_error(cli("simulate", "--config", str(binary)))
    assert "the file is empty" in one_line_error(cli("simulate", "--config", str(empty)))
    for path, said in ((binary, "not a text file"), (empty, "the file is empty")):
        result = CliRunner().invoke(app, ["client", "check-data", "-c", str(path)])
        assert result.exit_code == 2 and said in result.output and result.exception.__class__ is SystemExit, result.output


def test_one_site_asks_how_to_proceed_and_help_lists_every_model():
    line = one_line_error(cli("simulate", "--sites", "1"))
    assert "--sites 2" in line and "--set strategy.min_sites=1" in line
    out = cli("simulate", "--help", columns=200).stdout
    assert "unet" in out and "densenet121" in out


def test_simulate_on_files_says_so_and_keeps_the_terminal_clean(tmp_path):
    """The data line names the files; a corrupt DICOM and a padded one (pydicom warns) reach the
    terminal neither as a traceback nor as a warning; Ray's notices are hidden; site names whole in 80 columns."""
    from medimaging.synthetic import site_images

    root = tmp_path / "pacs"
    (x, y), _ = site_images(0, 5, 80, 10)
    for n, (img, label) in enumerate(zip(x, y, strict=True)):
        dicomgen.write(root / ("lesion" if label else "clear") / f"IM{n:04d}", np.round(img[0] * 4095).astype(np.uint16),
                       "jpeg-ls" if n % 2 else "rle", modality="CR")
    (root / "clear" / "IM9999").write_bytes((root / "clear" / "IM0000").read_bytes()[:700])  # cut
    result = cli("simulate", "--rounds", "1", "--sites", "bangkok-general,kuala-lumpur-general",
                 "--set", f"data.files.root={root}", "--set", f"data.files.cache_dir={tmp_path / 'cache'}",
                 "--set", "data.files.image_size=32", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"files under {root}" in out and "synthetic" not in out
    assert "bangkok-general" in out and "kuala-lumpur-general" in out  # whole, not "bangk…"
    cut = [line for line in result.stderr.splitlines() if "clear/IM9999 skipped: " in line]
    assert len(cut) == 1 and "export it again" in cut[0], result.stderr  # the cut file: named, one line
    for noise in ("Traceback", "Warning", "RAY_ACCEL", "Manually terminating", "pydicom"):
        assert noise not in result.stderr + out, (noise, result.stderr)


def test_tiny_partitions_are_warned_per_site(tmp_path):
    cfg = load_config(None, {"sites": 8, "data.synthetic.samples_per_site": 20, "partition.scheme": "quantity",
                             "server.output_dir": str(tmp_path)})
    progress = Collect()
    prepare_run(cfg, progress)
    small = [p for p in progress.problems if "too little to learn from" in p]
    counts = json.loads(next(tmp_path.glob("*/data_distribution.json")).read_text())
    tiny = [site for site, c in counts.items() if sum(c["train"]) < 20 or sum(1 for k in c["train"] if k) < 2]
    assert tiny and len(small) == len(tiny), (small, counts)  # one line per small site, and only those
    assert all(any(p.startswith(f"{site} gets ") for p in small) for site in tiny)


def test_a_run_where_every_hospital_refused_writes_no_model_and_fails(tmp_path):
    """Budgets below what one round costs: every hospital refuses every round; the run says that
    nothing was trained, writes no model, and `simulate` would exit 1."""
    sites = [site_yaml(tmp_path, f"site-{k}", k, tmp_path / f"site-{k}" / "state", dp=True,
                       extra="") for k in range(2)]
    for path in sites:
        path.write_text(path.read_text().replace("  target_epsilon: 50\n", "  target_epsilon: 50\n  budget_epsilon: 0.01\n"))
    cfg = load_config(None, {"sites": 2, "server.rounds": 2, "train.local_epochs": 1, "data.image_size": 32,
                             "server.output_dir": str(tmp_path / "runs"), "strategy.min_sites": 1})
    plan = prepare_run(cfg, Collect())
    grid = InProcessGrid(deployed_app, 2)
    for nid, path in zip(grid.contexts, sites, strict=True):
        grid.contexts[nid].node_config = {SITE_CONFIG_KEY: str(path)}
    plan.node_names = {100 + k: f"site-{k}" for k in range(2)}
    summary = run_federation(grid, plan)
    statuses = {r.code for _, _, r in plan.progress.refusals}
    assert summary["trained_rounds"] == 0 and len(plan.progress.refusals) == 4 and statuses == {"privacy-budget"}, statuses
    assert not (plan.run_dir / "model.safetensors").exists() and not (plan.run_dir / "model_best.safetensors").exists()
    with pytest.raises(SimulationFailed, match=r"nothing was trained: .*4 x refused:privacy-budget.*no model was written"):
        nothing_trained(plan.run_dir)
    report = write_report(plan.run_dir).read_text()
    assert "**Nothing was trained**" in report and "model.safetensors" not in report
