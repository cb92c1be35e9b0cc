"""Loading pipeline throughput: images/s decoding DICOM and PNG exports into the training
cache (cold), and reopening them from the cache (warm), in one run; the same in volumes/s for
NIfTI volumes and DICOM series (one file per slice).

    python -m benchmarks.loading [--images 600] [--side 512] [--volumes 40] [--slices 48] [--syntax-images 100]

Then images/s cold for each DICOM transfer syntax (medimaging.dicomgen's test pattern, 512x512,
12-bit; 8-bit for JPEG Baseline), with aseanfl's decoders (pylibjpeg's plug-ins; pyjpegls for
JPEG-LS), and with python-gdcm alone where it is installed (`pip install python-gdcm` to compare).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medimaging.config import FilesConfig
from medimaging.datasets import load_npz
from medimaging.files import decode
from medimaging.synthetic import synthetic_dicom


def _export(root: Path, kind: str, n: int, side: int, slices: int = 0) -> None:
    rng = np.random.default_rng(0)
    if slices:
        return _volumes(root, kind, n, side, slices, rng)
    for i in range(n):
        img = rng.integers(0, 4095 if kind == "dicom" else 255, (side, side)).astype(np.uint16 if kind == "dicom" else np.uint8)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "dicom":
            synthetic_dicom(folder / f"{i}.dcm", img // 16, {"PatientID": f"P{i}"})
        else:
            Image.fromarray(img).save(folder / f"{i}.png")


def _volumes(root: Path, kind: str, n: int, side: int, slices: int, rng: np.random.Generator) -> None:
    import nibabel as nib

    for i in range(n):
        vol = rng.integers(0, 4095, (slices, side, side)).astype(np.uint16)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "nifti":
            nib.save(nib.Nifti1Image(vol.astype(np.int16), np.eye(4)), folder / f"{i}.nii.gz")
            continue
        for z in range(slices):
            synthetic_dicom(folder / f"s{i}" / f"IM{z:04d}", vol[z] // 16, {"PatientID": f"P{i}", "ImagePositionPatient": [0, 0, z]})


def _measure(kind: str, n: int, side: int, slices: int, size: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "export"
        _export(root, kind, n, side, slices)
        cfg = FilesConfig(root=root, cache_dir=Path(tmp) / "cache", image_size=size, spatial_dims=3 if slices else 2)
        t = time.perf_counter()
        decoded = decode(cfg)
        assert not decoded.inventory.problems, decoded.inventory.problems[:3]
        cold = n / (time.perf_counter() - t)
        t = time.perf_counter()
        load_npz.__wrapped__(str(decode(cfg).cache))  # past the in-process cache: from disk
        return cold, n / (time.perf_counter() - t)


def _syntax_rate(syntax: str, n: int, side: int, plugin: str = "") -> float | None:
    """Images/s reading (header, decode, Modality LUT, window) files in one transfer syntax."""
    from medimaging import dicomgen
    from medimaging.dicom import DicomConfig, read_dicom

    pixels = dicomgen.test_pattern(side, side)
    if syntax in dicomgen.EIGHT_BIT:
        pixels = (pixels // 16).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [dicomgen.write(Path(tmp) / f"IM{i:04d}", pixels, syntax) for i in range(n)]
        plugin = "" if syntax in dicomgen.NATIVE else plugin
        if plugin:
            from pydicom.pixels import get_decoder

            decoder = get_decoder(dicomgen.SYNTAXES[syntax][0])
            if plugin not in decoder.available_plugins:
                return None
            saved = dict(decoder._available)
            for name in list(decoder.available_plugins):
                if name != plugin:
                    decoder.remove_plugin(name)
        t = time.perf_counter()
        try:
            for path in paths:
                read_dicom(path, 2, DicomConfig(), [])
        except ValueError:
            return None
        finally:
            if plugin:
                decoder._available.update(saved)
        return n / (time.perf_counter() - t)


def _syntaxes(n: int, side: int) -> None:
    from importlib.util import find_spec

    from medimaging import dicomgen

    gdcm = find_spec("gdcm") is not None
    print(f"\n{n} DICOM files of {side}x{side} per transfer syntax, read cold (images/s)")
    print("| transfer syntax | aseanfl's decoders (pylibjpeg, pyjpegls) |" + (" python-gdcm |" if gdcm else "") + "\n|---|---|" + ("---|" if gdcm else ""))
    for syntax, (uid, lossless) in dicomgen.SYNTAXES.items():
        default = _syntax_rate(syntax, n, side, "pyjpegls" if syntax.startswith("jpeg-ls") else "pylibjpeg")
        row = f"| {syntax} ({'lossless' if lossless else 'lossy'}) | {default:.0f} |"
        if gdcm:
            other = _syntax_rate(syntax, n, side, "gdcm") if syntax not in dicomgen.NATIVE else default
            row += " no plug-in for it |" if other is None else f" {other:.0f} |"
        print(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--side", type=int, default=512, help="native image side (a chest X-ray export is larger)")
    ap.add_argument("--volumes", type=int, default=40)
    ap.add_argument("--slices", type=int, default=48, help="slices per volume, each --vside square")
    ap.add_argument("--vside", type=int, default=256)
    ap.add_argument("--syntax-images", type=int, default=100, help="files per DICOM transfer syntax")
    args = ap.parse_args()
    print(f"{args.images} images of {args.side}x{args.side}, decoded to 64x64; {args.volumes} volumes of "
          f"{args.slices}x{args.vside}x{args.vside}, decoded to 32^3")
    print("| format | cold (decode + cache) | warm (cache hit + load) | ratio |\n|---|---|---|---|")
    for kind in ("dicom", "png"):
        cold, warm = _measure(kind, args.images, args.side, 0, 64)
        print(f"| {kind} (images/s) | {cold:.0f} | {warm:.0f} | {warm / cold:.0f}x |")
    for kind in ("nifti", "dicom series"):
        cold, warm = _measure(kind, args.volumes, args.vside, args.slices, 32)
        print(f"| {kind} (volumes/s) | {cold:.1f} | {warm:.0f} | {warm / cold:.0f}x |")
    _syntaxes(args.syntax_images, args.side)


if __name__ == "__main__":
    main()
