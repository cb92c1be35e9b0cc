"""Pixels out of one file: a DICOM image or series (its header read and dropped inside pydicom),
a NIfTI volume, a PNG/JPEG/TIFF picture, or a mask; resized and scaled to uint8 for training."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from common.i18n import Reason

from medimaging.config import DicomConfig
from medimaging.dicom import read_dicom, read_series
from medimaging.items import file_kind


def read_pixels(path: Path, spatial_dims: int = 2, dicom: DicomConfig | None = None,
                notes: list[str] | None = None, meta: dict | None = None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """(2D, or with spatial_dims=3 3D, float32 pixel array, spacing or None). Raises
    ValueError with a reason; library warnings about the file are appended to `notes`; `meta`
    gets the modality and, for CT, the Hounsfield histogram (medimaging/stats.py)."""
    path, dicom, notes = Path(path), dicom or DicomConfig(), [] if notes is None else notes
    meta = {} if meta is None else meta
    if path.is_dir():
        if spatial_dims != 3:
            raise Reason("a folder (DICOM series) is a volume: set data.files.spatial_dims: 3")
        arr, spacing = read_series(path, dicom, notes, meta)
        return _checked(arr, spatial_dims), spacing
    kind = file_kind(path)
    if kind is None:
        raise Reason("not an image type this reads (suffix '{suffix}')", suffix=path.suffix)
    if kind == "dicom":
        arr, spacing = read_dicom(path, spatial_dims, dicom, notes, meta)
        return _checked(arr, spatial_dims), spacing
    meta["modality"] = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}.get(kind, "NIfTI")  # no header names it
    try:
        if kind in ("png", "jpeg", "tiff"):
            arr, spacing = _picture(path), None
        else:
            import nibabel as nib

            img = nib.load(path)
            arr = np.asarray(img.get_fdata(dtype=np.float32))
            meta["slice_axis"] = -1  # NIfTI is (x, y, z): slices along the last axis, DICOM's along the first
            spacing = tuple(float(v) for v in img.header.get_zooms()[:spatial_dims])
    except Exception as exc:  # noqa: BLE001 - every decoder error becomes a reason
        said = " ".join(f"{type(exc).__name__}: {exc}".split())
        if "truncated" in str(exc) or "EOF" in str(exc):
            raise Reason("cannot decode as {kind}: {error}; is it a partial copy? copy or export it again",
                         kind=kind, error=said) from None
        raise Reason("cannot decode as {kind}: {error}", kind=kind, error=said) from None
    return _checked(np.squeeze(arr), spatial_dims), spacing


def _picture(path: Path) -> np.ndarray:
    """A PNG/JPEG/TIFF at its full depth: 16-bit greyscale stays 16-bit (no 8-bit conversion),
    colour becomes luminance."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Pillow's "truncated" or EXIF notes: the reason or nothing
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                return np.asarray(img, dtype=np.float32)
            if img.mode in ("LA", "PA", "RGBA", "P") or "transparency" in img.info:
                img = img.convert("RGBA").convert("RGB")
            return np.asarray(img.convert("L"), dtype=np.float32)


def _checked(arr: np.ndarray, spatial_dims: int) -> np.ndarray:
    if arr.ndim != spatial_dims:
        if spatial_dims == 2:
            raise Reason("{dims}D image of shape {shape}: this task reads 2D images", dims=arr.ndim, shape=list(arr.shape))
        raise Reason("{dims}D image of shape {shape}: this task reads volumes (data.files.spatial_dims: 3)",
                     dims=arr.ndim, shape=list(arr.shape))
    if not np.all(np.isfinite(arr)) or arr.size == 0:
        raise Reason("empty image or NaN/Inf pixels")
    return arr


def read_mask(path: Path, spatial_dims: int = 2) -> np.ndarray:
    """Integer labels (0 = background) of a mask file; a 0/255 image is read as 0/1."""
    arr, _ = read_pixels(path, spatial_dims, DicomConfig(window="none"))
    if not np.array_equal(arr, np.round(arr)) or arr.min() < 0:
        raise Reason("mask holds values that are not labels (integers >= 0)")
    values = set(np.unique(arr).tolist())
    if values <= {0, 255} and 255 in values:
        arr = arr / 255
    return arr.astype(np.int64)


def _resize(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    import torch  # here, not at the top: `client audit` and `check-data --help` need neither
    import medimaging.monai_loader  # noqa: F401  (MONAI without BERT)
    from monai.transforms import Resize

    out = Resize((size,) * arr.ndim, mode=mode, anti_aliasing=mode != "nearest")(torch.from_numpy(arr)[None].float())
    return np.asarray(out)[0]


def _to_uint8(arr: np.ndarray, size: int) -> np.ndarray:
    lo, hi = np.percentile(arr, (0.5, 99.5))
    scaled = np.clip((arr - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    mode = "trilinear" if arr.ndim == 3 else "bilinear"
    return np.asarray(np.round(_resize(scaled.astype(np.float32), size, mode) * 255), dtype=np.uint8)
