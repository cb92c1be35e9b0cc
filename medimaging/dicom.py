"""One DICOM file (or a folder of slices) -> float32 pixels as a viewer shows them, and the
spacing. Nothing else leaves this module: the header is read and dropped here.

Decoding is pydicom's, with its plug-ins (pylibjpeg's libjpeg, openjpeg and rle, and pyjpegls;
see pyproject.toml): uncompressed (explicit, implicit, big endian), deflated, RLE, JPEG Baseline,
Extended (12-bit), Lossless (process 14, SV1), JPEG-LS, JPEG 2000 and HTJ2K. Then, in DICOM's
order: the Modality LUT (rescale, e.g. Hounsfield units), the VOI LUT or window
(`data.files.dicom.window`), MONOCHROME1 inverted (so bone is bright as in MONOCHROME2), colour
(RGB, YBR converted by pydicom, planar or not) to luminance. Multi-frame files are volumes
(3D tasks) or are refused for a 2D task, with the reason. Library warnings are returned as
notes of the file, never printed."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from common.i18n import Reason, text_of

from medimaging.config import DicomConfig

DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls"
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # RGB -> the luminance a grey display shows


@contextmanager
def captured(notes: list[str], loggers: tuple[str, ...] = ("pydicom",)):
    """The libraries' warnings and log records while reading a file go to `notes`, not the terminal."""
    class Keep(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage().splitlines()[0])

    keep, taken = Keep(logging.WARNING), [logging.getLogger(name) for name in loggers]
    propagate = [logger.propagate for logger in taken]
    for logger in taken:
        logger.addHandler(keep)
        logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger, before in zip(taken, propagate, strict=True):
            logger.removeHandler(keep)
            logger.propagate = before
        for w in caught:
            text = " ".join(str(w.message).split())
            if text not in notes:
                notes.append(text)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def read_dataset(path: Path):
    """The dataset of a DICOM file, also of one without the 128-byte preamble and file meta header
    (raw DICOM as some PACS exports write it). ValueError with what the file is and what to do."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:  # noqa: BLE001 - a cut or damaged file
        raise Reason("not a readable DICOM file ({error}); export it again from the PACS", error=_one_line(exc)) from None
    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds or "Rows" not in ds:
            raise ValueError
    except Exception:  # noqa: BLE001 - whatever force-reading makes of a non-DICOM file
        raise Reason("not a DICOM file: it has neither the DICOM file header ('DICM') nor DICOM image data; "
                     "if it came from the PACS, export it again as a DICOM (Part 10) file") from None
    if "TransferSyntaxUID" not in ds.file_meta:  # raw DICOM: the encoding pydicom found while reading
        implicit, little = getattr(ds, "original_encoding", (True, True))
        if not little:
            raise Reason("raw big-endian DICOM without a file header: export it again as a DICOM (Part 10) file")
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _decode(ds) -> np.ndarray:
    """All frames, RGB where the file is colour (pydicom converts YBR and planar layouts)."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    name = getattr(syntax, "name", str(syntax))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Reason("no image in it: the file ends before its pixel data (a partial transfer?) or is not an "
                     "image (a report, a presentation state); export it again from the PACS")
    try:
        return ds.pixel_array
    except NotImplementedError as exc:
        raise Reason("its transfer syntax {name} ({syntax}) is not one pydicom can decode ({error})", name=name,
                     syntax=str(syntax), error=_one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - decoder errors become the file's reason
        text = _one_line(exc)
        if "missing dependencies" in text or "no pixel data decoders" in text.lower() or "plugins are" in text:
            raise Reason("compressed as {name}, and no installed decoder reads it: install the decoders "
                         "({decoders}; they come with aseanfl, so the install is incomplete)", name=name,
                         decoders=DECODERS) from None
        if "shorter than" in text or "truncated" in text.lower() or "expected length" in text:
            raise Reason("its pixel data are cut short ({name}): a partial transfer? export it again ({error})", name=name,
                         error=text) from None
        raise Reason("its pixel data ({name}) do not decode: {error}", name=name, error=text) from None


def _window(arr: np.ndarray, ds, cfg: DicomConfig) -> np.ndarray:
    from pydicom.pixels import apply_voi_lut

    if cfg.window == "none":
        return arr
    if cfg.window == "auto":
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            return np.asarray(apply_voi_lut(arr, ds), dtype=np.float32)
        return arr
    centre, width = cfg.window
    return np.clip((arr - (centre - 0.5)) / max(width - 1, 1) + 0.5, 0, 1).astype(np.float32)  # DICOM's linear window


def _spacing(ds, frames: int) -> tuple[float, ...] | None:
    """(row, column[, slice]) spacing in mm, from the header or the enhanced object's shared groups."""
    measures = ds
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0]:
        measures = shared[0].PixelMeasuresSequence[0]
    pixel = tuple(float(v) for v in (measures.get("PixelSpacing") or ds.get("PixelSpacing") or []))
    if not pixel:
        return None
    if frames > 1:
        depth = measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or ds.get("SliceThickness")
        return pixel + (float(depth or 0),)
    return pixel


def _hounsfield(ds, values: np.ndarray, meta: dict | None) -> None:
    """A CT image's histogram in Hounsfield units (after the Modality LUT, before any window),
    summed over the slices of a series, for the hospital's statistics."""
    if meta is not None and meta.get("modality") == "CT":
        from medimaging.stats import HU_EDGES

        counts = np.bincount(np.searchsorted(HU_EDGES, values.ravel(), side="right"), minlength=len(HU_EDGES) + 1)
        meta["hu_counts"] = meta.get("hu_counts", 0) + counts


def _view(arr: np.ndarray, ds, cfg: DicomConfig, meta: dict | None = None) -> np.ndarray:
    """The decoded pixels as the image is to be viewed, one float32 channel per frame: colour
    (RGB, YBR already converted by pydicom, palette) as luminance; greyscale through the Modality
    LUT, then the window, with MONOCHROME1 inverted (low values are bright; the cache's
    percentile scaling keeps the range)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if meta is not None:  # for the statistics: CR, CT, DX, MR, US, ...
        meta["modality"] = str(ds.get("Modality", "")) or "DICOM"
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return np.asarray(arr[..., :3], dtype=np.float32) @ LUMA
    if photometric == "PALETTE COLOR":
        return np.asarray(apply_color_lut(arr, ds), dtype=np.float32) @ LUMA
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    _hounsfield(ds, values, meta)
    pixels = _window(values, ds, cfg)
    return -pixels if photometric == "MONOCHROME1" else pixels


def read_dicom(path: Path, spatial_dims: int, cfg: DicomConfig, notes: list[str],
               meta: dict | None = None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """(float32 2D image or 3D volume, spacing). ValueError with the reason."""
    with captured(notes):
        ds = read_dataset(path)
        pixels = _view(_decode(ds), ds, cfg, meta)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spacing = _spacing(ds, frames)
        modality = str(ds.get("Modality", "")) or "image"
    if frames > 1 and spatial_dims == 2:
        raise Reason("a multi-frame {modality} file ({frames} frames): a 2D task reads one image per file; "
                     "set data.files.spatial_dims: 3 to read its frames as the slices of a volume", modality=modality,
                     frames=frames)
    if frames == 1 and spatial_dims == 3:
        raise Reason("a single {modality} image: a 3D task reads volumes (a multi-frame file or a folder of slices)",
                     modality=modality)
    return pixels, spacing


def read_series(folder: Path, cfg: DicomConfig, notes: list[str],
                meta: dict | None = None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A folder of single-slice DICOM files -> (3D array in slice order, spacing); the slices are
    ordered by their position along the scan axis (else by InstanceNumber)."""
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with captured(notes):
                ds = read_dataset(path)
                pixels = _view(_decode(ds), ds, cfg, meta)
        except ValueError as exc:
            raise Reason("slice {slice}: {reason}", slice=path.name, reason=text_of(exc)) from None
        if pixels.ndim != 2:
            raise Reason("slice {slice}: a multi-frame file inside a series folder; export single slices", slice=path.name)
        position = ds.get("ImagePositionPatient")
        order = float(position[2]) if position else float(ds.get("InstanceNumber", len(slices)))
        spacing = tuple(float(v) for v in ds.get("PixelSpacing", []) or []) + (float(ds.get("SliceThickness", 0) or 0),)
        slices.append((order, pixels, spacing))
    if not slices:
        raise Reason("empty series folder")
    shapes = {s[1].shape for s in slices}
    if len(shapes) > 1:
        raise Reason("slices of different sizes {sizes}", sizes=sorted(shapes))
    slices.sort(key=lambda s: s[0])
    return np.stack([s[1] for s in slices]), slices[0][2] if len(slices[0][2]) == 3 else None
