"""What a hospital's export is made of, before any pixel is read: the items found (a file or a
DICOM series with its label and split) and the problems found, each naming its file. Shared by
files.py (folders and manifests) and dicomweb.py (a PACS), which both build an Inventory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.i18n import Text, text_of

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".dcm": "dicom",
                  ".dicom": "dicom", ".ima": "dicom", ".nii": "nifti", ".gz": "nifti"}
SPLITS = ("train", "val", "test")  # "val" rows train: each site splits its own validation


def bad_split(split: str) -> Text | None:
    """Why a manifest's split cell is wrong, or None (empty: no split given)."""
    return Text("split '{split}' is not one of {splits}", split=split, splits=", ".join(SPLITS)) if split and split not in SPLITS else None


@dataclass
class Item:
    path: Path  # a file, or a folder of DICOM slices (a series)
    label: str | list[str] | None  # class, findings (multi-label), or None (segmentation)
    split: str | None
    mask: Path | None = None


@dataclass
class Problem:
    """A file that cannot be used: `reason` in English, `text` the same message for any language
    (common/i18n.py; kept in the decode cache's report as JSON)."""

    file: str
    reason: str
    text: dict | None = None

    @classmethod
    def of(cls, file: str, why) -> "Problem":
        text = why if isinstance(why, Text) else text_of(why)
        return cls(file, str(text), text.to_json())

    def shown(self, lang: str | None = None) -> str:
        return Text.from_json(self.text).render(lang) if self.text else self.reason


@dataclass
class Inventory:
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def file_kind(path: Path) -> str | None:
    """dicom, nifti, png, jpeg or tiff, by the name (or a DICOM preamble); None: not an image."""
    if path.name.lower().endswith(".nii.gz"):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return None
    if suffix in IMAGE_SUFFIXES:
        return IMAGE_SUFFIXES[suffix]
    # PACS exports often lack .dcm, or are named by their UID (1.2.840...77.5): the name or content says DICOM
    if suffix == "" or suffix[1:].isdigit():
        return "dicom"
    try:
        with path.open("rb") as f:
            return "dicom" if f.read(132)[128:] == b"DICM" else None
    except OSError:
        return None
