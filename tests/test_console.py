"""The consoles attacked over HTTP: a hospital console and a coordinator console, each a real
`aseanfl ... console` process on 127.0.0.1. An outsider without a session reaches no page and no
action; a forged POST (no CSRF token, or another session's) changes nothing; the download route
serves no file outside a run folder; wrong passwords lock the address out; sessions expire;
beyond loopback the console speaks only TLS. (The consoles used by a person in a browser, over a
real deployment, are in test_deployment.py.)"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from consoles import PASSWORD, add_user, csrf_of, session, wait_up
from inprocess import site_yaml

from simulations.local_deployment import BIN, aseanfl, free_port

PENDING = "ab" * 32


def _start(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp / f"{name}.log", "wb")
    proc = subprocess.Popen([str(BIN / "aseanfl"), *args, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc)
    return proc, url


@pytest.fixture(scope="module")
def consoles(tmp_path_factory):
    from client.operations import approvals
    from client.config import load_site
    from server.records.outputs import RunRecorder

    tmp = tmp_path_factory.mktemp("consoles")
    site_path = site_yaml(tmp, "site-a", 0, tmp / "site-a" / "state")
    site = load_site(site_path)
    approvals.record_refusal(site, PENDING, 5, 4096)  # a bundle the gate refused, waiting for a decision
    assert aseanfl("provision", "--federation", "attacked", "--sites", "h1,h2", "--out", str(tmp / "fed")).returncode == 0
    run = tmp / "fed" / "server" / "runs" / "run-3"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"server": {"rounds": 1}, "strategy": {"name": "fedavg"}}))
    RunRecorder(run).write_rows([{"round": 1, "site": "h1", "status": "ok", "val_auc": 0.7},
                                 {"round": 1, "site": "global", "status": "1 trained, 0 refused", "val_auc": 0.7}])
    (tmp / "fed" / "server" / "secret.txt").write_text("not for download")
    assert add_user("client", site_path, "steward").returncode == 0
    assert add_user("server", tmp / "fed", "coordinator").returncode == 0
    procs = {}
    procs["client"], hospital = _start(tmp, "client", "client", "console", "-c", str(site_path))
    procs["server"], coordinator = _start(tmp, "server", "server", "console", "-f", str(tmp / "fed"))
    yield {"tmp": tmp, "site": site, "site_path": site_path, "hospital": hospital, "coordinator": coordinator,
           "fed": tmp / "fed", "procs": procs}
    for proc in procs.values():
        proc.terminate()
        proc.wait(timeout=20)
    for name in ("client", "server"):
        said = (tmp / f"{name}.log").read_text(errors="replace")
        assert "Traceback" not in said, said[-2000:]


def _routes(kind: str, consoles) -> list[tuple[str, str]]:
    """(method, path) of every route the console serves, path parameters filled in."""
    if kind == "client":
        from client.operations.console import build_console

        app, _ = build_console(consoles["site"])
    else:
        from server.console import build_console
        from server.operations.provision import load_federation

        app, _ = build_console(load_federation(consoles["fed"]))
    found = []
    for route in app.routes:
        if getattr(route, "methods", None) is None or route.path.startswith("/static"):
            continue
        for method in route.methods - {"HEAD"}:
            found.append((method, route.path.replace("{name}", "run-3")))
    return sorted(found)


@pytest.mark.parametrize("kind", ["client", "server"])
def test_no_page_and_no_action_without_a_session(consoles, kind):
    url = consoles["hospital" if kind == "client" else "coordinator"]
    routes = _routes(kind, consoles)
    expected = {("GET", "/data"), ("POST", "/apps/approve"), ("GET", "/audit")} if kind == "client" else \
        {("GET", "/runs/run-3/download"), ("POST", "/start"), ("POST", "/runs/run-3/stop"), ("GET", "/hospitals")}
    assert expected <= set(routes), routes
    for method, path in routes:
        if path == "/login":
            continue
        for accept in ("text/html", "application/json"):
            resp = httpx.request(method, url + path, headers={"Accept": accept}, data={"sha256": PENDING}, timeout=30)
            if method == "GET" and accept == "text/html":
                assert resp.status_code == 303 and resp.headers["location"].startswith("/login"), (method, path, resp)
            else:
                assert resp.status_code == 401, (method, path, resp.status_code)
            assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
            assert resp.headers["x-frame-options"] == "DENY"
    # a made-up session cookie is no session
    resp = httpx.get(url + "/", cookies={"aseanfl_session": "guessed"}, timeout=30)
    assert resp.status_code == 401
    approved = consoles["site"].approved_apps
    assert not approved.exists() or PENDING not in approved.read_text()


def test_forged_posts_change_nothing(consoles):
    site, fed = consoles["site"], consoles["fed"]
    steward = session(consoles["hospital"], "steward")
    other = session(consoles["hospital"], "steward")  # a second session: its token is not this one's
    token = csrf_of(other, "/apps")
    for fields in ({"sha256": PENDING}, {"sha256": PENDING, "csrf": ""}, {"sha256": PENDING, "csrf": token},
                   {"sha256": PENDING, "csrf": "x" * 43}):
        for action in ("/apps/approve", "/apps/reject", "/data/check"):
            resp = steward.post(action, data=fields)
            assert resp.status_code == 403 and "CSRF" in resp.text, (action, fields, resp.status_code)
    # JSON or multipart bodies carry no form token either
    assert steward.post("/apps/approve", json={"sha256": PENDING, "csrf": csrf_of(steward, "/apps")}).status_code == 403
    assert not site.approved_apps.exists() or PENDING not in site.approved_apps.read_text()
    assert json.loads((site.state_dir / "app-requests.json").read_text())[PENDING]["state"] == "pending"
    assert not site.audit_log.exists()  # no decision was recorded
    # the login form too: a POST to /login without its cookie's token is refused before the password is read
    resp = httpx.post(consoles["hospital"] + "/login", data={"user": "steward", "password": PASSWORD}, timeout=30)
    assert resp.status_code == 403
    coordinator = session(consoles["coordinator"], "coordinator")
    resp = coordinator.post("/start", data={"config": "server:\n  rounds: 1\n", "rounds": "1"})
    assert resp.status_code == 403
    assert not (fed / "server" / "console" / "launches").exists()  # nothing was started
    # with its token, the same session's POST is taken
    resp = steward.post("/apps/reject", data={"sha256": PENDING, "csrf": csrf_of(steward, "/apps")})
    assert resp.status_code == 303 and resp.headers["location"] == "/apps?done=rejected"
    assert json.loads((site.state_dir / "app-requests.json").read_text())[PENDING]["state"] == "rejected"
    entry = json.loads(site.audit_log.read_text().splitlines()[-1])
    assert entry["event"] == "app rejected" and entry["by"] == "steward (console)" and entry["sha256"] == PENDING


@pytest.mark.parametrize("path", ["/runs/..%2F..%2Fserver/download", "/runs/run-3%2F..%2F..%2Fsecret.txt/download",
                                  "/runs/%2E%2E/download", "/runs/run-3/../../secret.txt/download",
                                  "/runs/run-3%00/download", "/runs/run-3.zip/download", "/static/..%2F..%2Fserver/secret.txt",
                                  "/static/%2E%2E/%2E%2E/secret.txt"])
def test_download_serves_nothing_outside_a_run_folder(consoles, path):
    coordinator = session(consoles["coordinator"], "coordinator")
    resp = coordinator.get(path)
    assert resp.status_code in (400, 404), (path, resp.status_code)
    assert "not for download" not in resp.text and "PRIVATE KEY" not in resp.text
    good = coordinator.get("/runs/run-3/download")
    assert good.status_code == 200 and good.headers["content-type"] == "application/zip"
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(good.content)).namelist()
    assert "run-3/metrics.csv" in names and not any("secret" in n or ".lock" in n for n in names), names


def test_wrong_passwords_lock_the_address_out_and_sessions_expire(consoles):
    tmp = consoles["tmp"]
    proc, url = _start(tmp, "short", "client", "console", "-c", str(consoles["site_path"]), "--idle-minutes", "0.05")
    try:
        client = httpx.Client(base_url=url, timeout=30)
        codes = []
        for _ in range(6):
            token = client.get("/login").cookies.get("aseanfl_login") or client.cookies.get("aseanfl_login")
            codes.append(client.post("/login", data={"user": "steward", "password": "guess", "csrf": token}).status_code)
        assert codes[:5] == [401] * 5 and codes[5] == 429, codes
        token = client.get("/login").cookies.get("aseanfl_login") or client.cookies.get("aseanfl_login")
        locked = client.post("/login", data={"user": "steward", "password": PASSWORD, "csrf": token})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0  # the right one too, for now
        assert "aseanfl_session" not in locked.cookies
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # sessions: a fresh console, 3 s of idleness allowed
    proc, url = _start(tmp, "idle", "client", "console", "-c", str(consoles["site_path"]), "--idle-minutes", "0.05")
    try:
        steward = session(url, "steward")
        assert steward.get("/audit").status_code == 200
        time.sleep(4)
        assert steward.get("/audit", headers={"Accept": "text/html"}).status_code == 303  # ended: log in again
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_passwords_are_kept_only_as_scrypt_hashes(consoles):
    for path in (consoles["site"].state_dir / "console-users.json", consoles["fed"] / "server" / "console-users.json"):
        text = path.read_text()
        assert PASSWORD not in text and path.stat().st_mode & 0o777 == 0o600
        stored = next(iter(json.loads(text)["users"].values()))["password"]
        assert re.fullmatch(r"scrypt\$32768\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", stored), stored
    short = add_user("client", consoles["site_path"], "nurse", "short")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr


def test_console_refuses_to_start_where_it_would_be_unsafe(consoles, tmp_path):
    site_path = site_yaml(tmp_path, "site-z", 1, tmp_path / "site-z" / "state")
    res = aseanfl("client", "console", "-c", str(site_path), "--port", str(free_port()), timeout=60)
    assert res.returncode == 2 and "no console user yet" in res.stderr and "console-user" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = aseanfl("client", "console", "-c", str(consoles["site_path"]), "--host", "0.0.0.0", "--port",
                  str(free_port()), timeout=60)
    assert res.returncode == 2 and "needs TLS" in res.stderr, res.stderr
    busy = consoles["hospital"].rsplit(":", 1)[1]
    res = aseanfl("client", "console", "-c", str(consoles["site_path"]), "--port", busy, timeout=60)
    assert res.returncode == 2 and f"cannot listen on 127.0.0.1:{busy}" in res.stderr, res.stderr


def test_beyond_loopback_the_coordinator_console_speaks_only_tls(consoles):
    fed = consoles["fed"]
    port = free_port()
    log = open(consoles["tmp"] / "tls.log", "wb")
    proc = subprocess.Popen([str(BIN / "aseanfl"), "server", "console", "-f", str(fed), "--host", "0.0.0.0",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    try:
        trust = ssl.create_default_context(cafile=str(fed / "ca.crt"))  # the server's certificate, from the federation's CA
        wait_up(url, proc, verify=trust)
        page = httpx.get(url + "/login", verify=trust, timeout=30)
        assert page.status_code == 200 and "secure" in page.headers["set-cookie"].lower()
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no page
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=10)
        coordinator = session(url, "coordinator", verify=trust)
        assert coordinator.get("/runs").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_hospital_console_beyond_loopback_serves_a_certificate_from_the_federations_ca(consoles):
    tmp = consoles["tmp"]
    res = aseanfl("console-cert", "--host", "127.0.0.1", "--host", "console.hospital.example", "--out",
                  str(tmp / "cert"), "--ca-dir", str(tmp / "fed-ca"))
    assert res.returncode == 0 and "--tls-cert" in res.stdout, res.stderr
    assert (tmp / "cert" / "console.key").stat().st_mode & 0o777 == 0o600
    again = aseanfl("console-cert", "--host", "127.0.0.1", "--out", str(tmp / "cert"), "--ca-dir", str(tmp / "fed-ca"))
    assert again.returncode == 2 and "never overwritten" in again.stderr  # the key in use stays
    port = free_port()
    log = open(tmp / "hospital-tls.log", "wb")
    proc = subprocess.Popen([str(BIN / "aseanfl"), "client", "console", "-c", str(consoles["site_path"]), "--host",
                             "0.0.0.0", "--port", str(port), "--tls-cert", str(tmp / "cert" / "console.crt"),
                             "--tls-key", str(tmp / "cert" / "console.key")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        trust = ssl.create_default_context(cafile=str(consoles["fed"] / "ca.crt"))
        wait_up(f"https://127.0.0.1:{port}", proc, verify=trust)
        steward = session(f"https://127.0.0.1:{port}", "steward", verify=trust)
        assert steward.get("/privacy").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_data_check_runs_beside_the_pages_and_its_results_arrive_in_the_live_part(consoles):
    steward = session(consoles["hospital"], "steward")
    token = csrf_of(steward, "/data")
    for _ in range(3):  # pressed again while it runs: taken, and the page answers at once
        assert steward.post("/data/check", data={"csrf": token}).status_code == 303
    deadline = time.monotonic() + 120
    while (live := steward.get("/data/live")).headers.get("x-live-done") != "1" and time.monotonic() < deadline:
        time.sleep(0.3)
    pngs = len(list((consoles["tmp"] / "pacs" / "site-a").rglob("*.png")))
    assert f'<strong id="usable">{pngs}</strong> usable images' in live.text and pngs >= 60, live.text[:800]


def test_decoder_notes_on_the_data_page_hide_the_header_values_they_quote(consoles):
    """pydicom's own warning for a bad header value quotes the value; the data page keeps the
    note and drops the value (the command line, on the hospital's terminal, shows it whole)."""
    import warnings

    from pydicom import config
    from pydicom.valuerep import validate_value

    from client.operations.console import _hide_values
    from client.operations.datacheck import DataCheck

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        validate_value("CS", "HN-0042 DOE JANE", config.WARN)
    note = str(said[0].message)
    assert "HN-0042 DOE JANE" in note  # a real note, quoting a value
    site = consoles["site"]
    check = DataCheck(site=site.site, checked_at=time.time(), usable=1, row_label="class", splits=["train"],
                      rows=[("normal", [1])], notes=[("ct/0001.dcm", note)])
    (site.state_dir / "console").mkdir(parents=True, exist_ok=True)
    (site.state_dir / "console" / "data-check.json").write_text(check.model_dump_json())
    page = session(consoles["hospital"], "steward").get("/data").text
    assert "Invalid value for VR CS" in page and "ct/0001.dcm" in page and "HN-0042" not in page
    assert _hide_values(note).startswith("Invalid value for VR CS: '…'")


def test_the_language_switch_takes_only_a_language(consoles):
    """?lang= and Accept-Language are inputs too: only one of the catalogs' codes is taken (and
    remembered); anything else is ignored, reflected nowhere, and sets no cookie."""
    url = consoles["hospital"] + "/login"
    for asked in ("<script>alert(1)</script>", "../../etc/passwd", "th;q=x", "xx"):
        res = httpx.get(url, params={"lang": asked}, headers={"Accept-Language": "de-DE,fr;q=0.5"})
        assert res.status_code == 200 and '<html lang="en">' in res.text
        assert "aseanfl_lang" not in res.headers.get("set-cookie", "") and (len(asked) < 6 or asked not in res.text)
    picked = httpx.get(url, params={"lang": "km"})
    kept = [c for c in picked.headers.get_list("set-cookie") if c.startswith("aseanfl_lang=")]
    assert '<html lang="km">' in picked.text and len(kept) == 1 and kept[0].startswith("aseanfl_lang=km;"), kept
    assert "HttpOnly" in kept[0] and "SameSite=Strict" in kept[0]
    thai = httpx.get(url, headers={"Accept-Language": "fr-FR;q=0.9, th-TH;q=0.8, en;q=0.1"})
    assert '<html lang="th">' in thai.text and "aseanfl_lang" not in thai.headers.get("set-cookie", "")
    weird = httpx.get(url, cookies={"aseanfl_lang": "<b>"}, headers={"Accept-Language": "vi"})
    assert '<html lang="vi">' in weird.text and "<b>" not in weird.text


SCRIPT_PAGES = [("th", "th-TH"), ("km", "km-KH"), ("my", "my-MM"), ("zh_Hans", "zh-CN")]


def _fonts_of(page, selector: str) -> dict[str, int]:
    """The platform fonts Chromium drew `selector`'s text with, and how many glyphs each drew
    (DevTools' CSS.getPlatformFontsForNode: what was rendered, not what the CSS asked for)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    found: dict[str, int] = {}
    for font in cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]:
        found[font["familyName"]] = found.get(font["familyName"], 0) + int(font["glyphCount"])
    return found


def _inked(png: bytes) -> float:
    """The share of an element screenshot's pixels that are clearly darker than the page."""
    import io

    import numpy as np
    from PIL import Image

    gray = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    return float((gray < 128).mean())


def test_each_script_is_drawn_with_a_font_that_has_it_and_the_switch_is_remembered(consoles, chromium):
    """The hospital console opened by browsers set to Thai, Khmer, Burmese and Chinese: the page
    in that language (from Accept-Language, before and after logging in), its heading drawn by
    Chromium with a font of that script (the platform fonts DevTools reports for the node, each
    with glyphs drawn, none a fallback for missing glyphs) and visibly inked; then the language
    switch: a click on "Tiếng Việt" is remembered by the next page whatever the browser asks."""
    from common.fonts import SCRIPTS
    from common.i18n import render

    shots = consoles["tmp"] / "shots"
    shots.mkdir(exist_ok=True)
    for lang, tag in SCRIPT_PAGES:
        context = chromium.new_context(locale=tag, viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.goto(consoles["hospital"] + "/privacy")
        assert "/login" in page.url and page.get_attribute("html", "lang") == lang.replace("_", "-")
        assert page.inner_text("h1") == render("Log in", lang=lang) != "Log in"
        page.fill("input[name=user]", "steward")
        page.fill("input[name=password]", PASSWORD)
        page.click("form.login button")
        page.wait_for_load_state()
        assert page.url.endswith("/privacy"), page.url
        heading, wanted = page.inner_text("h1"), render("Privacy", lang=lang)
        assert heading == wanted != "Privacy", (lang, heading)
        nav = page.inner_text("header nav")
        assert all(render(label, lang=lang) in nav for label in ("Data", "Apps", "Audit", "Daemon")), nav
        assert render("A round is charged before it trains.", lang=lang) in page.inner_text("main")
        drawn = _fonts_of(page, "h1")
        families, _sample, package = SCRIPTS[lang]
        ours = {f: n for f, n in drawn.items() if f in families}
        assert ours and sum(ours.values()) >= len(heading.replace(" ", "")) // 2, (lang, drawn, package)
        assert not set(drawn) - set(families) - {"DejaVu Sans", "Noto Sans"}, (lang, drawn)  # no last-resort font
        png = page.locator("h1").screenshot()
        assert _inked(png) > 0.004, lang  # glyphs, not an empty line (a blank one is 0)
        page.screenshot(path=str(shots / f"console-{lang}.png"), full_page=True)
        context.close()

    context = chromium.new_context(locale="th-TH", viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(consoles["hospital"] + "/apps")
    page.fill("input[name=user]", "steward")
    page.fill("input[name=password]", PASSWORD)
    page.click("form.login button")
    page.wait_for_load_state()
    assert page.inner_text("h1") == render("Apps", lang="th")
    page.click("nav.languages a[lang=vi]")
    page.wait_for_load_state()
    assert page.inner_text("h1") == "Ứng dụng" and page.get_attribute("html", "lang") == "vi"
    page.goto(consoles["hospital"] + "/audit")  # no ?lang= now: the cookie keeps Vietnamese
    assert page.inner_text("h1") == "Nhật ký kiểm toán", page.inner_text("h1")
    assert page.get_attribute("nav.languages a[lang=vi]", "aria-current") == "true"
    page.goto(consoles["coordinator"] + "/login?lang=zh_Hans")  # the other console: its own cookie
    page.fill("input[name=user]", "coordinator")
    page.fill("input[name=password]", PASSWORD)
    page.click("form.login button")
    page.goto(consoles["coordinator"] + "/runs/run-3")
    assert page.inner_text("#statuses td[data-status=ok]") == "正常"
    assert "已停止或丢失（无摘要）" in page.inner_text("#run-state")
    drawn = _fonts_of(page, "h2")
    assert any(f in SCRIPTS["zh_Hans"][0] for f in drawn), drawn
    page.screenshot(path=str(shots / "coordinator-zh_Hans.png"), full_page=True)
    context.close()
    for name in ("console-th.png", "console-km.png", "console-my.png", "console-zh_Hans.png"):
        assert (shots / name).stat().st_size > 20_000, name
