"""MONAI, loaded without its optional BERT. Import this module before any `monai` import.

`import monai` loads every MONAI network, and its Transchex network imports Hugging Face
transformers' BERT when transformers is installed, as it is here (PEFT needs it for adapters).
That is 2.3 s of a 5 s import on this machine, in every process that touches images: each
hospital worker, each simulated hospital, `aseanfl client check-data`. aseanfl never builds a
Transchex, so MONAI is loaded with transformers marked missing (a None entry in sys.modules
makes `import transformers` fail, which MONAI's optional_import records as "not installed");
the mark is removed right after, so PEFT imports the real transformers when adapters are used."""

from __future__ import annotations

import sys

if "monai" not in sys.modules:
    _hide = "transformers" not in sys.modules
    if _hide:
        sys.modules["transformers"] = None  # type: ignore[assignment]
    try:
        import monai  # noqa: F401
    finally:
        if _hide:
            del sys.modules["transformers"]
