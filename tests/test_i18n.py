"""The region's languages (aseanfl/i18n.py): every catalog covers every message the sources mark,
with the same placeholders, compiled as shipped, its glossary's terms used consistently; the
language is chosen as documented; `client check-data` speaks Thai and Vietnamese on real files."""

from __future__ import annotations

import csv
import re
import subprocess

import pytest

from aseanfl.i18n import LANGUAGES, LOCALE_DIR, PLACEHOLDER, Text, choose, compile_catalog, extract, po_path, read_catalog

TRANSLATED = LANGUAGES[1:]


@pytest.fixture(scope="module")
def template():
    return {m.id for m in extract() if m.id}


@pytest.mark.parametrize("lang", TRANSLATED)
def test_every_catalog_covers_every_message_with_the_same_placeholders(lang, template):
    catalog = {m.id: m for m in read_catalog(lang) if m.id}
    missing = sorted(template - {i for i, m in catalog.items() if m.string and not m.fuzzy})
    assert not missing, f"{lang}: no translation for {missing[:5]} (python -m aseanfl.i18n update, then translate)"
    assert not sorted(set(catalog) - template), f"{lang}: obsolete messages (python -m aseanfl.i18n update)"
    for msgid in template:
        said = catalog[msgid].string
        assert sorted(PLACEHOLDER.findall(said)) == sorted(PLACEHOLDER.findall(msgid)), (lang, msgid, said)
        assert said.count("[/]") == msgid.count("[/]"), (lang, msgid, said)  # rich markup kept whole


@pytest.mark.parametrize("lang", TRANSLATED)
def test_catalogs_compile_and_the_shipped_ones_are_current(lang):
    shipped = po_path(lang).with_suffix(".mo")
    assert shipped.is_file(), f"{shipped} missing: python -m aseanfl.i18n compile"
    assert shipped.read_bytes() == compile_catalog(lang), f"{shipped} is stale: python -m aseanfl.i18n compile"


def _words(msgid: str) -> str:
    msgid = re.sub(r"\{[^}]*\}|\[/?[a-z]*\]", " ", msgid)  # placeholders and rich markup
    return " ".join(t for t in msgid.split() if not re.search(r"[.,\[\]_]", t.strip("(),;:'"))).lower()  # no field names


@pytest.mark.parametrize("lang", TRANSLATED)
def test_a_languages_glossary_terms_are_used_in_every_message_that_has_them(lang):
    terms = list(csv.DictReader((LOCALE_DIR / lang / "glossary.csv").open()))
    assert {t["term"] for t in terms} >= {"privacy budget", "approved app", "round", "image", "file"}
    off = [(t["term"], m.id) for m in read_catalog(lang) if m.id for t in terms
           if re.search(rf"\b{re.escape(t['term'])}(e?s)?\b", _words(m.id)) and t["translation"].casefold() not in m.string.casefold()]
    assert not off, f"{lang}: a glossary term translated otherwise: {off[:3]}"


def test_the_language_is_chosen_as_documented():
    env = {"LANG": "th_TH.UTF-8"}
    assert choose(environ=env) == "th"
    assert choose(site="vi", environ=env) == "vi"  # a hospital's site.yaml beats the locale
    assert choose(site="vi", environ={**env, "ASEANFL_LANG": "km"}) == "km"  # the environment beats site.yaml
    assert choose("my", site="vi", environ={**env, "ASEANFL_LANG": "km"}) == "my"  # --lang beats everything
    assert choose(environ={"LC_ALL": "zh_CN.UTF-8", "LANG": "en_US.UTF-8"}) == "zh_Hans"
    assert choose(environ={"LANGUAGE": "fr:ms_MY", "LANG": "C"}) == "ms"
    assert choose(environ={"LANG": "C.UTF-8"}) == "en" and choose(environ={}) == "en"
    said = Text("slice {slice}: {reason}", slice="s1.dcm", reason=Text("empty series folder"))
    assert Text.from_json(said.to_json()).render("th") == "สไลซ์ s1.dcm: โฟลเดอร์ซีรีส์ว่างเปล่า"
    assert str(said) == "slice s1.dcm: empty series folder"


def _check_data(site_yaml, *args, env=None):
    import os

    from simulations.local_deployment import BIN

    return subprocess.run([str(BIN / "aseanfl"), *args, "client", "check-data", "-c", str(site_yaml)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_check_data_speaks_thai_and_vietnamese_on_real_files(tmp_path):
    """A hospital export with two classes of real (non-blank) PNG images, a file that is not an
    image and one outside a class folder: the headings and every skip reason in the hospital's
    language (site.yaml `language: th`), and in Vietnamese with --lang; file names as they are."""
    import numpy as np
    from PIL import Image

    from simulations.local_deployment import write_pngs

    export = tmp_path / "export"
    write_pngs(export, 0, 40)
    pixels = np.asarray(Image.open(sorted((export / "normal").glob("*.png"))[0]))
    assert pixels.std() > 5  # real images, not blank
    (export / "normal" / "scan-0042.png").write_bytes(b"not a png: a cut transfer")
    (export / "readme.txt").write_text("export notes")
    site = tmp_path / "site.yaml"
    site.write_text(f"site: cho-ray\nlanguage: th\ndata:\n  root: {export}\n  image_size: 32\n")
    th = _check_data(site, env={"LANG": "vi_VN.UTF-8"})  # the site's pin beats the locale
    assert th.returncode == 0, th.stderr
    lines = th.stdout
    assert "cho-ray: ภาพที่ใช้ได้" in lines and "ปัญหา 2 รายการ" in lines and "คลาส" in lines, lines
    assert "ข้าม readme.txt: ไม่ได้อยู่ในโฟลเดอร์ของคลาส" in lines, lines
    assert "ข้าม normal/scan-0042.png: ถอดรหัสเป็น png ไม่ได้" in lines, lines
    assert "usable" not in lines and "skipped" not in lines  # nothing left in English
    vi = _check_data(site, "--lang", "vi")
    assert vi.returncode == 0, vi.stderr
    assert "cho-ray: 60 ảnh dùng được, 2 vấn đề" in vi.stdout, vi.stdout
    assert "bỏ qua readme.txt: không nằm trong thư mục của một lớp" in vi.stdout, vi.stdout
    assert "bỏ qua normal/scan-0042.png: không giải mã được dạng png" in vi.stdout, vi.stdout
    en = _check_data(site, "--lang", "en")
    assert "skipped readme.txt: not inside a class folder" in en.stdout
    wrong = _check_data(site, "--lang", "fr")
    assert wrong.returncode == 2 and "--lang: 'fr' is not one of en, vi, th" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    (tmp_path / "gone.yaml").write_text(f"site: cho-ray\ndata:\n  root: {tmp_path / 'nowhere'}\n")
    gone = _check_data(tmp_path / "gone.yaml", "--lang", "th")
    assert gone.returncode == 2 and "ข้อผิดพลาดของข้อมูล: data.files.root: ไม่พบโฟลเดอร์:" in gone.stderr, gone.stderr




def _draw(path, labels):
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fig, ax = plt.subplots()
        ax.plot([1, 2], [0.6, 0.8], label=labels[0])
        ax.set(title=labels[1], xlabel=labels[2])
        ax.legend()
        fig.savefig(path)
        plt.close(fig)
    return [str(w.message) for w in seen if "missing from font" in str(w.message)]


def test_plots_with_thai_and_khmer_labels_have_every_glyph(tmp_path):
    """With the fonts the test command installs, a plot labelled in Thai and Khmer (a Khmer
    hospital's name in a Thai report) draws every glyph; the same plot in matplotlib's default
    font is missing them (so the check sees a real difference); where no font has a script's
    glyphs, the labels fall back to English with one warning."""
    import logging

    from aseanfl import fonts
    from aseanfl.i18n import _, set_language

    labels = ["โรงพยาบาลรามาธิบดี", "មន្ទីរពេទ្យកាល់ម៉ែត", "รอบ"]
    set_language("th")
    try:
        assert fonts.font_for("th") and fonts.font_for("km"), "Thai/Khmer fonts missing: fonts-noto-core"
        with fonts.labels_for():
            assert _draw(tmp_path / "th.png", labels) == []
        assert _draw(tmp_path / "default.png", labels)  # DejaVu Sans alone has no Thai or Khmer
        assert (tmp_path / "th.png").stat().st_size > 5_000
        fonts.font_for.cache_clear()
        saved, fonts.SCRIPTS["th"] = fonts.SCRIPTS["th"], (["No Such Font"], "ภาพ", "fonts-noto-core")
        fonts._warned.discard("th")
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("aseanfl").addHandler(handler)
        try:
            for _i in range(2):
                with fonts.labels_for():
                    assert _("round") == "round"  # English labels, not empty boxes
            assert _("round") == "รอบ"
        finally:
            fonts.SCRIPTS["th"] = saved
            fonts.font_for.cache_clear()
            logging.getLogger("aseanfl").removeHandler(handler)
        said = [r.getMessage() for r in records]
        assert len(said) == 1 and "no installed font has th glyphs (install fonts-noto-core)" in said[0], said
    finally:
        set_language("en")


def test_a_report_in_thai_and_in_vietnamese(tmp_path):
    """A real simulated run's report.md written again with `aseanfl --lang th report` and
    `--lang vi report`: translated headings and sentences, numbers as they were."""
    from simulations.local_deployment import BIN

    runs = tmp_path / "runs"
    sim = subprocess.run([str(BIN / "aseanfl"), "simulate", "--sites", "2", "--rounds", "1", "--local-epochs", "1",
                          "--out", str(runs)], capture_output=True, text=True, timeout=600)
    assert sim.returncode == 0, sim.stderr[-2000:]
    run = next(runs.iterdir())
    english = (run / "report.md").read_text()
    assert "## Final round (1)" in english and "## Global model" in english
    for lang, wanted in (("th", ["# การรันแบบสหพันธ์", "## รอบสุดท้าย (1)", "## โมเดลส่วนกลาง", "## รายโรงพยาบาล",
                                 "จำนวนรอบ: 1;", "ไฟล์: `config.yaml`"]),
                         ("vi", ["# Lượt chạy liên kết", "## Vòng cuối (1)", "## Mô hình toàn cục", "## Theo từng bệnh viện",
                                 "Số vòng: 1;", "Các tệp: `config.yaml`"])):
        res = subprocess.run([str(BIN / "aseanfl"), "--lang", lang, "report", str(run)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        text = (run / "report.md").read_text()
        assert all(w in text for w in wanted), (lang, text[:800])
        assert "Final round" not in text and "Global model" not in text
        assert "missing from font" not in res.stderr, res.stderr
    bad = subprocess.run([str(BIN / "aseanfl"), "report", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr and "Traceback" not in bad.stderr
