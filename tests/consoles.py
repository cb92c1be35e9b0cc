"""The web consoles as a person uses them: started as real processes (`aseanfl client console`,
`aseanfl server console`), driven in a real Chromium (Debian's package) by Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from simulations.local_deployment import BIN

PASSWORD = "correct horse battery staple"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# as root in a closed network: no sandbox, and none of Chromium's own calls home
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def add_user(kind: str, where: Path, name: str, password: str = PASSWORD) -> subprocess.CompletedProcess:
    flag = "-c" if kind == "client" else "-f"
    return subprocess.run([str(BIN / "aseanfl"), kind, "console-user", flag, str(where), name], input=password + "\n",
                          capture_output=True, text=True, timeout=60)


def wait_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 60, verify=False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the console exited with {proc.returncode}")
        try:
            httpx.get(url + "/login", timeout=2, verify=verify)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"no console at {url} after {timeout} s")


def session(url: str, user: str, password: str = PASSWORD, verify=False) -> httpx.Client:
    """An HTTP client logged in as `user` (the login form's CSRF cookie and field included)."""
    client = httpx.Client(base_url=url, verify=verify, follow_redirects=False, timeout=30)
    page = client.get("/login")
    token = page.cookies.get("aseanfl_login") or client.cookies.get("aseanfl_login")
    resp = client.post("/login", data={"user": user, "password": password, "csrf": token, "next": "/"})
    assert resp.status_code == 303, (resp.status_code, resp.text[:300])
    return client


def csrf_of(client: httpx.Client, path: str) -> str:
    import re

    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path, headers={"Accept": "text/html"}).text)
    assert found, f"no CSRF field on {path}"
    return found.group(1)


@pytest.fixture(scope="session")
def chromium():
    """One Chromium for the test session (Playwright drives Debian's package; no browser download)."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"Chromium not found at {CHROMIUM}: the README's test command installs Debian's chromium")
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def login(browser, url: str, user: str, shots: Path, password: str = PASSWORD, **context):
    """A new browser page, logged in through the console's own form."""
    page = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True, **context).new_page()
    page.on("dialog", lambda d: d.accept())  # the "are you sure" of revoke and stop
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.goto(url + "/")
    assert "/login" in page.url, page.url  # no session yet: sent to the login page
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")
    page.wait_for_load_state()
    assert "/login" not in page.url, page.content()[:2000]
    shots.mkdir(parents=True, exist_ok=True)
    page.shots = shots
    return page


def shot(page, name: str) -> Path:
    path = page.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
