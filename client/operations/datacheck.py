"""What `client check-data` and the hospital console's data page show: counts per class (or
finding) and split, image sizes, spacing, decoder notes and every file that cannot be used, with
its reason. Local only: file names appear here, and nothing of this is sent."""

from __future__ import annotations

import time
from collections import Counter

from pydantic import BaseModel

from medimaging.files import decode, item_name
from medimaging.items import Problem

from client.config import SiteConfig

MASKS = "images with a mask"


class DataCheck(BaseModel):
    site: str
    checked_at: float
    usable: int
    row_label: str  # "class", or "finding" (multi-label)
    splits: list[str]
    rows: list[tuple[str, list[int]]]  # (class, count per split)
    mask_labels: list[str] = []
    sizes: list[tuple[str, int]] = []  # ("28x28", files), most common first
    spacing: tuple[float, float, int] | None = None  # (min, max mm, files with spacing)
    notes: list[tuple[str, str]] = []  # (file, what the decoder said)
    problems: list[Problem] = []  # each file that cannot be used, and why (medimaging/files.Problem: any language)


def check(site: SiteConfig) -> DataCheck:
    """Read every image the site names (the cache is not written); ValueError where the data
    section cannot be read at all."""
    decoded = decode(site.data, write_cache=False)
    inv = decoded.inventory
    bad = {p.file for p in inv.problems}
    usable = [i for i in inv.items if item_name(site.data, i.path) not in bad]

    def names(item) -> list[str]:
        return [MASKS] if item.mask is not None else item.label if isinstance(item.label, list) else [item.label]

    counts = Counter((name, i.split or "unsplit") for i in usable for name in names(i))
    splits = sorted({s for _, s in counts} or {"unsplit"})
    masks = any(i.mask is not None for i in inv.items)
    rows = [MASKS] if masks else inv.classes
    sizes = Counter("x".join(map(str, k)) for k in decoded.shapes.values())
    spacing = [v[0] for v in decoded.spacings.values()]
    return DataCheck(
        site=site.site, checked_at=time.time(), usable=len(usable),
        row_label="finding" if site.data.multilabel else "class", splits=splits,
        rows=[(c, [counts.get((c, s), 0) for s in splits]) for c in rows],
        mask_labels=list(inv.classes) if masks else [], sizes=sizes.most_common(5),
        spacing=(min(spacing), max(spacing), len(spacing)) if spacing else None,
        notes=[(f, n) for f, notes in decoded.notes.items() for n in notes],
        problems=list(inv.problems))
