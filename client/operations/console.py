"""`aseanfl client console`: the hospital's web console for its data steward, beside the daemon.
Pages: Data (what check-data shows), Apps (approved bundles, refused ones as requests to approve
or reject, revoke), Privacy (each ledger against the budget), Audit (the log, its chain checked),
Daemon (connected or not, last task, last error). It reads the hospital's own files and writes
only approved-apps.yaml, the requests file and the audit log; it never talks to the server.
File names appear (local only); no patient identifier or DICOM header value does: the decoders'
notes are shown with their quoted values hidden."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse

from common.allowlist import approved_hashes
from common.charts import line_chart
from common.i18n import N_, Text, _, current, shown, text_of
from common.web import Console, build, form, local_time

from client.operations import approvals, status
from client.operations.audit import EVENTS, forbidden_strings, verify
from client.config import SiteConfig

PAGES = [("/data", N_("Data")), ("/apps", N_("Apps")), ("/privacy", N_("Privacy")), ("/audit", N_("Audit")),
         ("/daemon", N_("Daemon"))]
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DAEMON_STATES = {"connected": N_("connected"), "waiting": N_("waiting for the server"),
                 "refused": N_("refused at the server's door"), "reconnecting": N_("reconnecting"), "stopped": N_("stopped")}
AUDIT_ROWS = 300  # newest entries shown (the whole log is checked)
DONE = {"approved": N_("approved: the daemon runs this bundle from its next task"),
        "rejected": N_("rejected: it stays refused, and listed as rejected"),
        "revoked": N_("approval revoked: the daemon refuses this bundle from its next task"),
        "unchanged": N_("nothing changed (already decided)")}


def users_path(site: SiteConfig) -> Path:
    return site.state_dir / "console-users.json"


def _hide_values(text: str) -> str:
    """A decoder's note with what it quotes (a header's value, say) left out."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)



def _ledgers(site: SiteConfig) -> list[dict]:
    from client.training.accounting import epsilon_of
    from client.training.privacy import LedgerFile

    out = []
    for path in sorted(site.privacy.ledger_dir.glob("*.json")) if site.privacy.ledger_dir.is_dir() else []:
        try:
            ledger = LedgerFile.model_validate_json(path.read_text())
        except (ValueError, OSError) as exc:
            out.append({"file": path.name, "error": _("unreadable ({reason}): the daemon refuses to train",
                                                      reason=exc.__class__.__name__)})
            continue
        entries, cap = ledger.entries, site.privacy.cap
        spent = entries[-1].epsilon_after if entries else 0.0
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        after = epsilon_of(history + history[-1:], ledger.delta, ledger.accountant) if entries else None
        runs: dict[str, list] = {}
        for e in entries:
            runs.setdefault(e.run, []).append(e)
        chart = line_chart([(_("epsilon spent"), [(i + 1, e.epsilon_after) for i, e in enumerate(entries)])],
                           _("rounds trained (every run, in order)"), "epsilon", y_min=0.0, limit=cap,
                           limit_label=_("budget {budget}", budget=f"{cap:g}"), name="privacy")
        out.append({"file": path.name, "ledger": ledger, "spent": spent, "cap": cap, "left": cap - spent,
                    "next": after, "next_cost": None if after is None else after - spent,
                    "next_fits": after is not None and after <= cap, "runs": runs, "chart": chart,
                    "time": local_time})
    return out


def _audit_entries(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"broken": True}
        entry["line"] = number
        out.append(entry)
    return out


def build_console(site: SiteConfig) -> tuple[FastAPI, Console]:
    console = Console(N_("hospital console: {name}"), N_("data, apps, privacy, audit"), PAGES, users_path(site),
                      name=site.site, language=site.language or current())
    app = build(console)
    checks = site.state_dir / "console" / "data-check.json"

    @app.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/data", status_code=303)

    job = {"running": False, "started": None, "error": ""}  # the data check runs beside the pages
    lock = threading.Lock()

    def run_check() -> None:
        from client.operations.datacheck import check

        try:
            found = check(site)
            checks.parent.mkdir(parents=True, exist_ok=True)
            tmp = checks.with_name(".data-check.json.tmp")
            tmp.write_text(found.model_dump_json())
            tmp.replace(checks)
            job["error"] = ""
        except (ValueError, OSError) as exc:
            job["error"] = Text("data error: {reason}", reason=text_of(exc))
        finally:
            job["running"] = False

    def data_values() -> dict:
        from client.operations.datacheck import MASKS, DataCheck

        found, error = None, shown(job["error"])
        if checks.is_file():
            try:
                found = DataCheck.model_validate_json(checks.read_text())
            except ValueError:
                error = error or _("the last check's results cannot be read; check again")
        notes = [(f, _hide_values(n)) for f, n in found.notes] if found else []
        return {"found": found, "notes": notes, "error": error, "job": job, "since": local_time(job["started"]), "masks": MASKS,
                "checked": local_time(found.checked_at) if found else ""}

    @app.get("/data")
    def data(request: Request):
        return console.render(request, "hospital_data.html", **data_values())

    @app.get("/data/live")
    def data_live(request: Request):
        resp = console.render(request, "hospital_data_live.html", **data_values())
        if not job["running"]:
            resp.headers["X-Live-Done"] = "1"
        return resp

    @app.post("/data/check")
    def data_check(request: Request):
        with lock:  # one check at a time, however often the button is pressed
            if not job["running"]:
                job.update(running=True, started=time.time())
                threading.Thread(target=run_check, name="data-check", daemon=True).start()
        return RedirectResponse("/data", status_code=303)

    @app.get("/apps")
    def apps(request: Request):
        done = request.query_params.get("done", "")
        try:
            approved, asked = list(approved_hashes(site.approved_apps).values()), approvals.requests(site)
            problem = ""
        except (OSError, ValueError, yaml.YAMLError) as exc:
            approved, asked = [], []
            problem = _("{file} cannot be read ({reason}); the daemon runs nothing until it is mended",
                        file=site.approved_apps, reason=exc)
        return console.render(request, "hospital_apps.html", approved=approved, problem=problem,
                              pending=[r for r in asked if r.get("state") == "pending"],
                              rejected=[r for r in asked if r.get("state") == "rejected"],
                              required=site.require_approval, allowlist=site.approved_apps,
                              notice=_(DONE[done]) if done in DONE else None)

    def decide(request: Request, action, done: str) -> RedirectResponse:
        fields = form(request)
        digest = fields.get("sha256", "").strip().lower()
        if not SHA256.match(digest):
            return RedirectResponse("/apps", status_code=303)
        who = request.scope["aseanfl.session"].user
        changed = action(site, digest, f"{who} (console)", fields.get("note", "")[:500])
        return RedirectResponse(f"/apps?done={done if changed else 'unchanged'}", status_code=303)

    @app.post("/apps/approve")
    def approve(request: Request):
        return decide(request, approvals.approve, "approved")

    @app.post("/apps/reject")
    def reject(request: Request):
        return decide(request, approvals.reject, "rejected")

    @app.post("/apps/revoke")
    def revoke(request: Request):
        return decide(request, approvals.revoke, "revoked")

    @app.get("/privacy")
    def privacy(request: Request):
        return console.render(request, "hospital_privacy.html", ledgers=_ledgers(site), policy=site.privacy)

    @app.get("/audit")
    def audit(request: Request, run: str = "", type: str = ""):
        entries = _audit_entries(site.audit_log)
        kinds = sorted({e.get("type") or e.get("event") for e in entries if not e.get("broken")} - {None})
        runs = sorted({str(e["run"]) for e in entries if e.get("run") is not None}, key=lambda r: (len(r), r))
        listed = [e for e in reversed(entries)
                 if (not run or str(e.get("run")) == run) and (not type or type in (e.get("type"), e.get("event")))]
        report = verify(site.audit_log, site.site, forbidden_strings(site))
        return console.render(request, "hospital_audit.html", entries=listed[:AUDIT_ROWS], total=len(listed), kinds=kinds,
                              runs=runs, run=run, type=type, report=report, events=EVENTS, log_path=site.audit_log,
                              first_problem=shown(report.problems[0]) if report.problems else "")

    @app.get("/daemon")
    def daemon(request: Request):
        said, task = status.read(site, "daemon"), status.read(site, "last-task")
        if task.get("details"):  # Flower's "<class 'X'>:<'why'>" -> why
            task["details"] = re.sub(r"^<class '[^']*'>:<'(.*)'>$", r"\1", task["details"], flags=re.S)
        running = bool(said) and said.get("state") != "stopped" and status.alive(said.get("pid"))
        return console.render(request, "hospital_daemon.html", said=said, task=task, running=running, time=local_time,
                              states=DAEMON_STATES,
                              server=site.connection.server if site.connection else "")

    return app, console
