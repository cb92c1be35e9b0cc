"""Fonts for plots in the region's scripts. matplotlib's default font (DejaVu Sans) has Latin,
Vietnamese and Malay/Indonesian glyphs, not Thai, Khmer, Myanmar or Chinese ones; those come from
font packages a machine installs (Debian: fonts-noto-core for Thai, Khmer and Myanmar,
fonts-noto-cjk for Chinese; fonts-thai-tlwg and fonts-khmeros also serve). Plots are drawn with
the reader's script's font first and the others after it (a hospital's name may be in another
script), DejaVu Sans for Latin. Where no installed font has the language's glyphs, the plot's labels
are drawn in English instead of as empty boxes, with one warning naming the package to install."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import lru_cache

from common.i18n import current, set_language

log = logging.getLogger("aseanfl")

# language -> (font families in order of preference, characters they must have, the package to install)
SCRIPTS = {
    "th": (["Noto Sans Thai", "Noto Sans Thai Looped", "Loma", "Garuda", "Norasi"], "ภาพรอบการ", "fonts-noto-core"),
    "km": (["Noto Sans Khmer", "Khmer OS", "Khmer OS System", "Khmer OS Content"], "រូបភាពជុំ", "fonts-noto-core"),
    "my": (["Noto Sans Myanmar", "Padauk", "Myanmar Text"], "ပုံအကြိမ်", "fonts-noto-core"),
    "zh_Hans": (["Noto Sans CJK SC", "Noto Sans SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei"], "图像轮次数据", "fonts-noto-cjk"),
}
BASE = "DejaVu Sans"
_warned: set[str] = set()


def _covers(family: str, sample: str) -> bool:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    try:
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        charmap = FT2Font(path).get_charmap()
    except (ValueError, RuntimeError, OSError):
        return False
    return all(ord(c) in charmap for c in sample)


@lru_cache(maxsize=1)
def _add_new_system_fonts() -> int:
    """Fonts installed after matplotlib cached its font list (its cache is kept across processes,
    so a font package installed after the first plot would never be seen): add the files on disk
    it does not know. Returns how many were added."""
    from matplotlib import font_manager

    known = {entry.fname for entry in font_manager.fontManager.ttflist}
    added = 0
    for path in font_manager.findSystemFonts():
        if path not in known:
            try:
                font_manager.fontManager.addfont(path)
                added += 1
            except (RuntimeError, OSError, ValueError):
                continue
    return added


@lru_cache(maxsize=None)
def font_for(lang: str) -> str | None:
    """The first installed family that has the language's glyphs (None: the language needs none
    beyond DejaVu Sans, or no installed font has them)."""
    families, sample, _ = SCRIPTS.get(lang, ([], "", ""))
    found = next((f for f in families if _covers(f, sample)), None)
    if found is None and families and _add_new_system_fonts():
        found = next((f for f in families if _covers(f, sample)), None)
    return found


def families(lang: str) -> list[str] | None:
    """The font list for plots in `lang`, or None where its script has no installed font."""
    if lang in SCRIPTS and font_for(lang) is None:
        return None
    first = [font_for(lang)] if lang in SCRIPTS else []
    others = [font_for(other) for other in SCRIPTS if other != lang and font_for(other)]
    return [*first, BASE, *others]  # Latin from DejaVu Sans; another script's glyphs from its own font


@contextmanager
def labels_for():
    """Plots drawn inside speak the current language in a font that has its glyphs, or English
    (one warning per language and process) where none is installed."""
    import matplotlib

    lang = current()
    fonts = families(lang)
    if fonts is None:
        if lang not in _warned:
            _warned.add(lang)
            log.warning("no installed font has %s glyphs (install %s); the plots' labels are in English", lang,
                        SCRIPTS[lang][2])
        set_language("en")
        try:
            with matplotlib.rc_context({"font.family": families("en")}):
                yield
        finally:
            set_language(lang)
        return
    with matplotlib.rc_context({"font.family": fonts}):
        yield
