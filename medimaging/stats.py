"""Federated statistics (`aseanfl stats`): what a hospital releases about its data, computed at
the hospital, and how the server pools it. A fixed schema of counts, never a per-image value.

Per hospital: cases per class (finding, mask label) and split; images per modality; the
original image side, in-plane pixel spacing and slices per volume, each in fixed bins; an
intensity histogram per modality (CT in Hounsfield units from the DICOM Modality LUT, other
modalities on the training image's 0-255 scale), to which every image contributes one image's
worth spread over its bins, so a large image weighs no more than a small one; for segmentation,
each label's summed share of the voxels. Shares are integers in millionths of an image, so
pooled figures are exact sums.

Small-cell rule: a count from 1 to `min_count - 1` is withheld (zero is released: it reveals no
patient); an intensity bin or a label's coverage is withheld when fewer than `min_count` images
contribute to it. No marginal total is released beside the cells (it would give a withheld cell
away): the server sums released cells, and a pooled cell that some hospital withheld is marked a
lower bound. With `noise_epsilon`, every released value gets Laplace noise of scale
sensitivity / epsilon, where the sensitivity is what one image can change in all released fields
together (one cell per field; K finding cells for a multi-label task), and a cell is withheld
when its noised value is below the floor (the decision then costs nothing more)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from medimaging.scoring import Fixed

FIELDS = ("classes", "modality", "size", "spacing", "slices", "thickness", "intensity", "masks")
SPLITS = ("train", "validation", "test")
PPM = 1_000_000  # an image's share is counted in millionths, so shares add up exactly
SIZE_EDGES = [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0]  # px, the larger in-plane side
SPACING_EDGES = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0]  # mm, the finer in-plane spacing
SLICE_EDGES = [16.0, 32.0, 64.0, 128.0, 256.0, 512.0]  # slices per volume
THICKNESS_EDGES = [0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0]  # mm between a volume's slices
HU_EDGES = [float(v) for v in range(-1000, 3001, 100)]  # CT, Hounsfield units
LEVEL_EDGES = [float(v) for v in range(16, 256, 16)]  # other modalities: the training image's 0-255 scale
UNITS = {"HU": HU_EDGES, "level": LEVEL_EDGES}
# DICOM's defined terms for Modality (PS3.3 C.7.3.1.1.1) and the file kinds: anything else in a
# header's Modality is free text, which could name something, and is released as "other"
MODALITIES = {"CR", "CT", "DX", "ES", "IO", "MG", "MR", "NM", "OCT", "OP", "OT", "PT", "PX", "RF", "RG", "SC", "US",
              "XA", "XC", "DICOM", "PNG", "JPEG", "TIFF", "NIfTI", "npz", "synthetic"}


class Cell(Fixed):
    value: float | None = None
    withheld: str | None = None  # why not released (a hospital), or why a pooled value is a lower bound


class Histogram(Fixed):
    unit: str  # px, mm, slices, HU, level
    edges: list[float]  # inner edges: the first bin is below edges[0], the last at or above edges[-1]
    counts: list[Cell]  # images (intensity: millionths of an image)


class SiteStats(Fixed):
    """What one hospital releases about its data (or the pooled figures, in the same shape)."""

    task: str  # classification | multilabel | segmentation
    classes: list[str]  # the federation's names, in the hospital's label order
    min_count: int = Field(ge=1)
    noise_scale: float | None = None  # Laplace scale of every released value; None: exact
    withheld_fields: list[str] = Field(default_factory=list)  # fields the hospital does not release (site.yaml)
    cases: dict[str, list[Cell]] | None = None  # split -> per class
    modality: dict[str, Cell] | None = None
    size: Histogram | None = None
    spacing: Histogram | None = None
    slices: Histogram | None = None
    thickness: Histogram | None = None  # volumes: mm between slices
    intensity: dict[str, Histogram] | None = None  # modality -> histogram
    masks: list[Cell] | None = None  # per label: summed share of voxels (millionths of an image)


def image_hist(values: np.ndarray, edges: list[float]) -> list[int]:
    """One image's intensity histogram as millionths of the image per bin (sums to PPM, exactly)."""
    counts = np.bincount(np.searchsorted(edges, np.ravel(values), side="right"), minlength=len(edges) + 1)
    return shares(counts)


def shares(counts: np.ndarray) -> list[int]:
    """Counts -> integer millionths summing to PPM (largest remainders get the rounding)."""
    exact = counts.astype(np.float64) * PPM / max(int(counts.sum()), 1)
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(out - exact)[: PPM - int(out.sum())]] += 1
    return out.tolist()


def image_meta(modality: str, shape: tuple[int, ...], dims: int, spacing, levels: np.ndarray, hu: list[int] | None,
               slice_axis: int = 0) -> dict:
    """What the hospital keeps of one decoded image for its statistics (in its decode cache's
    report, never sent): modality, side, slices, spacing and its intensity histogram.
    `slice_axis`: 0 for DICOM's (slices, rows, columns), -1 for NIfTI's (x, y, z)."""
    inplane = [float(v) for v in (spacing or [])[:2] if v]
    depth = float(spacing[2]) if dims == 3 and spacing is not None and len(spacing) > 2 and spacing[2] else None
    plane = [n for i, n in enumerate(shape) if dims == 2 or i != slice_axis % len(shape)]
    return {"modality": modality if modality in MODALITIES else "other", "side": int(max(plane)),
            "slices": int(shape[slice_axis]) if dims == 3 else None,
            "spacing": min(inplane) if inplane else None, "thickness": depth, "unit": "HU" if hu is not None else "level",
            "hist": hu if hu is not None else image_hist(levels, LEVEL_EDGES)}


def npz_meta(images: np.ndarray, dims: int, modality: str = "npz") -> list[dict]:
    """image_meta for an npz's uint8 images (MedMNIST: no header, so no spacing or modality)."""
    n = len(images)
    flat = images.reshape(n, -1)
    bins = len(LEVEL_EDGES) + 1
    idx = np.searchsorted(LEVEL_EDGES, flat, side="right") + bins * np.arange(n)[:, None]
    counts = np.bincount(idx.ravel(), minlength=n * bins).reshape(n, bins)
    shape = images.shape[1:1 + dims]
    return [{"modality": modality, "side": int(max(shape[-2:])), "slices": int(shape[0]) if dims == 3 else None,
             "spacing": None, "thickness": None, "unit": "level", "hist": shares(c)} for c in counts]


def _class_counts(y: np.ndarray, task: str, k: int) -> np.ndarray:
    if task == "multilabel":
        return y.reshape(len(y), -1).sum(0).astype(np.int64)
    if task == "segmentation":
        flat = y.reshape(len(y), -1)
        return np.array([(flat == c).any(1).sum() for c in range(k)], dtype=np.int64)
    return np.bincount(y.reshape(-1).astype(np.int64), minlength=k)[:k]


def _coverage(masks: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(summed share of each label's voxels in millionths, images holding the label)."""
    share, images = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for m in masks:
        counts = np.bincount(m.reshape(-1).astype(np.int64), minlength=k)[:k]
        share += np.asarray(shares(counts))
        images += counts > 0
    return share, images


class _Release:
    """The small-cell rule and the noise, for one hospital's reply."""

    def __init__(self, floor: int, scale: float | None, rng: np.random.Generator | None):
        self.floor, self.scale, self.rng = floor, scale, rng
        self.why = f"fewer than {floor}"

    def cell(self, value: float, contributors: int | None = None, unit: float = 1.0) -> Cell:
        """`value` in `unit`s of an image; `contributors`: images behind it (default: the value)."""
        if self.scale is not None:
            noisy = float(value) / unit + float(self.rng.laplace(0.0, self.scale))
            return Cell(withheld=self.why) if noisy < self.floor else Cell(value=round(noisy * unit, 3))
        behind = int(value) if contributors is None else int(contributors)
        return Cell(withheld=self.why) if 0 < behind < self.floor else Cell(value=float(value))

    def hist(self, values, edges: list[float], unit: str) -> Histogram:
        counts = np.bincount(np.searchsorted(edges, np.asarray(values, np.float64), side="right"), minlength=len(edges) + 1)
        return Histogram(unit=unit, edges=edges, counts=[self.cell(c) for c in counts])


def sensitivity(task: str, k: int, fields: list[str]) -> float:
    """What adding or removing one image changes, summed over the released fields (L1)."""
    per = {"classes": k if task in ("multilabel", "segmentation") else 1, "masks": 1 if task == "segmentation" else 0}
    return float(sum(per.get(f, 1) for f in fields))


def site_stats(task: str, classes: list[str], labels: dict[str, np.ndarray], meta: list[dict], *, min_count: int,
               release: list[str] | None = None, noise_epsilon: float | None = None,
               rng: np.random.Generator | None = None) -> SiteStats:
    """One hospital's statistics: `labels` per split (class indices, 0/1 findings or masks),
    `meta` per image (image_meta), `release` the fields it gives (default all)."""
    k = len(classes)
    fields = [f for f in FIELDS if f in (release if release is not None else FIELDS)]
    if task != "segmentation" and "masks" in fields:
        fields.remove("masks")
    scale = sensitivity(task, k, fields) / noise_epsilon if noise_epsilon else None
    rel = _Release(min_count, scale, rng if rng is not None else np.random.default_rng())
    out = SiteStats(task=task, classes=list(classes), min_count=min_count, noise_scale=scale,
                    withheld_fields=[f for f in FIELDS if f not in fields and not (f == "masks" and task != "segmentation")])
    if "classes" in fields:
        out.cases = {s: [rel.cell(c) for c in _class_counts(y, task, k)] for s, y in labels.items()}
    if "modality" in fields:
        names = sorted({m["modality"] for m in meta})
        out.modality = {n: rel.cell(sum(m["modality"] == n for m in meta)) for n in names}
    if "size" in fields:
        out.size = rel.hist([m["side"] for m in meta], SIZE_EDGES, "px")
    if "spacing" in fields and any(m["spacing"] for m in meta):
        out.spacing = rel.hist([m["spacing"] for m in meta if m["spacing"]], SPACING_EDGES, "mm")
    if "slices" in fields and any(m["slices"] for m in meta):
        out.slices = rel.hist([m["slices"] for m in meta if m["slices"]], SLICE_EDGES, "slices")
    if "thickness" in fields and any(m.get("thickness") for m in meta):
        out.thickness = rel.hist([m["thickness"] for m in meta if m.get("thickness")], THICKNESS_EDGES, "mm")
    if "intensity" in fields:
        out.intensity = {}
        for name in sorted({m["modality"] for m in meta}):
            mine = [m for m in meta if m["modality"] == name]
            unit = mine[0]["unit"]
            hists = np.array([m["hist"] for m in mine if m["unit"] == unit], dtype=np.int64)
            behind = (hists > 0).sum(0)
            out.intensity[name] = Histogram(unit=unit, edges=UNITS[unit], counts=[
                rel.cell(v, int(b), PPM) for v, b in zip(hists.sum(0), behind, strict=True)])
    if "masks" in fields:
        share, images = _coverage([m for y in labels.values() for m in y], k)
        out.masks = [rel.cell(s, int(i), PPM) for s, i in zip(share, images, strict=True)]
    return out


def _sum(cells: list[Cell | None]) -> Cell:
    """Pooled: the sum of what was released; a lower bound where a hospital withheld its cell."""
    released = [c.value for c in cells if c is not None and c.value is not None]
    missing = sum(1 for c in cells if c is None or c.value is None)
    value = float(sum(released)) if released else None
    return Cell(value=value, withheld=f"lower bound: {missing} hospital(s) withheld it" if missing else None)


def _pool_hist(hists: list[Histogram | None]) -> Histogram | None:
    present = [h for h in hists if h is not None]
    if not present:
        return None
    first = present[0]
    return Histogram(unit=first.unit, edges=first.edges, counts=[
        _sum([h.counts[i] if h is not None else None for h in hists]) for i in range(len(first.counts))])


def pool(sites: list[SiteStats]) -> SiteStats:
    """The pooled figures of hospitals that agree on the classes (pooled by class name)."""
    classes = sites[0].classes
    out = SiteStats(task=sites[0].task, classes=classes, min_count=max(s.min_count for s in sites),
                    noise_scale=max((s.noise_scale or 0 for s in sites), default=0) or None)
    splits = [sp for sp in SPLITS if any(s.cases and sp in s.cases for s in sites)]
    if any(s.cases for s in sites):
        out.cases = {sp: [_sum([s.cases[sp][s.classes.index(c)] if s.cases and sp in s.cases else None for s in sites])
                           for c in classes] for sp in splits}
    if any(s.modality for s in sites):
        names = sorted({n for s in sites for n in (s.modality or {})})
        out.modality = {n: _sum([(s.modality or {}).get(n) for s in sites]) for n in names}
    for f in ("size", "spacing", "slices", "thickness"):
        setattr(out, f, _pool_hist([getattr(s, f) for s in sites]))
    if any(s.intensity for s in sites):
        names = sorted({n for s in sites for n in (s.intensity or {})})
        out.intensity = {n: _pool_hist([(s.intensity or {}).get(n) for s in sites]) for n in names}
    if any(s.masks for s in sites):
        out.masks = [_sum([s.masks[i] if s.masks else None for s in sites]) for i in range(len(classes))]
    return out


def quantiles(hist: Histogram, qs=(0.05, 0.5, 0.95)) -> list[float | None]:
    """Quantiles read off a histogram's released bins (linear within a bin; the open first and
    last bins are read as their inner edge)."""
    counts = np.array([c.value or 0.0 for c in hist.counts], dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return [None for _ in qs]
    edges = hist.edges
    lows = [edges[0]] + list(edges)
    highs = list(edges) + [edges[-1]]
    cum = np.concatenate([[0.0], np.cumsum(counts)]) / total
    out = []
    for q in qs:
        i = int(min(np.searchsorted(cum, q, side="left") - 1, len(counts) - 1))
        i = max(i, 0)
        inside = (q - cum[i]) / (cum[i + 1] - cum[i]) if cum[i + 1] > cum[i] else 0.0
        out.append(float(lows[i] + inside * (highs[i] - lows[i])))
    return out
