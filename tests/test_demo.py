"""`aseanfl demo`: the whole deployment on one machine in one command, as a coordinator trying
aseanfl runs it: hospitals online, consoles that take the logins it printed, no run until one is
started with the command it printed (and that run completes), and Ctrl-C stops every process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from consoles import session
from simulations.local_deployment import BIN, aseanfl


def _processes_under(folder: Path) -> list[str]:
    """Command lines of the running processes that name the demo's folder."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmd and int(pid) != os.getpid():
            found.append(cmd)
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "fed"
    proc = subprocess.Popen([str(BIN / "aseanfl"), "demo", "--hospitals", "2", "--dir", str(folder), "--images", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("logs: "):
            break
    try:
        yield {"proc": proc, "lines": lines, "folder": folder}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_demo_starts_a_federation_and_prints_logins_and_the_run_command(demo):
    lines, folder = demo["lines"], demo["folder"]
    assert any(line.startswith("ready: 2 hospitals online (nanning, hanoi); no run has started") for line in lines), lines
    assert not list((folder / "federation" / "server" / "runs").glob("run-*"))  # no run until asked
    logins = dict((m[1], (m[2], m[3], m[4])) for m in (re.match(r"^  (\S+)\s+(http://127\.0\.0\.1:\d+)\s+(\S+) / (\S+)$", x)
                                                       for x in lines) if m)
    assert set(logins) == {"coordinator", "nanning", "hanoi"}, lines
    client = session(*logins["coordinator"])  # the login printed opens the coordinator's console
    try:
        page = client.get("/hospitals", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "nanning" in page.text and "hanoi" in page.text
    finally:
        client.close()
    client = session(*logins["hanoi"])  # and each hospital's
    try:
        assert client.get("/", headers={"Accept": "text/html"}).status_code in (200, 303)
    finally:
        client.close()
    status = aseanfl("status", "-f", str(folder / "federation")).stdout
    assert re.search(r"nanning .* online", status) and re.search(r"hanoi .* online", status), status


def test_the_printed_run_command_runs_a_round_on_the_demo(demo):
    command = next(line.strip() for line in demo["lines"] if line.strip().startswith("aseanfl run -f "))
    args = command.split()[1:]
    args[args.index("--rounds") + 1] = "1"
    done = aseanfl(*args, "--set", "train.local_epochs=1", timeout=400, cwd=demo["folder"])
    assert done.returncode == 0 and "finished:completed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 trained, 0 refused" in done.stdout + done.stderr


def test_ctrl_c_stops_every_process_the_demo_started(demo):
    proc, folder = demo["proc"], demo["folder"]
    assert proc.poll() is None and _processes_under(folder)  # running, with its children
    consoles = [re.search(r"http://\S+", x)[0] for x in demo["lines"] if "http://127.0.0.1:" in x]
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "stopped: every process the demo started has ended." in rest
    assert not _processes_under(folder)
    for url in consoles:
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/login", timeout=2)


def test_a_folder_it_cannot_use_gets_one_line_and_starts_nothing(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("someone's\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder\n")
    for folder, said in ((used, "is not empty"), (blocked / "demo", "cannot be made")):
        done = aseanfl("demo", "--dir", str(folder), timeout=60)
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and said in lines[0], lines
    assert (used / "notes.txt").read_text() == "someone's\n" and sorted(p.name for p in used.iterdir()) == ["notes.txt"]
