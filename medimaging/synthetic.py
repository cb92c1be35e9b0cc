"""Deterministic synthetic 'lesion present / absent' images (or volumes), and images (or
volumes) with lesion masks for segmentation, with per-hospital differences.

Each hospital gets a scanner profile (native resolution, contrast, brightness, noise, blur),
its own class prevalence and its own size, so a simulated federation is non-IID the way a real
one is. Nothing is downloaded; the same (seed, site index) always gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

import numpy as np

SIZE_FACTORS = (1.5, 1.0, 1.25, 0.75, 1.75, 0.6)
PREVALENCES = (0.35, 0.5, 0.25, 0.45, 0.3, 0.55)
RESOLUTIONS = (32, 28, 40, 32, 24, 36)


@dataclass(frozen=True)
class ScannerProfile:
    """How one hospital's images differ from the others'."""

    size_factor: float
    prevalence: float
    resolution: int
    gain: float
    offset: float
    noise: float
    blur: float


def site_profile(site_index: int) -> ScannerProfile:
    """The fixed profile of the i-th simulated hospital (cycles after six, with a twist)."""
    rng = np.random.default_rng(10_000 + site_index)
    k = site_index % len(SIZE_FACTORS)
    return ScannerProfile(
        size_factor=SIZE_FACTORS[k],
        prevalence=PREVALENCES[k],
        resolution=RESOLUTIONS[k],
        gain=float(rng.uniform(0.75, 1.25)),
        offset=float(rng.uniform(-0.1, 0.1)),
        noise=float(rng.uniform(0.03, 0.08)),
        blur=float(rng.uniform(0.0, 1.0)),
    )


def _smooth(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur along the last two axes (scanner point-spread)."""
    if sigma < 0.3:
        return images
    radius = int(np.ceil(2 * sigma))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    pad = [(0, 0)] * (images.ndim - 2)
    out = np.pad(images, pad + [(radius, radius), (0, 0)], mode="edge")
    out = sum(w * out[..., i : i + images.shape[-2], :] for i, w in enumerate(kernel))
    out = np.pad(out, pad + [(0, 0), (radius, radius)], mode="edge")
    return sum(w * out[..., i : i + images.shape[-1]] for i, w in enumerate(kernel))


def generate(n: int, profile: ScannerProfile, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, 1, R, R) float32 in [0, 1] and labels (n,) int64 (1 = lesion present)."""
    res = profile.resolution
    labels = (rng.random(n) < profile.prevalence).astype(np.int64)
    yy, xx = np.meshgrid(np.linspace(-1, 1, res), np.linspace(-1, 1, res), indexing="ij")
    yy, xx = yy[None], xx[None]

    def col(values: np.ndarray) -> np.ndarray:
        return values[:, None, None]

    # Textured background: a few random low-frequency waves.
    img = np.full((n, res, res), 0.3)
    for _ in range(3):
        fx, fy, ph = rng.uniform(1, 4, n), rng.uniform(1, 4, n), rng.uniform(0, 2 * np.pi, n)
        img += 0.04 * np.cos(col(fx) * np.pi * xx + col(fy) * np.pi * yy + col(ph))
    # An organ: soft-edged ellipse.
    cx, cy = rng.uniform(-0.15, 0.15, n), rng.uniform(-0.15, 0.15, n)
    rx, ry = rng.uniform(0.5, 0.7, n), rng.uniform(0.45, 0.65, n)
    ellipse = ((xx - col(cx)) / col(rx)) ** 2 + ((yy - col(cy)) / col(ry)) ** 2
    img += 0.25 / (1 + np.exp((ellipse - 1) * 12))

    def blob(amplitude: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        ang, rad = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 0.6, n)
        bx, by = cx + rad * rx * np.cos(ang), cy + rad * ry * np.sin(ang)
        d2 = (xx - col(bx)) ** 2 + (yy - col(by)) ** 2
        return col(amplitude) * np.exp(-d2 / (2 * col(sigma) ** 2))

    # Distractor present in every class: a dark cyst. Lesion (label 1): a faint bright nodule.
    img += blob(-rng.uniform(0.1, 0.25, n), rng.uniform(0.06, 0.12, n))
    img += blob(labels * rng.uniform(0.2, 0.4, n), rng.uniform(0.07, 0.12, n))
    # Scanner: blur, contrast/brightness, noise.
    return _scanner(_smooth(img, profile.blur), profile, rng)[:, None], labels


def _scanner(img: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    img = profile.gain * (img - 0.4) + 0.4 + profile.offset
    return np.clip(img + rng.normal(0, profile.noise, img.shape), 0, 1).astype(np.float32)


def volume_side(profile: ScannerProfile) -> int:
    """Native side of a hospital's volumes (smaller than its 2D images: 18 to 30 voxels)."""
    return profile.resolution * 3 // 4


def generate_volumes(n: int, profile: ScannerProfile, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` volumes (n, 1, R, R, R) float32 in [0, 1] and labels (n,): the 3D version of
    `generate` (an organ ellipsoid, a dark cyst in every volume, a faint nodule if label 1)."""
    res = volume_side(profile)
    labels = (rng.random(n) < profile.prevalence).astype(np.int64)
    axes = [a[None] for a in np.meshgrid(*[np.linspace(-1, 1, res)] * 3, indexing="ij")]

    def col(values: np.ndarray) -> np.ndarray:
        return values[:, None, None, None]

    centre = [rng.uniform(-0.15, 0.15, n) for _ in range(3)]
    radii = [rng.uniform(0.5, 0.7, n) for _ in range(3)]
    img = np.full((n, res, res, res), 0.3) + rng.normal(0, 0.02, (n, res, res, res))
    organ = sum(((a - col(c)) / col(r)) ** 2 for a, c, r in zip(axes, centre, radii))
    img += 0.25 / (1 + np.exp((organ - 1) * 12))

    def blob(amplitude: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        direction = rng.normal(size=(3, n))
        direction /= np.linalg.norm(direction, axis=0)
        reach = rng.uniform(0, 0.6, n)
        d2 = sum((a - col(c + reach * r * d)) ** 2 for a, c, r, d in zip(axes, centre, radii, direction))
        return col(amplitude) * np.exp(-d2 / (2 * col(sigma) ** 2))

    img += blob(-rng.uniform(0.1, 0.25, n), rng.uniform(0.08, 0.14, n))
    img += blob(labels * rng.uniform(0.3, 0.5, n), rng.uniform(0.1, 0.15, n))  # a nodule fills few voxels of a volume
    return _scanner(_smooth(img, profile.blur), profile, rng)[:, None], labels


def generate_masks(
    n: int, profile: ScannerProfile, rng: np.random.Generator, dims: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, 1, R, R[, R]) in [0, 1] with 1-5 round lesions each (MONAI's
    create_test_image_2d/3d: bright discs/balls on uniform noise), then this hospital's scanner;
    masks (n, R, R[, R]) int64, 1 = lesion."""
    import medimaging.monai_loader  # noqa: F401  (MONAI without BERT)
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    res = profile.resolution if dims == 2 else volume_side(profile)
    make = create_test_image_2d if dims == 2 else create_test_image_3d
    state = np.random.RandomState(int(rng.integers(2**31)))
    images, masks = [], []
    for _ in range(n):
        img, seg = make(*(res,) * dims, num_objs=int(state.randint(1, 6)), rad_max=max(4, res // 5),
                        rad_min=max(2, res // 12), noise_max=0.5, num_seg_classes=1, random_state=state)
        images.append(img)
        masks.append(seg)
    img = _scanner(_smooth(0.2 + 0.4 * np.stack(images), profile.blur), profile, rng)
    return img[:, None], np.stack(masks).astype(np.int64)


def site_images(
    site_index: int, seed: int, samples_per_site: int, test_per_site: int, task: str = "classification", dims: int = 2,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(local images, labels) of one hospital and its share of the global test split."""
    profile = site_profile(site_index)
    n_local = max(20, int(round(samples_per_site * profile.size_factor)))

    def make(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if task == "segmentation":
            return generate_masks(n, profile, rng, dims)
        return generate(n, profile, rng) if dims == 2 else generate_volumes(n, profile, rng)

    return make(n_local, np.random.default_rng([seed, site_index, 0])), make(test_per_site, np.random.default_rng([seed, site_index, 1]))


def synthetic_dicom(path: Path, pixels: np.ndarray, header: dict[str, str], spacing=(0.7, 0.7)) -> None:
    """Write 2D 8-bit pixel values as a 12-bit DICOM file with the given header values (tests, benchmarks)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in header.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = list(spacing)
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def multilabel_npz(path: Path, samples: int = 1200, test: int = 400, seed: int = 0) -> Path:
    """A MedMNIST-layout multi-label file: finding 0 = the lesion nodule, finding 1 = an
    independent thin bright line (e.g. a catheter) across the image; uint8 images, labels (N, 2)."""
    rng = np.random.default_rng([seed, 99])

    def part(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        images, lesion = generate(n, site_profile(offset % 6), rng)
        line = (rng.random(n) < 0.4).astype(np.int64)
        size = images.shape[-1]
        rows = rng.integers(size // 5, size - size // 5, n)
        for i in np.flatnonzero(line):
            images[i, 0, rows[i], :] = np.clip(images[i, 0, rows[i], :] + 0.35, 0, 1)
        pixels = (images[:, 0] * 255).round().astype(np.uint8)
        return pixels, np.stack([lesion, line], axis=1).astype(np.uint8)

    train_x, train_y = part(samples, 0)
    test_x, test_y = part(test, 0)
    np.savez(path, train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y)
    return path
