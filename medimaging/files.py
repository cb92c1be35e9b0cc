"""Hospital exports as training data: DICOM, NIfTI, PNG/JPEG files, labelled by a CSV manifest
(`path,label[,split]`) or by folder (`<root>/<class>/...`, optionally `<root>/<split>/<class>/...`).
Also multi-label manifests (`label` = findings joined by '|'), segmentation manifests
(`path,mask[,split]`: a mask file of integer labels per image), and volumes (`spatial_dims: 3`:
a NIfTI file, a multi-frame DICOM file or a folder of DICOM slices per item).

Only pixel arrays and labels come out of here: a DICOM header is read by pydicom inside
`read_pixels` and dropped there. Every file that cannot be used is listed with the reason; none
is dropped silently. Decoded images are cached as one MedMNIST-layout .npz (keyed by the files'
names, sizes, modification times and labels), so later runs and rounds do not decode again.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.i18n import Reason, Text

from medimaging.config import FilesConfig

from medimaging.items import SPLITS, Inventory, Item, Problem, bad_split
from medimaging.pixels import _resize, _to_uint8, read_mask, read_pixels
from medimaging.stats import shares, image_meta


NO_FINDING = "none"  # a multi-label row without findings


def _exists(cfg: FilesConfig, path: Path) -> bool:
    return path.is_file() or (cfg.spatial_dims == 3 and path.is_dir())  # a volume may be a series folder


def _manifest(cfg: FilesConfig, inv: Inventory) -> None:
    with cfg.manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        segmentation = "mask" in columns
        if "path" not in columns or not ({"label", "mask"} & columns):
            raise Reason("{manifest}: needs a header with columns path,label[,split] (or path,mask[,split] for "
                         "segmentation)", manifest=cfg.manifest.name)
        if segmentation and cfg.multilabel:
            raise Reason("{manifest}: data.files.multilabel is for labels, not masks", manifest=cfg.manifest.name)
        for line, row in enumerate(reader, start=2):
            cell = lambda key: (row.get(key) or "").strip()  # noqa: E731
            rel, split, target = cell("path"), cell("split"), cell("mask" if segmentation else "label")
            where = f"{cfg.manifest.name}:{line}"
            if not rel or not target:
                inv.problems.append(Problem.of(where, Text("empty path or mask") if segmentation else Text("empty path or label")))
            elif why := bad_split(split):
                inv.problems.append(Problem.of(where, why))
            elif not _exists(cfg, cfg.root / rel):
                inv.problems.append(Problem.of(rel, Text("listed in {where} but missing", where=where)))
            elif segmentation and not (cfg.root / target).is_file():
                inv.problems.append(Problem.of(target, Text("mask listed in {where} but missing", where=where)))
            elif segmentation:
                inv.items.append(Item(cfg.root / rel, None, split or None, cfg.root / target))
            elif cfg.multilabel:
                findings = [] if target.lower() == NO_FINDING else [t.strip() for t in target.split("|") if t.strip()]
                inv.items.append(Item(cfg.root / rel, findings, split or None))
            else:
                inv.items.append(Item(cfg.root / rel, target, split or None))


def _walk(cfg: FilesConfig, inv: Inventory) -> list[Path]:
    """Every file under root, following links to folders (a class folder may live on another
    mount) once each; a broken link, a link loop or an unreadable folder is a problem, not skipped."""
    files, seen = [], set()
    name = lambda path: item_name(cfg, path)  # noqa: E731

    def visit(folder: Path) -> None:
        real = folder.resolve()
        if real in seen:
            inv.problems.append(Problem.of(name(folder), Text("a link loop: this folder links back to one already read")))
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            inv.problems.append(Problem.of(name(folder), Text("folder cannot be read ({error})", error=exc.strerror)))
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):  # hidden files, and a cache kept inside root
                continue
            if entry.is_symlink() and not path.exists():
                target = os.readlink(path)
                why = Text("a link loop") if _loops(path) else Text(
                    "a broken link (its target {target} does not exist)", target=target)
                inv.problems.append(Problem.of(name(path), why))
            elif entry.is_dir():
                visit(path)
            elif entry.is_file():
                files.append(path)

    visit(cfg.root)
    return files


def _loops(path: Path) -> bool:
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return True
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _folders(cfg: FilesConfig, inv: Inventory) -> None:
    if cfg.multilabel:
        raise Reason("data.files.multilabel needs a manifest (a folder per class gives one label per image)")
    seen: set[Path] = set()
    for path in _walk(cfg, inv):
        parts = path.relative_to(cfg.root).parts
        split = parts[0] if len(parts) >= 3 and parts[0] in SPLITS else None
        label_parts = parts[1:] if split else parts
        if len(label_parts) < 2:
            inv.problems.append(Problem.of(str(path.relative_to(cfg.root)), Text("not inside a class folder")))
            continue
        if cfg.spatial_dims == 3 and len(label_parts) >= 3:  # <class>/<series folder>/<slice>: one volume
            path = cfg.root.joinpath(*parts[: len(parts) - len(label_parts) + 2])
            if path in seen:
                continue
            seen.add(path)
        inv.items.append(Item(path, label_parts[0], split))


def inventory(cfg: FilesConfig) -> Inventory:
    """Every labelled file, and every problem with the labels (unknown class or finding, missing file)."""
    inv = Inventory()
    if cfg.dicomweb is not None:
        from medimaging.dicomweb import pacs_inventory

        pacs_inventory(cfg, inv)
    elif not cfg.root.is_dir():
        raise Reason("data.files.root: folder not found: {path}", path=str(cfg.root))
    elif cfg.manifest is not None:
        if not cfg.manifest.is_file():
            raise Reason("data.files.manifest: file not found: {path}", path=str(cfg.manifest))
        _manifest(cfg, inv)
    else:
        _folders(cfg, inv)
    if any(i.mask is not None for i in inv.items):  # segmentation: classes are mask labels, named or counted later
        inv.classes = list(cfg.classes or [])
        return inv
    names = lambda item: item.label if isinstance(item.label, list) else [item.label]  # noqa: E731
    inv.classes = list(cfg.classes) if cfg.classes else sorted({n for i in inv.items for n in names(i)})
    kept = []
    for item in inv.items:
        unknown = [n for n in names(item) if n not in inv.classes]
        if unknown:
            why = (Text("unknown finding '{name}' (findings: {names})", name=unknown[0], names=", ".join(inv.classes))
                   if cfg.multilabel else
                   Text("unknown class '{name}' (classes: {names})", name=unknown[0], names=", ".join(inv.classes)))
            inv.problems.append(Problem.of(item_name(cfg, item.path), why))
        else:
            kept.append(item)
    inv.items = kept
    return inv


def base(cfg: FilesConfig) -> Path:
    """The folder the items' names are relative to: root, or the store of instances from the PACS."""
    if cfg.dicomweb is not None:
        from medimaging.dicomweb import store_of

        return store_of(cfg)
    return cfg.root


def item_name(cfg: FilesConfig, path: Path) -> str:
    """How reports name an item: its path under root, or "study <uid>[, instance <uid>]" from the PACS."""
    try:
        name = str(path.relative_to(base(cfg)))
    except ValueError:
        return str(path)
    if cfg.dicomweb is not None:  # <key>-<uid>/<instance uid> -> "study <uid>, instance <uid>"
        row, _, sop = name.partition("/")
        key, _, uid = row.partition("-")
        return f"{key} {uid}" + (f", instance {sop}" if sop and key != "instance" else "")
    return name


@dataclass
class Decoded:
    inventory: Inventory
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # file -> native shape
    spacings: dict[str, tuple[float, ...]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)  # file -> what the decoders said of it
    meta: list[dict] = field(default_factory=list)  # per decoded image, for the statistics (medimaging/stats.py)
    cache: Path | None = None


def _where(cfg: FilesConfig) -> str:
    return cfg.dicomweb.url if cfg.dicomweb is not None else str(cfg.root)


def _stamp(path: Path | None) -> str:
    """Size and modification time of a file, or of every file in a series folder."""
    if path is None:
        return ""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _key(cfg: FilesConfig, inv: Inventory) -> str:
    h = hashlib.sha256(json.dumps(["stats-1", cfg.image_size, cfg.test_fraction, cfg.spatial_dims, inv.classes,
                                   cfg.dicom.model_dump(mode="json")]).encode())
    for item in inv.items:
        h.update(f"{item_name(cfg, item.path)}|{_stamp(item.path)}|{item.label}|{item.split}|{_stamp(item.mask)}\n".encode())
    return h.hexdigest()[:16]


def _target(cfg: FilesConfig, inv: Inventory, item: Item, shape: tuple[int, ...]) -> np.ndarray | int:
    """The item's training target: class index, 0/1 per finding, or the resized mask."""
    if item.mask is not None:
        mask = read_mask(item.mask, cfg.spatial_dims)
        if mask.shape != shape:
            raise Reason("its mask {mask} is {mask_shape}, the image {shape}", mask=item_name(cfg, item.mask),
                         mask_shape=list(mask.shape), shape=list(shape))
        if inv.classes and mask.max() >= len(inv.classes):
            raise Reason("its mask {mask} holds label {label}, beyond data.files.classes ({count} names, background first)",
                         mask=item_name(cfg, item.mask), label=int(mask.max()), count=len(inv.classes))
        if mask.max() > 255:
            raise Reason("its mask {mask} holds label {label} (at most 255 labels)", mask=item_name(cfg, item.mask),
                         label=int(mask.max()))
        return np.asarray(_resize(mask.astype(np.float32), cfg.image_size, "nearest").round(), dtype=np.uint8)
    if isinstance(item.label, list):
        return np.array([c in item.label for c in inv.classes], dtype=np.uint8)
    return inv.classes.index(item.label)


def _usable(labels: list, inv: Inventory, cfg: FilesConfig) -> Text | None:
    """Why these targets cannot train a model, or None."""
    if not labels:
        return Text("no usable images")
    if isinstance(labels[0], int):
        return None if len(set(labels)) >= 2 else Text("{count} class(es); training needs at least two classes",
                                                       count=len(set(labels)))
    stacked = np.stack(labels)
    if stacked.ndim == 2:  # findings
        if len(inv.classes) < 2:
            return Text("a multi-label task needs at least two findings (with one, use a label per image)")
        both = (stacked.max(0) == 1) & (stacked.min(0) == 0)
        return None if both.any() else Text("no finding is both present and absent; training needs one")
    return None if stacked.max() > 0 else Text("every mask is empty; segmentation needs some labelled voxels")


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
        out.notes, out.meta = saved.get("notes", {}), saved.get("meta", [])
        inv.classes = saved.get("classes", inv.classes)  # a segmentation's labels are counted when decoding
        return out
    images, labels, splits = [], [], []
    for item in inv.items:
        name = item_name(cfg, item.path)
        notes: list[str] = []
        meta: dict = {}
        try:
            arr, spacing = read_pixels(item.path, cfg.spatial_dims, cfg.dicom, notes, meta)
            target = _target(cfg, inv, item, arr.shape)
        except ValueError as exc:
            inv.problems.append(Problem.of(name, exc))
            continue
        finally:
            if notes:
                out.notes[name] = notes
        out.shapes[name] = arr.shape
        if spacing:
            out.spacings[name] = spacing
        images.append(_to_uint8(arr, cfg.image_size))
        hu = shares(meta["hu_counts"]) if "hu_counts" in meta else None
        out.meta.append(image_meta(meta.get("modality", "image"), arr.shape, cfg.spatial_dims, spacing, images[-1], hu,
                                   meta.get("slice_axis", 0)))
        labels.append(target)
        splits.append(item.split)
    if labels and not isinstance(labels[0], int) and labels[0].ndim >= 2 and not inv.classes:
        inv.classes = ["background"] + [f"label-{k}" for k in range(1, max(2, int(max(m.max() for m in labels)) + 1))]
    if not write_cache:
        return out
    problem = _usable(labels, inv, cfg)
    if problem is not None:
        raise Reason("data.files: {usable} usable images at {where}: {problem} ({problems} problems listed)",
                     usable=len(images), where=_where(cfg), problem=problem, problems=len(inv.problems))
    x = np.stack(images)
    y = np.asarray(labels, dtype=np.int64)[:, None] if isinstance(labels[0], int) else np.stack(labels)
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
                                  "shapes": {k: list(v) for k, v in out.shapes.items()}, "classes": inv.classes,
                                  "notes": out.notes, "meta": out.meta}))
    out.cache = cache
    return out
