"""The region's languages (common/i18n.py): every catalog covers every message the sources mark,
with the same placeholders, compiled as shipped, its glossary's terms used consistently; the
language is chosen as documented; `client check-data` speaks Thai and Vietnamese on real files."""

from __future__ import annotations

import csv
import re
import subprocess

import pytest

from common.i18n import LANGUAGES, LOCALE_DIR, PLACEHOLDER, Text, choose, compile_catalog, extract, po_path, read_catalog

TRANSLATED = LANGUAGES[1:]


@pytest.fixture(scope="module")
def template():
    return {m.id for m in extract() if m.id}


@pytest.mark.parametrize("lang", TRANSLATED)
def test_every_catalog_covers_every_message_with_the_same_placeholders(lang, template):
    catalog = {m.id: m for m in read_catalog(lang) if m.id}
    missing = sorted(template - {i for i, m in catalog.items() if m.string and not m.fuzzy})
    assert not missing, f"{lang}: no translation for {missing[:5]} (python -m common.i18n update, then translate)"
    assert not sorted(set(catalog) - template), f"{lang}: obsolete messages (python -m common.i18n update)"
    for msgid in template:
        said = catalog[msgid].string
        assert sorted(PLACEHOLDER.findall(said)) == sorted(PLACEHOLDER.findall(msgid)), (lang, msgid, said)
        assert said.count("[/]") == msgid.count("[/]"), (lang, msgid, said)  # rich markup kept whole


@pytest.mark.parametrize("lang", TRANSLATED)
def test_catalogs_compile_and_the_shipped_ones_are_current(lang):
    shipped = po_path(lang).with_suffix(".mo")
    assert shipped.is_file(), f"{shipped} missing: python -m common.i18n compile"
    assert shipped.read_bytes() == compile_catalog(lang), f"{shipped} is stale: python -m common.i18n compile"


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

    from common import fonts
    from common.i18n import _, set_language

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


def test_fonts_installed_after_matplotlib_cached_its_font_list_are_found():
    """The README's order: the main job draws plots first (matplotlib caches the fonts it saw, on
    disk, for every later process), then the test command installs the Noto fonts. A cached list
    without them must not leave Thai plots in English for good."""
    from matplotlib import font_manager

    from common import fonts

    manager = font_manager.fontManager
    saved = list(manager.ttflist)
    try:
        manager.ttflist = [e for e in saved if "Noto" not in e.name]  # the list cached before fonts-noto-core
        type(manager)._findfont_cached.cache_clear()
        fonts.font_for.cache_clear()
        fonts._add_new_system_fonts.cache_clear()
        assert not any("Noto Sans Thai" in e.name for e in manager.ttflist)
        assert fonts.font_for("th") == "Noto Sans Thai" and fonts.font_for("km") == "Noto Sans Khmer"
    finally:
        manager.ttflist = saved
        type(manager)._findfont_cached.cache_clear()
        fonts.font_for.cache_clear()
        fonts._add_new_system_fonts.cache_clear()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    """(The Thai and Vietnamese reports of a real run: test_simulate, on its run, not a run of its own.)"""
    from simulations.local_deployment import BIN

    bad = subprocess.run([str(BIN / "aseanfl"), "report", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr and "Traceback" not in bad.stderr


def _aseanfl(*args, cwd=None):
    import os

    from simulations.local_deployment import BIN

    return subprocess.run([str(BIN / "aseanfl"), *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def test_hospital_commands_speak_the_hospitals_language(tmp_path):
    """Config errors (the sentence translated, the field names as written in YAML), `client audit`'s
    findings, `client approve` and `client start`'s refusal to start, each in the language asked."""
    site = tmp_path / "site.yaml"
    site.write_text("site: cho-ray\nlanguage: vi\ncolour: blue\ndata:\n  root: data\n  image_size: -3\n")
    bad = _aseanfl("client", "check-data", "-c", str(site))  # a broken site.yaml cannot pin a language
    assert bad.returncode == 2 and "config error: colour: unknown field" in bad.stderr, bad.stderr
    th = _aseanfl("--lang", "th", "client", "check-data", "-c", str(site))
    assert th.returncode == 2 and "Traceback" not in th.stderr
    assert "ข้อผิดพลาดของการตั้งค่า: colour: ไม่รู้จักฟิลด์นี้" in th.stderr, th.stderr
    assert "ข้อผิดพลาดของการตั้งค่า: data.image_size: ค่าต้องมากกว่าหรือเท่ากับ" in th.stderr, th.stderr
    assert "(ได้ '-3')" in th.stderr and "unknown field" not in th.stderr

    (tmp_path / "data").mkdir()
    site.write_text("site: cho-ray\nlanguage: vi\ndata:\n  root: data\n")
    audit = _aseanfl("client", "audit", "-c", str(site))  # site.yaml's language: Vietnamese
    assert audit.returncode == 1 and "không có nhật ký kiểm toán" in audit.stdout, audit.stdout
    (tmp_path / "audit.jsonl").write_text('{"cut": \n')
    audit = _aseanfl("client", "audit", "-c", str(site))
    assert audit.returncode == 1 and "[vấn đề]" not in audit.stdout
    assert "vấn đề dòng 1: không phải JSON (nhật ký đã bị sửa hoặc bị cắt)" in audit.stdout, audit.stdout
    assert "0 thông điệp" in audit.stdout, audit.stdout

    digest = "ab" * 32
    cut = _aseanfl("client", "approve", "-c", str(site), "--sha256", digest)  # nothing is added after a cut line
    assert cut.returncode == 2 and "dòng cuối của nhật ký kiểm toán bị hỏng" in cut.stderr, cut.stderr
    (tmp_path / "audit.jsonl").unlink()
    zh = _aseanfl("--lang", "zh_Hans", "client", "approve", "-c", str(site), "--sha256", digest)
    assert zh.returncode == 0 and zh.stdout.startswith(f"已批准：{digest}"), zh.stdout
    again = _aseanfl("--lang", "zh_Hans", "client", "approve", "-c", str(site), "--sha256", digest)
    assert again.stdout.startswith(f"此前已批准：{digest}"), again.stdout
    km = _aseanfl("--lang", "km", "client", "approve", "-c", str(site), "--sha256", digest, "--fab", str(site))
    assert km.returncode == 2 and "កំហុស៖ សូមផ្ដល់តែមួយក្នុងចំណោម --sha256, --fab, --app" in km.stderr, km.stderr

    start = _aseanfl("--lang", "my", "client", "start", "-c", str(site))
    assert start.returncode == 2 and "Traceback" not in start.stderr
    assert "ဆက်တင် အမှား-" in start.stderr and "connection အပိုင်း မရှိပါ" in start.stderr, start.stderr


def test_coordinator_commands_and_round_words_speak_the_coordinators_language(tmp_path):
    """`provision` and `run`'s config errors in Khmer and Indonesian; the per-site status words
    and a hospital's refusal rendered on the server from its code and numbers, not its English text."""
    from protocol.messages import Refusal
    from server.records.digest import digest
    from server.records.words import refusal_line, status_word

    from common.i18n import set_language

    out = tmp_path / "federation"
    km = _aseanfl("--lang", "km", "provision", "--federation", "asean-cxr", "--sites", "cho-ray,siriraj",
                  "--out", str(out), "--ca-dir", str(tmp_path / "ca"))
    assert km.returncode == 0, km.stderr
    assert "សហព័ន្ធ asean-cxr នៅក្នុង" in km.stdout and "(ផ្ញើវាទៅមន្ទីរពេទ្យ)" in km.stdout, km.stdout
    assert "send it to the hospital" not in km.stdout
    none = _aseanfl("--lang", "km", "provision", "--federation", "asean-cxr", "--out", str(out))
    assert none.returncode == 2 and none.stderr.startswith("កំហុស៖ ") and "--enroll REQUEST" in none.stderr, none.stderr
    run = _aseanfl("--lang", "id", "run", "-f", str(out), "--set", "server.rounds=abc")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "kesalahan konfigurasi: server.rounds: Nilai harus bilangan bulat yang valid" in run.stderr, run.stderr

    refusal = Refusal(code="privacy-budget", reason="round 3 would raise epsilon from 7.9 to 8.4, above 8",
                      epsilon_spent=7.9, epsilon_budget=8.0)
    rows = [{"round": 3, "site": f"site-{i}", "status": s} for i, s in
            enumerate(["ok"] * 20 + ["refused:privacy-budget", "not-sampled", "rejected:norm"])]
    try:
        set_language("th")
        assert status_word("refused:privacy-budget") == "ปฏิเสธ (งบความเป็นส่วนตัว)"
        assert status_word("rejected:norm") == "ถูกตัดออก (ใหญ่เกินไป)" and status_word("weird:code") == "weird:code"
        line = refusal_line(3, "siriraj", refusal)
        assert line.startswith("รอบ 3: siriraj ปฏิเสธการฝึก") and "งบความเป็นส่วนตัวเกิน 8" in line and "7.900" in line
        assert "would raise" not in line  # the hospital's English sentence is not what is shown
        assert digest(rows).counts() == "20 เรียบร้อย, 1 ปฏิเสธ (งบความเป็นส่วนตัว), 1 ไม่ได้ถูกสุ่มเลือก, 1 ถูกตัดออก (ใหญ่เกินไป)"
        set_language("vi")
        assert status_word("no-reply") == "không trả lời" and status_word(None) == "ổn"
    finally:
        set_language("en")
    assert refusal_line(3, "siriraj", refusal).startswith("round 3: siriraj refused to train: this round would take")


def test_a_process_that_never_chose_speaks_the_language_its_daemon_handed_down(tmp_path):
    """A daemon's workers never parse --lang: `client start` puts its language in ASEANFL_LANG
    (client/operations/daemon.py daemon_env) and their first message takes it from there."""
    import os
    import sys

    from client.config import load_site
    from client.operations.daemon import daemon_env

    from common.i18n import ENV, set_language

    (tmp_path / "data").mkdir()
    (tmp_path / "site.yaml").write_text("site: cho-ray\ndata:\n  root: data\n")
    try:
        set_language("km")
        assert daemon_env(load_site(tmp_path / "site.yaml"), tmp_path / "site.yaml")[ENV] == "km"
    finally:
        set_language("en")
    said = subprocess.run([sys.executable, "-c", "from server.records.words import status_word; print(status_word('no-reply'))"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, ENV: "km"})
    assert said.stdout.strip() == "គ្មានចម្លើយ", said.stdout + said.stderr
