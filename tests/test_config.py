"""Config errors: exit code 2, one clear line naming the field, no traceback."""

import subprocess
import sys

import numpy as np
import pytest

from simulations.config import ConfigError, load_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aseanfl", "simulate", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "vgg"], "model.name: Input should be one of: 'cnn', 'smallresnet', 'resnet18', 'densenet121', 'unet'"),
        (["--rounds", "-3"], "server.rounds: Input should be greater than or equal to 1"),
        (["--data", "missing/file.npz"], "data.path: file not found: missing/file.npz"),
        (["--partition", "dirichlet", "--alpha", "0"], "partition.alpha: Input should be greater than 0"),
        (["--set", "train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["--set", "trian.lr=0.1"], "trian: unknown field"),
        (["--model", "densenet121", "--set", "data.image_size=28"], "too small for model.name=densenet121"),
    ],
)
def test_bad_values_exit_2_with_one_clear_line(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("sites: [a, b, c]\nserver: {rounds: 4}\nmodel: {name: resnet18}\n")
    cfg = load_config(path, {"server.rounds": 2})
    assert cfg.sites == ["a", "b", "c"] and cfg.server.rounds == 2 and cfg.model.name == "resnet18"


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_corrupt_and_bad_multilabel_npz_are_named(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ConfigError, match=r"data.path: corrupt.npz is not a readable .npz file"):
        load_config(None, {"data.path": str(corrupt)})
    multi = tmp_path / "chestmulti.npz"
    images = np.zeros((10, 28, 28), np.uint8)
    labels = np.full((10, 14), 2)  # multi-label targets must be 0/1 per finding
    np.savez(multi, train_images=images, train_labels=labels, test_images=images, test_labels=labels)
    with pytest.raises(ConfigError, match="14 label columns with values other than 0/1"):
        load_config(None, {"data.path": str(multi)})
    result = run_cli("--data", str(multi))
    assert result.returncode == 2 and "0/1 per finding" in result.stderr


def test_min_sites_cannot_exceed_sites():
    with pytest.raises(ConfigError, match="strategy.min_sites=4 exceeds the 3 simulated sites"):
        load_config(None, {"sites": 3, "strategy.min_sites": 4})


def test_the_researcher_guide_shows_config_errors_as_they_are_printed():
    from pathlib import Path

    line = run_cli("--model", "vgg").stderr.strip()
    assert line and line in (Path(__file__).parents[1] / "docs" / "researcher.md").read_text()
