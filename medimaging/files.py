"""Hospital exports as training data: DICOM, NIfTI, PNG/JPEG files, labelled by a CSV manifest
(`path,label[,split]`) or by folder (`<root>/<class>/...`, optionally `<root>/<split>/<class>/...`).

Only pixel arrays and labels come out of here: a DICOM header is read by pydicom inside
`read_pixels` and dropped there. Every file that cannot be used is listed with the reason; none
is dropped silently. Decoded images are cached as one MedMNIST-layout .npz (keyed by the files'
names, sizes, modification times and labels), so later runs and rounds do not decode again.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from .config import FilesConfig

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".dcm": "dicom", ".nii": "nifti", ".gz": "nifti"}
SPLITS = ("train", "val", "test")  # "val" rows train: each site splits its own validation


@dataclass
class Item:
    path: Path
    label: str
    split: str | None


@dataclass
class Problem:
    file: str
    reason: str


@dataclass
class Inventory:
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def _kind(path: Path) -> str | None:
    if path.name.lower().endswith(".nii.gz"):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return None
    return IMAGE_SUFFIXES.get(suffix, "dicom" if suffix == "" else None)  # PACS exports often lack .dcm


def inventory(cfg: FilesConfig) -> Inventory:
    """Every labelled file, and every problem with the labels (unknown class, missing file)."""
    inv = Inventory()
    if not cfg.root.is_dir():
        raise ValueError(f"data.files.root: folder not found: {cfg.root}")
    if cfg.manifest is not None:
        if not cfg.manifest.is_file():
            raise ValueError(f"data.files.manifest: file not found: {cfg.manifest}")
        with cfg.manifest.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{cfg.manifest.name}: needs a header with columns path,label[,split]")
            for line, row in enumerate(reader, start=2):
                rel, label, split = (row.get("path") or "").strip(), (row.get("label") or "").strip(), (row.get("split") or "").strip()
                where = f"{cfg.manifest.name}:{line}"
                if not rel or not label:
                    inv.problems.append(Problem(where, "empty path or label"))
                elif split and split not in SPLITS:
                    inv.problems.append(Problem(where, f"split '{split}' is not one of {', '.join(SPLITS)}"))
                elif not (cfg.root / rel).is_file():
                    inv.problems.append(Problem(rel, f"listed in {where} but missing"))
                else:
                    inv.items.append(Item(cfg.root / rel, label, split or None))
    else:
        for path in sorted(p for p in cfg.root.rglob("*") if p.is_file()):
            parts = path.relative_to(cfg.root).parts
            if any(part.startswith(".") for part in parts):  # hidden files, and a cache kept inside root
                continue
            split = parts[0] if len(parts) >= 3 and parts[0] in SPLITS else None
            label_parts = parts[1:] if split else parts
            if len(label_parts) < 2:
                inv.problems.append(Problem(str(path.relative_to(cfg.root)), "not inside a class folder"))
                continue
            inv.items.append(Item(path, label_parts[0], split))
    found = sorted({i.label for i in inv.items})
    inv.classes = list(cfg.classes) if cfg.classes else found
    unknown = [i for i in inv.items if i.label not in inv.classes]
    for item in unknown:
        inv.problems.append(Problem(_rel(cfg, item.path), f"unknown class '{item.label}' (classes: {', '.join(inv.classes)})"))
    inv.items = [i for i in inv.items if i.label in inv.classes]
    return inv


def _rel(cfg: FilesConfig, path: Path) -> str:
    try:
        return str(path.relative_to(cfg.root))
    except ValueError:
        return str(path)


def read_pixels(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """(2D float32 pixel array, pixel spacing or None). Raises ValueError with a reason."""
    path = Path(path)
    kind = _kind(path)
    if kind is None:
        raise ValueError(f"not an image type this reads (suffix '{path.suffix}')")
    try:
        if kind in ("png", "jpeg"):
            from PIL import Image

            with Image.open(path) as img:
                img.load()
                arr, spacing = np.asarray(img.convert("L"), dtype=np.float32), None
        elif kind == "dicom":
            import pydicom
            from pydicom.pixels import apply_modality_lut

            ds = pydicom.dcmread(path)  # the header stays in this function
            arr = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
            spacing = tuple(float(v) for v in ds.get("PixelSpacing", []) or []) or None
        else:
            import nibabel as nib

            img = nib.load(path)
            arr = np.asarray(img.get_fdata(dtype=np.float32))
            spacing = tuple(float(v) for v in img.header.get_zooms()[:2])
    except Exception as exc:  # noqa: BLE001 - every decoder error becomes a reason
        raise ValueError(f"cannot decode as {kind}: {type(exc).__name__}: {exc}".splitlines()[0][:200]) from None
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and kind == "dicom":  # RGB ultrasound
        arr = arr[..., :3].mean(-1)
    if arr.ndim != 2:
        raise ValueError(f"{arr.ndim}D image of shape {list(arr.shape)}: 2D classification needs 2D images")
    if not np.all(np.isfinite(arr)) or arr.size == 0:
        raise ValueError("empty image or NaN/Inf pixels")
    return arr, spacing


def _to_uint8(arr: np.ndarray, size: int) -> np.ndarray:
    import torch  # here, not at the top: `client audit` and `check-data --help` need neither
    from monai.transforms import Resize

    lo, hi = np.percentile(arr, (0.5, 99.5))
    scaled = np.clip((arr - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    resized = Resize((size, size), mode="bilinear", anti_aliasing=True)(torch.from_numpy(scaled)[None].float())
    return np.asarray(np.round(np.asarray(resized)[0] * 255), dtype=np.uint8)


@dataclass
class Decoded:
    inventory: Inventory
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # file -> native shape
    spacings: dict[str, tuple[float, ...]] = field(default_factory=dict)
    cache: Path | None = None


def _key(cfg: FilesConfig, inv: Inventory) -> str:
    h = hashlib.sha256(json.dumps([cfg.image_size, cfg.test_fraction, inv.classes]).encode())
    for item in inv.items:
        st = item.path.stat()
        h.update(f"{_rel(cfg, item.path)}|{st.st_size}|{st.st_mtime_ns}|{item.label}|{item.split}\n".encode())
    return h.hexdigest()[:16]


def decode(cfg: FilesConfig, seed: int = 0, write_cache: bool = True) -> Decoded:
    """Read every listed file; unreadable ones become problems. Writes (or reuses) the cache
    .npz in MedMNIST layout (train = train + val rows; test = test rows or a held-out share)."""
    inv = inventory(cfg)
    out = Decoded(inv)
    cache = cfg.cache_dir / f"files-{_key(cfg, inv)}.npz"
    report = cache.with_suffix(".json")
    if write_cache and cache.is_file() and report.is_file():
        saved = json.loads(report.read_text())
        inv.problems += [Problem(**p) for p in saved["problems"]]
        out.shapes, out.cache = {k: tuple(v) for k, v in saved["shapes"].items()}, cache
        return out
    images, labels, splits = [], [], []
    for item in inv.items:
        name = _rel(cfg, item.path)
        try:
            arr, spacing = read_pixels(item.path)
        except ValueError as exc:
            inv.problems.append(Problem(name, str(exc)))
            continue
        out.shapes[name] = arr.shape
        if spacing:
            out.spacings[name] = spacing
        images.append(_to_uint8(arr, cfg.image_size))
        labels.append(inv.classes.index(item.label))
        splits.append(item.split)
    if not write_cache:
        return out
    if len(set(labels)) < 2:
        raise ValueError(f"data.files: {len(images)} usable images in {len(set(labels))} class(es) under "
                         f"{cfg.root}; training needs at least two classes ({len(inv.problems)} problems listed)")
    x, y = np.stack(images), np.asarray(labels, dtype=np.int64)[:, None]
    is_test = np.array([s == "test" for s in splits])
    if not is_test.any():  # no test rows given: hold out a seeded share
        order = np.random.default_rng(seed).permutation(len(y))
        is_test = np.zeros(len(y), bool)
        is_test[order[: int(round(len(y) * cfg.test_fraction))]] = True
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, train_images=x[~is_test], train_labels=y[~is_test], test_images=x[is_test], test_labels=y[is_test])
    tmp.replace(cache)
    report.write_text(json.dumps({"problems": [p.__dict__ for p in inv.problems],
                                  "shapes": {k: list(v) for k, v in out.shapes.items()}, "classes": inv.classes}))
    out.cache = cache
    return out
