"""The aseanfl Flower App as the coordinator runs it: the files of this source tree (as Flower's
.gitignore rules select them), the bundle (FAB) Flower builds from them byte for byte, and its
sha256, which `aseanfl server approve` and the hospitals' allow-lists name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def app_dir() -> Path:
    """The aseanfl Flower App (this source tree's pyproject.toml)."""
    root = Path(__file__).resolve().parents[2]  # server/operations/ -> the source tree
    if not (root / "pyproject.toml").is_file():
        raise ValueError("the aseanfl source tree is not found next to the installed package; pass --app")
    return root


def app_files(app: Path) -> dict[str, Path]:
    """The files Flower would bundle from `app` and more, found without walking folders its
    .gitignore excludes (Flower walks everything, a .venv's ~50 k files included: ~10 s here)."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    root = app.expanduser().resolve()
    ignore = build_pathspec(load_gitignore_patterns(root / ".gitignore"))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not ignore.match_file(f"{(here / d).as_posix()}/")]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                files[(here / name).as_posix()] = path
    return files


def app_bundle(app: Path) -> bytes:
    """The app bundle (FAB) Flower builds from `app`, byte for byte (fixed zip dates)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(app))[0]


def app_hash(app: Path) -> str:
    """sha256 of the app bundle Flower builds from `app`."""
    import hashlib

    return hashlib.sha256(app_bundle(app)).hexdigest()


def staged_app(bundle: bytes, stage: Path) -> Path:
    """A copy of the files in an app bundle (`app_bundle`), for `flwr run` to bundle quickly."""
    import zipfile
    from io import BytesIO

    shutil.rmtree(stage, ignore_errors=True)
    with zipfile.ZipFile(BytesIO(bundle)) as fab:
        for name in fab.namelist():
            if not name.startswith(".info/"):  # Flower's own metadata, written again by `flwr run`
                target = stage / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(fab.read(name))
    return stage
