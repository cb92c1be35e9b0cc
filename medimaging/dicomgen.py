"""DICOM files in every common encoding, of known pixels, as PACS systems write them: for the
tests and benchmarks (never used to read a hospital's data). Encoders: pydicom's own (RLE,
deflate, big endian), pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000) and imagecodecs for
the JPEG processes and HTJ2K, which pydicom has no encoder for (imagecodecs comes with the
`test` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# name -> (transfer syntax, lossless?)
SYNTAXES = {
    "explicit-little": ("1.2.840.10008.1.2.1", True),
    "implicit-little": ("1.2.840.10008.1.2", True),
    "explicit-big": ("1.2.840.10008.1.2.2", True),
    "deflated": ("1.2.840.10008.1.2.1.99", True),
    "rle": ("1.2.840.10008.1.2.5", True),
    "jpeg-baseline": ("1.2.840.10008.1.2.4.50", False),  # 8-bit
    "jpeg-extended": ("1.2.840.10008.1.2.4.51", False),  # 12-bit
    "jpeg-lossless": ("1.2.840.10008.1.2.4.57", True),  # process 14, predictor 6
    "jpeg-lossless-sv1": ("1.2.840.10008.1.2.4.70", True),  # process 14, selection value 1
    "jpeg-ls": ("1.2.840.10008.1.2.4.80", True),
    "jpeg-ls-near": ("1.2.840.10008.1.2.4.81", False),  # near-lossless, error <= 2
    "j2k-lossless": ("1.2.840.10008.1.2.4.90", True),
    "j2k": ("1.2.840.10008.1.2.4.91", False),
    "htj2k-lossless": ("1.2.840.10008.1.2.4.201", True),
    "htj2k": ("1.2.840.10008.1.2.4.203", False),
}
NATIVE = {"explicit-little", "implicit-little", "explicit-big", "deflated"}  # no decoder plug-in involved
EIGHT_BIT = {"jpeg-baseline"}  # stores 8 bits; the others here store 12 (greyscale)
NEAR_LOSSLESS_ERROR = 2


def test_pattern(rows: int = 64, cols: int = 48, top: int = 4095, seed: int = 0) -> np.ndarray:
    """Smooth structure plus texture (what lossy codecs are made for), values over the whole range."""
    y, x = np.mgrid[0:rows, 0:cols]
    base = (np.sin(x / 5.0) + np.cos(y / 7.0) + 2) / 4 * top
    noise = np.random.default_rng(seed).normal(0, top / 80, (rows, cols))
    return np.clip(base + noise, 0, top).astype(np.uint16)


def _frames(pixels: np.ndarray, colour: bool) -> list[np.ndarray]:
    multi = pixels.ndim == (4 if colour else 3)
    return list(pixels) if multi else [pixels]


def _encode_frame(frame: np.ndarray, syntax: str, bits: int, colour: bool) -> bytes:
    import imagecodecs

    if syntax in ("jpeg-baseline", "jpeg-extended"):
        return imagecodecs.jpeg8_encode(frame, level=92, bitspersample=bits, subsampling="422" if colour else None)
    if syntax in ("jpeg-lossless", "jpeg-lossless-sv1"):
        return imagecodecs.jpeg8_encode(frame, lossless=True, predictor=6 if syntax == "jpeg-lossless" else 1,
                                        bitspersample=bits)
    if syntax in ("htj2k-lossless", "htj2k"):
        lossless = syntax == "htj2k-lossless"
        return imagecodecs.htj2k_encode(frame, reversible=lossless)  # irreversible: the 9/7 wavelet, lossy
    raise ValueError(syntax)


def write(path: Path, pixels: np.ndarray, syntax: str = "explicit-little", *, modality: str = "OT",
          photometric: str | None = None, bits_stored: int | None = None, signed: bool = False,
          rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
          preamble: bool = True, header: dict | None = None, spacing: tuple[float, ...] = (0.7, 0.7),
          planar: int = 0) -> Path:
    """Write `pixels` ((rows, cols), (frames, rows, cols), or with a last axis of 3 for colour) as a
    DICOM file in `syntax` (a key of SYNTAXES). `preamble=False` writes raw DICOM (no preamble, no
    file meta header, implicit little endian) as some old PACS exports do."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, generate_uid

    uid, _ = SYNTAXES[syntax]
    colour = pixels.ndim >= 3 and pixels.shape[-1] == 3
    frames = _frames(pixels, colour)
    bits = bits_stored or (8 if colour or syntax in EIGHT_BIT else 12)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                                    "US": "1.2.840.10008.5.1.4.1.1.6.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
                                    "CR": "1.2.840.10008.5.1.4.1.1.1"}.get(modality, "1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(uid)
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in (header or {}).items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, modality
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid()
    ds.Rows, ds.Columns = frames[0].shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = planar
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    ds.PixelSpacing = list(spacing[:2])
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
        ds.SliceThickness = spacing[2] if len(spacing) > 2 else 1.0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    dtype = np.dtype(("i" if signed else "u") + str(ds.BitsAllocated // 8))
    frames = [np.asarray(f).astype(dtype) for f in frames]
    ds.set_original_encoding(syntax == "implicit-little" or not preamble, syntax != "explicit-big")
    if syntax in ("jpeg-baseline", "jpeg-extended", "jpeg-lossless", "jpeg-lossless-sv1", "htj2k-lossless", "htj2k"):
        if colour and syntax == "jpeg-baseline":
            ds.PhotometricInterpretation = "YBR_FULL_422"  # what a JPEG's YCbCr is called in DICOM
        ds.PixelData = encapsulate([_encode_frame(f, syntax, bits, colour) for f in frames])
        ds["PixelData"].VR = "OB"
    elif syntax in ("rle", "jpeg-ls", "jpeg-ls-near", "j2k-lossless", "j2k"):
        ds.PixelData = _native(frames, colour, planar=0)
        ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
        options = {"jls_error": NEAR_LOSSLESS_ERROR} if syntax == "jpeg-ls-near" else {}
        if syntax == "j2k":
            options = {"j2k_psnr": [60.0]}
        ds.compress(UID(uid), np.stack(frames) if len(frames) > 1 else frames[0], **options)
    else:
        ds.PixelData = _native(frames, colour, planar, big=syntax == "explicit-big")
        ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not preamble:
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    elif syntax == "explicit-big":
        ds.save_as(path, implicit_vr=False, little_endian=False)
    else:
        ds.save_as(path, enforce_file_format=True)
    return Path(path)


def _native(frames: list[np.ndarray], colour: bool, planar: int, big: bool = False) -> bytes:
    out = b""
    for f in frames:
        if colour and planar:
            f = np.moveaxis(f, -1, 0)  # RRR...GGG...BBB...
        out += (f.astype(f.dtype.newbyteorder(">")) if big else f).tobytes()
    return out


def as_modality(path: Path, image: np.ndarray, modality: str, header: dict | None = None) -> Path:
    """A float image (or volume, for MR) in [0, 1] written as that modality's scanner stores it, so
    that reading it back must apply the modality's pixel semantics to see the same picture:
    CT in Hounsfield units (stored + 1024, Rescale Intercept -1024) with a soft-tissue window that
    holds the picture; X-ray (DX) as MONOCHROME1 (inverted), JPEG Lossless; ultrasound (US) in
    colour, JPEG Baseline YBR_FULL_422; MR a multi-frame volume, RLE."""
    image = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    if modality == "CT":
        hu = np.round(image * 300 - 100)  # -100 .. 200 HU, inside the window [-160, 240]
        return write(path, (hu + 1024).astype(np.uint16), "jpeg-ls", modality="CT", rescale=(1, -1024),
                     window=(40, 400), header=header)
    if modality == "DX":
        return write(path, np.round((1 - image) * 4095).astype(np.uint16), "jpeg-lossless-sv1", modality="DX",
                     photometric="MONOCHROME1", header=header)
    if modality == "US":
        grey = np.round(image * 255)
        rgb = np.stack([grey, grey * 0.9, grey * 0.8], -1).astype(np.uint8)  # a warm-tinted B-mode display
        return write(path, rgb, "jpeg-baseline", modality="US", header=header)
    if modality == "MR":
        return write(path, np.round(image * 2000).astype(np.uint16), "rle", modality="MR",
                     spacing=(1.0, 1.0, 2.0), header=header)
    raise ValueError(f"no generator for modality {modality}")
