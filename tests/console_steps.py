"""What a coordinator and a hospital's steward do in the consoles during the deployment test
(tests/test_deployment.py): each step drives the real Chromium and returns what the page showed."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

from consoles import add_user, login, shot

from server.engine.deployment import run_busy
from simulations.local_deployment import LocalDeployment


def start_consoles(dep: LocalDeployment, site: str) -> dict[str, str]:
    """The coordinator's console and `site`'s, as real processes of the deployment (stopped with it)."""
    assert add_user("server", dep.fed, "coordinator").returncode == 0
    assert add_user("client", dep.kit(site) / "site.yaml", "steward").returncode == 0
    return {"console-server": dep.start_console("console-server", "server", "console", "-f", str(dep.fed)),
            f"console-{site}": dep.start_console(f"console-{site}", "client", "console", "-c",
                                                 str(dep.kit(site) / "site.yaml"))}


def _statuses(page) -> dict[str, list[str]]:
    return page.eval_on_selector_all("#statuses tr[data-site]", "rows => Object.fromEntries(rows.map(r => "
                                     "[r.dataset.site, [...r.querySelectorAll('td')].slice(1, -1).map(c => c.textContent.trim())]))")


def watch_run(page, url: str, dep: LocalDeployment, before: set[Path], timeout: float = 600) -> dict:
    """The coordinator opens the run's page as soon as the run exists and watches it without
    reloading: the number of points on the chart each time it changed, the statuses, the download."""
    runs, deadline = dep.fed / "server" / "runs", time.monotonic() + timeout
    folder = None
    while time.monotonic() < deadline and (folder is None or not run_busy(folder)):
        folder = next(iter(set(runs.glob("run-*")) - before), None)
        time.sleep(0.2)
    assert folder is not None, "the run never appeared in the server's folder"
    page.goto(f"{url}/runs/{folder.name}")
    page.evaluate("window.sameDocument = true")  # gone if the page were loaded again
    seen: list[int] = []
    while time.monotonic() < deadline:
        points = int(page.get_attribute("svg.chart[data-name=score]", "data-points"))
        if not seen or seen[-1] != points:
            seen.append(points)
            shot(page, f"coordinator-run-{len(seen)}")
        if page.get_attribute("#live", "data-done") == "1":
            break
        time.sleep(0.3)
    out = {"folder": folder, "points": seen, "same page": page.evaluate("window.sameDocument === true"),
           "updates": int(page.get_attribute("#live", "data-updates") or 0), "statuses": _statuses(page),
           "state": page.inner_text("#run-state"), "errors": list(page.errors)}
    shot(page, "coordinator-run")
    with page.expect_download() as download:
        page.click("text=Download the run folder (zip)")
    archive = dep.root / "download.zip"
    download.value.save_as(archive)
    out["archive"] = archive
    out["zipped metrics.csv"] = zipfile.ZipFile(archive).read(f"{folder.name}/metrics.csv")
    page.goto(f"{url}/runs")
    out["runs row"] = page.inner_text(f"#runs tr[data-run={folder.name}]")
    shot(page, "coordinator-runs")
    return out


def steward_approves(browser, url: str, sha256: str, shots: Path) -> dict:
    """At the hospital that refused the bundle: the steward finds it pending and approves it."""
    page = login(browser, url, "steward", shots)
    page.click("text=Check the data again")  # it runs beside the page, which shows the results when done
    page.wait_for_selector("#data-live[data-done='1']", timeout=120_000)
    page.wait_for_selector("#counts")
    out = {"data": page.inner_text("main")}
    shot(page, "hospital-data")
    page.goto(url + "/apps")
    row = page.locator(f"#pending tr[data-sha256='{sha256}']")
    out["pending"] = row.inner_text() if row.count() else ""
    shot(page, "hospital-apps-pending")
    if row.count():
        row.locator("input[name=note]").fill("reviewed by the data protection officer")
        row.locator("button:has-text('Approve')").click()
        page.wait_for_load_state()
    out["notice"] = page.inner_text(".notice") if page.locator(".notice").count() else ""
    out["approved"] = page.locator(f"#approved tr[data-sha256='{sha256}']").inner_text() \
        if page.locator(f"#approved tr[data-sha256='{sha256}']").count() else ""
    out["still pending"] = page.locator(f"#pending tr[data-sha256='{sha256}']").count()
    shot(page, "hospital-apps")
    for name in ("audit", "daemon", "privacy"):
        page.goto(f"{url}/{name}")
        out[name] = page.inner_text("main")
        shot(page, f"hospital-{name}")
    out["html"] = page.content()
    out["errors"] = list(page.errors)
    return out


def start_and_stop(page, url: str, dep: LocalDeployment, timeout: float = 180) -> dict:
    """The coordinator pastes a config with mistakes (named next to their fields, nothing sent),
    then a good one; the run starts, and is stopped from its page."""
    runs = dep.fed / "server" / "runs"
    before = set(runs.glob("run-*"))
    page.goto(url + "/start")
    bad = "task:\n  image_size: 32\nstrategy:\n  name: fedsomething\n"  # chosen as a file: the page reads it in
    page.set_input_files("input[type=file][data-into=config]",
                         files=[{"name": "federation.yaml", "mimeType": "text/yaml", "buffer": bad.encode()}])
    page.wait_for_function("text => document.getElementById('config').value === text", arg=bad)
    page.fill("input[name=rounds]", "0")
    page.click("text=Check and start")
    page.wait_for_load_state()
    out = {"errors": page.eval_on_selector_all(".field-error", "es => es.map(e => [e.dataset.field, e.textContent])")}
    shot(page, "coordinator-start-errors")
    out["sent when invalid"] = (dep.fed / "server" / "console" / "launches").exists() or set(runs.glob("run-*")) != before
    page.fill("#config", "task:\n  image_size: 32\ntrain:\n  local_epochs: 20\nwait_for_sites: 2\nwait_timeout_s: 60\n")
    page.fill("input[name=rounds]", "3")
    page.select_option("select[name=strategy]", "fedprox")
    page.click("text=Check and start")
    page.wait_for_load_state()
    out["after start"] = page.url
    deadline, folder = time.monotonic() + timeout, None
    while time.monotonic() < deadline and (folder is None or not run_busy(folder)):
        folder = next(iter(set(runs.glob("run-*")) - before), None)
        time.sleep(0.3)
    assert folder is not None and run_busy(folder), "the run started from the console never ran"
    page.goto(f"{url}/runs/{folder.name}")
    shot(page, "coordinator-run-started")
    page.click("text=Stop the run")
    page.wait_for_load_state()
    out["stop notice"] = page.inner_text(".notice") if page.locator(".notice").count() else ""
    while time.monotonic() < deadline and run_busy(folder):
        time.sleep(0.5)
    out["busy after stop"] = run_busy(folder)
    page.goto(f"{url}/runs")
    out["runs row"] = page.inner_text(f"#runs tr[data-run={folder.name}]")
    out["launches"] = page.inner_text("#launches")
    out["folder"] = folder
    out["strategy"] = (folder / "config.yaml").read_text()
    return out


def hospitals_view(page, url: str, name: str) -> dict[str, str]:
    page.goto(url + "/hospitals")
    shot(page, name)
    return page.eval_on_selector_all("#hospitals tr[data-site]", "rows => Object.fromEntries(rows.map(r => "
                                     "[r.dataset.site, r.children[2].textContent.trim()]))")


def data_view(page, url: str, name: str) -> dict[str, list[str]]:
    """The Data page's cases table, as the coordinator reads it: (hospital|split) -> cells."""
    page.goto(url + "/data")
    shot(page, name)
    return page.eval_on_selector_all("table.cases tr[data-site]", "rows => Object.fromEntries(rows.map(r => "
                                     "[r.children[0].textContent.trim() + '|' + r.children[1].textContent.trim(), "
                                     "Array.from(r.children).slice(2).map(c => c.textContent.trim())]))")
