"""Loading pipeline throughput: images/s decoding DICOM and PNG exports into the training
cache (cold), and reopening them from the cache (warm), in one run.

    python -m benchmarks.loading [--images 600] [--side 512]
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


def _export(root: Path, kind: str, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 4095 if kind == "dicom" else 255, (side, side)).astype(np.uint16 if kind == "dicom" else np.uint8)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "dicom":
            synthetic_dicom(folder / f"{i}.dcm", img // 16, {"PatientID": f"P{i}"})
        else:
            Image.fromarray(img).save(folder / f"{i}.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--side", type=int, default=512, help="native image side (a chest X-ray export is larger)")
    args = ap.parse_args()
    print(f"{args.images} images of {args.side}x{args.side}, decoded to 64x64; images/s")
    print("| format | cold (decode + cache) | warm (cache hit + load) | ratio |\n|---|---|---|---|")
    for kind in ("dicom", "png"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "export"
            _export(root, kind, args.images, args.side)
            cfg = FilesConfig(root=root, cache_dir=Path(tmp) / "cache")
            t = time.perf_counter()
            decode(cfg)
            cold = args.images / (time.perf_counter() - t)
            t = time.perf_counter()
            load_npz.__wrapped__(str(decode(cfg).cache))  # past the in-process cache: from disk
            warm = args.images / (time.perf_counter() - t)
        print(f"| {kind} | {cold:.0f} | {warm:.0f} | {warm / cold:.0f}x |")


if __name__ == "__main__":
    main()
