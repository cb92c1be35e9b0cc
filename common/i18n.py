"""What an operator reads, in their language: GNU gettext catalogs (common/locale/<lang>/
LC_MESSAGES/aseanfl.po, compiled to .mo and shipped in the package), managed with Babel.

One message per sentence, with named placeholders (`{file}`), never glued from translated
parts. The language is, in order: `--lang`, ASEANFL_LANG, a hospital's site.yaml `language`, the
locale (LANGUAGE, LC_ALL, LC_MESSAGES, LANG), English. What travels between hospital and server
stays language-neutral (codes and numbers); each side renders it in its own language.

A message that must be rendered later, or in another language than the one it was made in (a
file's skip reason kept in the decode cache, shown by `client check-data` and the console), is a
`Text` (its msgid and values); a `Reason` is a ValueError carrying one, so code that only needs
the English text (logs, tests) reads `str(exc)` as before.

Developers: `python -m common.i18n extract` (the template from the sources), `update` (merge it
into every catalog) and `compile` (the .mo files; a test fails when one is stale)."""

from __future__ import annotations

import gettext
import os
import re
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

LANGUAGES = ("en", "vi", "th", "zh_Hans", "id", "ms", "km", "my")
NAMES = {"en": "English", "vi": "Tiếng Việt", "th": "ไทย", "zh_Hans": "简体中文", "id": "Bahasa Indonesia",
         "ms": "Bahasa Melayu", "km": "ខ្មែរ", "my": "မြန်မာ"}
DOMAIN = "aseanfl"
LOCALE_DIR = Path(__file__).with_name("locale")
ENV = "ASEANFL_LANG"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

_current: list[str | None] = [None]  # None until set: then ASEANFL_LANG or the locale (a daemon's workers)
_request: ContextVar[str | None] = ContextVar("aseanfl_lang", default=None)  # a console page's reader


def N_(msgid: str) -> str:
    """Marks a msgid for extraction where it is translated later."""
    return msgid


def normalise(value: str | None) -> str | None:
    """One of LANGUAGES for a code or a locale name (th_TH.UTF-8 -> th, zh_CN -> zh_Hans), or None."""
    if not value:
        return None
    code = value.split(".")[0].split("@")[0].replace("-", "_")
    if code in ("C", "POSIX"):
        return None
    if code in LANGUAGES:
        return code
    base = code.split("_")[0].lower()
    if base == "zh":
        return "zh_Hans"
    return base if base in LANGUAGES else None


def choose(cli: str | None = None, site: str | None = None, environ: dict | None = None) -> str:
    """The language to speak: --lang, ASEANFL_LANG, site.yaml `language`, the locale, English."""
    env = os.environ if environ is None else environ
    for value in (cli, env.get(ENV), site):
        if normalise(value):
            return normalise(value)
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        for part in (env.get(var) or "").split(":"):  # LANGUAGE may list several
            if normalise(part):
                return normalise(part)
    return "en"


_cli: list[str | None] = [None]  # the command line's --lang (aseanfl/cli.py)


def use(cli: str | None = None, site: str | None = None) -> str:
    """Speak the language chosen from --lang (given here or on the command line), ASEANFL_LANG,
    the hospital's site.yaml `language` and the locale."""
    return set_language(choose(cli or _cli[0], site))


def number(value, digits: int | None = None, lang: str | None = None) -> str:
    """A number as the reader's locale writes it (Babel): 1,234.5 / 1.234,5 / ១,២៣៤.៥ ..."""
    from babel.numbers import format_decimal

    lang = lang or current()
    fmt = None if digits is None else "#,##0." + "0" * digits if digits else "#,##0"
    return format_decimal(value, format=fmt, locale=lang if lang != "en" else "en_US")


def size(nbytes: float | None, lang: str | None = None) -> str:
    """Bytes in decimal units, as the reader's locale writes them (Babel/CLDR): 340 kB, 1.2 MB."""
    from babel.units import format_unit

    if nbytes is None or nbytes != nbytes:
        return "-"
    lang = lang or current()
    locale = lang if lang != "en" else "en_US"
    for unit, scale in (("digital-gigabyte", 1e9), ("digital-megabyte", 1e6), ("digital-kilobyte", 1e3)):
        if nbytes >= scale:
            value = nbytes / scale
            return format_unit(value, unit, length="short", locale=locale, format="#,##0.0" if value < 10 else "#,##0")
    return format_unit(nbytes, "digital-byte", length="short", locale=locale, format="#,##0")


def when(timestamp: float, lang: str | None = None) -> str:
    """A local date and time as the reader's locale writes it (Babel, medium format)."""
    from datetime import datetime

    from babel.dates import format_datetime

    lang = lang or current()
    return format_datetime(datetime.fromtimestamp(timestamp), "medium", locale=lang if lang != "en" else "en_GB")


def set_language(lang: str) -> str:
    _current[0] = normalise(lang) or "en"
    return _current[0]


def current() -> str:
    """The language spoken now: a console request's, else the process's (set by the command line;
    a process that never set it, like a daemon's worker, takes ASEANFL_LANG or the locale)."""
    return _request.get() or _current[0] or set_language(choose())


def speak(lang: str | None):
    """The language of what this request (a console page) renders, whatever the process speaks;
    returns the token to undo it with `_request.reset`."""
    return _request.set(normalise(lang))


def negotiate(accept: str | None) -> str | None:
    """The best of LANGUAGES for a browser's Accept-Language ('th-TH,th;q=0.9,en;q=0.5'), or None."""
    wanted = []
    for i, part in enumerate((accept or "").split(",")):
        tag, _sep, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _eq, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if tag and q > 0:
            wanted.append((-q, i, tag))
    for _q, _i, tag in sorted(wanted):
        if normalise(tag):
            return normalise(tag)
    return None


@lru_cache(maxsize=None)
def translations(lang: str) -> gettext.NullTranslations:
    if lang == "en":
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[lang], fallback=True)


def render(msgid: str, values: dict | None = None, lang: str | None = None, template=str) -> str:
    """The message in `lang` (default: the current language), its placeholders filled; values
    that are Texts are rendered in the same language. `template` wraps the translation before it
    is filled (the consoles: Markup.escape, so the values are escaped too)."""
    values = {k: (v.render(lang) if isinstance(v, Text) else v) for k, v in (values or {}).items()}
    text = translations(lang or current()).gettext(msgid)
    try:
        return template(text).format(**values)
    except (KeyError, IndexError, ValueError):  # a broken translation must not hide the message
        return template(msgid).format(**values)


def _(msgid: str, **values) -> str:
    """Translate now, in the current language."""
    return render(msgid, values)


class Text:
    """A message to render later, in whichever language the reader has."""

    def __init__(self, msgid: str, **values) -> None:
        self.msgid, self.values = msgid, values

    def render(self, lang: str | None = None) -> str:
        return render(self.msgid, self.values, lang)

    def __str__(self) -> str:
        return self.render("en")

    def to_json(self) -> dict:
        return {"msgid": self.msgid, "values": {k: (v.to_json() if isinstance(v, Text) else v) for k, v in self.values.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Text":
        values = {k: (cls.from_json(v) if isinstance(v, dict) and "msgid" in v else v) for k, v in data["values"].items()}
        return cls(data["msgid"], **values)


class Reason(ValueError):
    """A ValueError whose message is a Text: `str()` is English, `.text` renders in any language."""

    def __init__(self, msgid: str, **values) -> None:
        self.text = Text(msgid, **values)
        super().__init__(str(self.text))


class Line(str):
    """A finding kept as its English text (so code and tests read it as a str) that renders in
    any language: `line.render("th")`."""

    text: Text

    def __new__(cls, msgid: str, **values) -> "Line":
        text = Text(msgid, **values)
        line = super().__new__(cls, text.render("en"))
        line.text = text
        return line

    def render(self, lang: str | None = None) -> str:
        return self.text.render(lang)


def shown(value, lang: str | None = None) -> str:
    """A Line, Text or Reason in the reader's language; anything else as it is."""
    if isinstance(value, (Line, Text)):
        return value.render(lang)
    if isinstance(value, Reason):
        return value.text.render(lang)
    return str(value)


def text_of(exc: BaseException) -> Text:
    """An exception's message as a Text (an untranslated one when it is not a Reason)."""
    return exc.text if isinstance(exc, Reason) else Text("{message}", message=str(exc))


# -- catalogs (developers) ----------------------------------------------------------------------

SOURCES = ("aseanfl", "common", "protocol", "client", "server", "medimaging", "simulations", "strategies")
KEYWORDS = {"_": None, "N_": None, "Text": None, "Reason": None, "Line": None}


def extract():
    """The message template (a Babel Catalog) from every marked string in the sources."""
    from babel.messages.catalog import Catalog
    from babel.messages.extract import extract_from_dir

    root = Path(__file__).resolve().parents[1]
    catalog = Catalog(project="aseanfl", domain=DOMAIN)
    for source in SOURCES:
        methods = [("**.py", "python"), ("**/templates/**.html", "jinja2")]  # the consoles' pages too
        for filename, lineno, message, comments, context in extract_from_dir(
                root / source, method_map=methods, keywords=KEYWORDS, comment_tags=("i18n:",)):
            if isinstance(message, tuple):
                message = message[0]
            catalog.add(message, None, [(f"{source}/{filename}", lineno)], auto_comments=comments, context=context)
    return catalog


def po_path(lang: str) -> Path:
    return LOCALE_DIR / lang / "LC_MESSAGES" / f"{DOMAIN}.po"


def read_catalog(lang: str):
    from babel.messages.pofile import read_po

    with po_path(lang).open("rb") as f:
        return read_po(f, locale=lang)


def compile_catalog(lang: str) -> bytes:
    """The .mo bytes of a catalog (fuzzy entries left out)."""
    from io import BytesIO

    from babel.messages.mofile import write_mo

    out = BytesIO()
    write_mo(out, read_catalog(lang))
    return out.getvalue()


def _main(argv: list[str]) -> int:
    from babel.messages.pofile import write_po

    command = argv[0] if argv else ""
    if command not in ("extract", "update", "compile"):
        print("usage: python -m common.i18n extract|update|compile")
        return 2
    template = LOCALE_DIR / f"{DOMAIN}.pot"
    if command in ("extract", "update"):
        catalog = extract()
        with template.open("wb") as f:
            write_po(f, catalog, width=100, omit_header=False, sort_output=False)
        print(f"{template}: {len(catalog)} messages")
    if command == "update":
        from babel.messages.pofile import read_po

        with template.open("rb") as f:
            pot = read_po(f)
        for lang in LANGUAGES[1:]:
            path = po_path(lang)
            catalog = read_catalog(lang) if path.is_file() else None
            if catalog is None:
                from babel.messages.catalog import Catalog

                catalog = Catalog(locale=lang, domain=DOMAIN)
            catalog.update(pot, no_fuzzy_matching=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as f:
                write_po(f, catalog, width=100, ignore_obsolete=True)
            print(f"{path}: {sum(1 for m in catalog if m.id and m.string)} of {len(pot)} translated")
    if command == "compile":
        for lang in LANGUAGES[1:]:
            po_path(lang).with_suffix(".mo").write_bytes(compile_catalog(lang))
            print(f"{po_path(lang).with_suffix('.mo')}: compiled")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
