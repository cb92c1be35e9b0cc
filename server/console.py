"""`aseanfl server console`: the coordinator's web console, on the server machine beside
`aseanfl server start`. Pages: Hospitals (provisioned, registered, online, last seen), Runs (each
run folder: status, rounds, strategy; per run a live view of the score per round and site, each
site's status per round, epsilon and bytes, and the run folder as one zip), Start (a run from a
federation.yaml, validated as `aseanfl run` validates it; nothing is sent when invalid; a running
run can be stopped), Contests (each contest's leaderboard, server/evaluation/contest.py), Data (the
hospitals' statistics from `aseanfl stats -f`, server/records/statistics.py). It reads the server's folder and asks the SuperLink on its loopback port,
as the `aseanfl` commands do; it opens no other port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse
from starlette.background import BackgroundTask

from common.charts import line_chart
from common.i18n import ENV, N_, _, current
from common.web import Console, build, form, local_time

from server.records.digest import MANY, digest
from server.records.outputs import IDLE
from server.operations.provision import Federation
from server.records.words import node_word, run_word, status_word

PAGES = [("/hospitals", N_("Hospitals")), ("/runs", N_("Runs")), ("/start", N_("Start a run")), ("/contests", N_("Contests")),
         ("/data", N_("Data"))]
RUN_NAME = re.compile(r"^run-[0-9]{1,20}$")  # Flower run ids are 64-bit
FIELDS = ("server.rounds", "strategy.name")  # the form's own fields; other problems go next to the config


def users_path(fed: Federation) -> Path:
    return fed.server_dir / "console-users.json"



def run_dirs(fed: Federation) -> list[Path]:
    runs = fed.server_dir / "runs"
    found = [p for p in runs.iterdir() if p.is_dir() and RUN_NAME.match(p.name)] if runs.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[4:]), reverse=True)


def _config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def run_info(run_dir: Path, link: dict[int, str] | None = None) -> dict:
    """One run folder: what the runs page and the run page say of it."""
    from server.engine.deployment import run_busy
    from server.records.outputs import read_rows

    cfg, run_id = _config(run_dir), int(run_dir.name[4:])
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        summary = {}
    try:
        rows = read_rows(run_dir)
    except OSError:
        rows = []
    done = max((int(r["round"]) for r in rows if r["site"] == "global"), default=0)
    busy = run_busy(run_dir)
    said = (link or {}).get(run_id, "")
    if busy:
        state = "running"
    elif summary:
        state = said or "finished"
    else:
        state = said if said.startswith("finished") else "stopped or lost (no summary)"
    started = (run_dir / "config.yaml").stat().st_mtime if (run_dir / "config.yaml").is_file() else None
    return {"name": run_dir.name, "id": run_id, "state": state, "running": busy, "done": done,
            "planned": (cfg.get("server") or {}).get("rounds"), "strategy": (cfg.get("strategy") or {}).get("name", ""),
            "started": local_time(started), "ended": local_time(summary_path.stat().st_mtime) if summary else "",
            "rows": rows, "summary": summary}


def _status_class(status: str) -> str:
    word = (status or "").split(":")[0]
    return f"status-{word}" if word in ("ok", "refused", "error", "rejected", "no-reply", "not-sampled", "eval-only", "validation-lost") else ""


def _spread_series(rows: list[dict], key: str) -> list[tuple[str, list[tuple[int, float]]]]:
    """Past MANY hospitals: the median and the 10th/90th percentiles across them, per round."""
    by_round: dict[int, list[dict]] = {}
    for r in rows:
        by_round.setdefault(int(r["round"]), []).append(r)
    out: dict[str, list[tuple[int, float]]] = {_("sites' median"): [], _("sites' 10th percentile"): [],
                                               _("sites' 90th percentile"): []}
    for rnd in sorted(by_round):
        d = digest(by_round[rnd])
        if d.scores:
            for name, q in zip(out, (0.5, 0.1, 0.9)):
                out[name].append((rnd, d.quantile(q)))
    return list(out.items())


def run_view(info: dict) -> dict:
    """Chart, site x round statuses, epsilon per site and bytes per round, from the run's rows."""
    from server.records.outputs import score_of

    rows = info["rows"]
    suffix, label = score_of(rows)
    key = f"val_{suffix}"
    sites = sorted({r["site"] for r in rows if r["site"] != "global"})
    rounds = sorted({int(r["round"]) for r in rows})
    series = [(_("federation (global)"), [(int(r["round"]), float(r[key])) for r in rows
                                       if r["site"] == "global" and r.get(key) is not None])]
    many = len(sites) > MANY
    if many:  # hundreds of hospitals: their spread, not a line each
        series += _spread_series(rows, key)
    else:
        series += [(s, [(int(r["round"]), float(r[key])) for r in rows if r["site"] == s and r.get(key) is not None])
                   for s in sites]
    series = [series[0]] + [s for s in series[1:] if s[1]]  # a hospital with no score (refused, failed) has no line
    chart = line_chart(series, _("round"), _("validation {score}", score=label), y_min=0.0, y_max=1.0, name="score")
    cell = {(r["site"], int(r["round"])): r.get("status") or "" for r in rows}
    hidden = 0
    if many:  # the matrix keeps the hospitals that failed in some round; the rest are counted per round
        failing = {r["site"] for r in rows if r["site"] != "global" and (r.get("status") or "ok") not in IDLE}
        hidden, sites = len(sites) - len(failing), sorted(failing)
        for rnd in rounds:
            cell[("counts", rnd)] = digest([r for r in rows if int(r["round"]) == rnd]).counts()
    epsilon = {}
    for r in rows:
        if r["site"] != "global" and r.get("epsilon") is not None:
            epsilon[r["site"]] = float(r["epsilon"])
    traffic = [(int(r["round"]), r.get("bytes_to_site") or 0, r.get("bytes_from_site") or 0) for r in rows
               if r["site"] == "global"]
    return {"chart": chart, "label": label, "sites": sites, "rounds": rounds, "cell": cell, "epsilon": epsilon,
            "traffic": traffic, "status_class": _status_class, "word": status_word, "points": sum(len(p) for _name, p in series),
            "hidden": hidden}


class Launches:
    """Runs started from the console: `aseanfl run` processes, each with its log file."""

    def __init__(self, fed: Federation):
        self.fed, self.folder = fed, fed.server_dir / "console" / "launches"
        self.items: list[dict] = []
        self.lock = threading.Lock()

    def start(self, text: str, sets: list[str], by: str, lang: str = "en") -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{len(self.items)}"
        config, log = self.folder / f"{stamp}.yaml", self.folder / f"{stamp}.log"
        config.write_text(text)
        cmd = [str(Path(sys.executable).parent / "aseanfl"), "run", "-f", str(self.fed.root), "--config", str(config),
               "--out", str(self.fed.server_dir / "console" / "downloads")]
        for s in sets:
            cmd += ["--set", s]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.folder, env={**os.environ, ENV: lang})
        item = {"stamp": stamp, "by": by, "proc": proc, "log": log, "started": time.time()}
        with self.lock:
            self.items.insert(0, item)
        return item

    def view(self) -> list[dict]:
        out = []
        for item in self.items[:20]:
            code = item["proc"].poll()
            try:
                lines = item["log"].read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            found = next((m.group(1) for line in lines if (m := re.search(r"started run (\d+)|^run (\d+)", line))), None)
            out.append({**item, "code": code, "tail": lines[-6:], "run": found, "when": local_time(item["started"])})
        return out


def _zip_run(run_dir: Path) -> Path:
    """The run folder as one zip (the files as they are now; a running run's lock and temp files left out)."""
    fd, name = tempfile.mkstemp(prefix=f"{run_dir.name}-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(run_dir.rglob("*")):
            rel = path.relative_to(run_dir)
            if path.is_file() and not path.is_symlink() and rel.name != ".lock" and not rel.name.endswith(".tmp"):
                z.write(path, f"{run_dir.name}/{rel.as_posix()}")
    return Path(name)


def _errors(text: str) -> dict[str, list[str]]:
    """A ConfigError's lines, by the form field they belong next to ('config' for the rest)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        field = re.split(r"[:：]", line, maxsplit=1)[0].strip()  # a translated line may use a full-width colon
        found.setdefault(field if field in FIELDS else "config", []).append(line)
    return found


def build_console(fed: Federation) -> tuple[FastAPI, Console]:
    from medimaging.yamlconfig import ConfigError
    from strategies.config import STRATEGIES

    from server.operations import control
    from server.engine.deployment import check_run_config

    console = Console(N_("coordinator console: {name}"), N_("hospitals, runs"), PAGES, users_path(fed), name=fed.name,
                      language=current())
    app = build(console)
    launches = Launches(fed)

    def said(problem: str) -> str:
        if not problem or "unavailable" in problem:
            return _("the SuperLink on {address} does not answer (is `aseanfl server start` running?); what is shown "
                     "comes from the server's folder", address=fed.superlink)
        return problem

    def link_runs() -> tuple[dict[int, str], str]:
        res = control._json(control.flwr(fed, "list", fed.name, "--format", "json", timeout=30))
        if not res.get("success"):
            return {}, said(res.get("error-message", ""))
        return {int(r["run-id"]): str(r.get("status", "")) for r in res.get("runs", [])}, ""

    def find(name: str) -> Path | None:
        """The run folder `name` names, or None: only run-<digits> folders directly in the runs folder."""
        if not RUN_NAME.match(name):
            return None
        runs = (fed.server_dir / "runs").resolve()
        path = (runs / name).resolve()
        return path if path.parent == runs and path.is_dir() else None

    @app.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    @app.get("/hospitals")
    def hospitals(request: Request):
        try:
            info = control.status(fed)
        except Exception as exc:  # noqa: BLE001 - the SuperLink's answer could not be read
            info = {"nodes": [], "runs": [], "problems": [_("the SuperLink's answer could not be read: {reason}", reason=exc)]}
        nodes = {n.get("site"): n for n in info["nodes"]}
        revoked = fed.revoked
        rows = []
        for site in sorted({*fed.sites(), *revoked}):
            n = nodes.get(site, {})
            state = "revoked" if site in revoked else n.get("status") or "provisioned, not registered yet"
            rows.append({"site": site, "node": n.get("node-id", ""), "state": state, "label": node_word(state),
                         "online": n.get("online-at") or "",
                         "offline": n.get("offline-at") or "", "seen": n.get("last-seen") or ""})
        return console.render(request, "coordinator_hospitals.html", rows=rows,
                              problems=sorted({said(p) for p in info["problems"]}),
                              address=fed.address)

    @app.get("/runs")
    def runs(request: Request):
        link, problem = link_runs()
        infos = [run_info(p, link) for p in run_dirs(fed)]
        return console.render(request, "coordinator_runs.html", runs=infos, problem=problem,
                              launches=launches.view(), notice=request.query_params.get("started") and
                              _("the run was handed to `aseanfl run`: it appears here once the SuperLink starts it"),
                              word=run_word)

    @app.get("/contests")
    def contest_page(request: Request):
        import sqlite3

        from server.evaluation.contest import contests, leaderboard

        try:
            boards, problems = [leaderboard(fed, c.name) for c in contests(fed)], []
        except (sqlite3.Error, ValueError) as exc:  # a damaged store: say so, show nothing half-read
            boards, problems = [], [_("the contest store could not be read: {reason}", reason=exc)]
        return console.render(request, "coordinator_contests.html", boards=boards, problems=problems)

    @app.get("/data")
    def data_page(request: Request):
        from server.evaluation.statistics import STATS
        from server.records.statistics import data_view

        folders = sorted((p for p in (fed.server_dir / STATS).glob("run-*") if (p / "stats.json").is_file()),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        try:
            view, problems = (data_view(folders[0]) if folders else None), []
        except (OSError, ValueError, KeyError) as exc:  # a damaged stats.json: say so, show nothing half-read
            view, problems = None, [_("the statistics could not be read: {reason}", reason=exc)]
        return console.render(request, "coordinator_data.html", view=view, problems=problems,
                              earlier=[p.name for p in folders[1:]])

    @app.get("/data/{name}/{plot}")
    def data_plot(name: str, plot: str):
        from server.evaluation.statistics import STATS

        path = fed.server_dir / STATS / name / plot
        from server.records.statistics import PLOTS

        if not RUN_NAME.match(name) or plot not in PLOTS or not path.is_file():
            return PlainTextResponse("no such plot", status_code=404)
        return FileResponse(path, media_type="image/png")

    @app.get("/runs/{name}")
    def run_page(request: Request, name: str):
        path = find(name)
        if path is None:
            return PlainTextResponse("no such run", status_code=404)
        link, problem = link_runs()
        info = run_info(path, link)
        notice = {"1": _("stop requested: the SuperLink ends the run"), "0": _("the SuperLink did not stop the run")}.get(
            request.query_params.get("stopped", ""))
        return console.render(request, "coordinator_run.html", run=info, view=run_view(info), problem=problem, word=run_word,
                              notice=notice, notice_kind="ok" if request.query_params.get("stopped") == "1" else "bad")

    @app.get("/runs/{name}/live")
    def run_live(request: Request, name: str):
        path = find(name)
        if path is None:
            return PlainTextResponse("no such run", status_code=404)
        info = run_info(path)
        resp = console.render(request, "coordinator_run_live.html", run=info, view=run_view(info), word=run_word)
        if not info["running"]:
            resp.headers["X-Live-Done"] = "1"
        return resp

    @app.get("/runs/{name}/download")
    def download(name: str):
        path = find(name)
        if path is None:
            return PlainTextResponse("no such run", status_code=404)
        archive = _zip_run(path)
        return FileResponse(archive, media_type="application/zip", filename=f"{fed.name}-{name}.zip",
                            background=BackgroundTask(archive.unlink, missing_ok=True))

    @app.post("/runs/{name}/stop")
    def stop(request: Request, name: str):
        path = find(name)
        if path is None:
            return PlainTextResponse("no such run", status_code=404)
        res = control._json(control.flwr(fed, "stop", name[4:], fed.name, "--format", "json", timeout=60))
        return RedirectResponse(f"/runs/{name}?stopped={1 if res.get('success') else 0}", status_code=303)

    def start_page(request: Request, status: int = 200, **values) -> HTMLResponse:
        values = {"text": "", "rounds": "", "strategy": "", "errors": {}, **values}
        return console.render(request, "coordinator_start.html", status=status, strategies=STRATEGIES, **values)

    @app.get("/start")
    def start_form(request: Request):
        return start_page(request)

    @app.post("/start")
    def start(request: Request):
        fields = form(request)
        text, rounds, strategy = fields.get("config", ""), fields.get("rounds", "").strip(), fields.get("strategy", "")
        sets = [f"server.rounds={rounds}"] * bool(rounds) + [f"strategy.name={strategy}"] * bool(strategy)
        try:
            check_run_config(text, sets)
        except ConfigError as exc:  # named next to its field; nothing is sent
            return start_page(request, 422, text=text, rounds=rounds, strategy=strategy, errors=_errors(str(exc)))
        launches.start(text, sets, request.scope["aseanfl.session"].user, current())
        return RedirectResponse("/runs?started=1", status_code=303)

    return app, console
