import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

ROOT = Path(__file__).resolve().parents[1]
MEDMNIST = Path(os.environ.get("ASEANFL_MEDMNIST", ROOT.parent / "shared" / "data" / "medmnist"))


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


def medmnist_file(name: str) -> Path:
    path = MEDMNIST / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"real MedMNIST data not found at {path} (see README: ../shared/data/medmnist)")
    return path
