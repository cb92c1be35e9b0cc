"""The coordinator's side of federated evaluation on a deployment (`aseanfl evaluate -f`) and the
contest's leaderboard (`aseanfl contest submit`, `aseanfl leaderboard`, the console's Contests page).

A contest is a named task: the task's shape (as federation.yaml's `task:`), the evaluation split
the hospitals are asked for, the metric it ranks by, the small-cell floor. Submissions (a team, a
model file and its card) are checked here, scored at every connected hospital through the
ServerApp (server/evaluation/federated.py: deployed_evaluation), and kept in server/contests.db (SQLite)
with the model's sha256, the time and every hospital's released figures. A model already
scored in the contest (same sha256) is not scored again: the hospitals' figures are seeded, so
it would give the same numbers, and every evaluation asks the hospitals for their time."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Literal

from pydantic import Field

from medimaging.config import Strict
from medimaging.yamlconfig import ConfigError, read_config

from server.evaluation.federated import EVALUATIONS, ModelCard, check_against_task, check_model_file, evaluation_spec, stored_model
from server.engine.plan import TaskShape
from server.operations.provision import Federation

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "dice")


class EvaluationFailed(RuntimeError):
    """The evaluation could not be run or gave no figures (one line, for the operator)."""


class ContestTask(Strict):
    in_channels: int = Field(1, ge=1, le=4)
    num_classes: int = Field(2, ge=2)
    image_size: int = Field(64, ge=8, le=512)
    kind: Literal["classification", "segmentation"] = "classification"
    spatial_dims: Literal[2, 3] = 2

    def shape(self) -> TaskShape:
        return TaskShape(self.in_channels, self.num_classes, self.image_size, self.kind, self.spatial_dims)


class Contest(Strict):
    """contest.yaml: what every submission is scored on and ranked by."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the contest's name in the store")
    task: ContestTask = ContestTask()
    split: Literal["test", "validation"] = Field("test", description="the hospitals' cases asked for")
    metric: Literal["auc", "accuracy", "sensitivity", "specificity", "dice"] = Field(
        "auc", description="the pooled figure the leaderboard ranks by (dice: the mean of the labels' global Dice)")
    min_cases: int = Field(20, ge=1, description="figures on fewer positives or negatives are withheld")
    seed: int = Field(0, ge=0, description="the hospitals' bootstrap seed: the same model gives the same numbers")
    wait_for_sites: int = Field(1, ge=1, description="hospitals to wait for before the model is sent")
    wait_timeout_s: float = Field(120.0, gt=0)
    timeout_s: float = Field(600.0, gt=0, description="how long the hospitals have to reply")


def read_contest(path: Path) -> Contest:
    return read_config(path, None, Contest)


def run_evaluation(fed: Federation, model: Path, card: ModelCard, task: TaskShape | None, where: str, *, min_cases: int,
                   out: Path, split: str = "test", seed: int = 0, name: str | None = None, wait_for_sites: int = 1,
                   wait_timeout_s: float = 120.0, timeout_s: float = 600.0, app: Path | None = None,
                   echo: Callable[[str], None] = print) -> tuple[dict, Path]:
    """Check the model (against `task` when given, and its file against the card), store it
    where the ServerApp reads it, score it at every connected hospital. (evaluation.json's
    content, the local copy of its folder). ConfigError before anything is sent;
    EvaluationFailed when the evaluation did not give its figures."""
    from server.engine.config import RunConfig
    from server.operations.bundle import app_dir
    from server.operations.control import start_run

    if task is not None:
        check_against_task(card, task, where)
    check_model_file(model, card, RunConfig())
    spec = evaluation_spec(card, model, min_cases, seed, split, name)
    stored_model(fed.server_dir, model, spec.model_sha256)
    run_config = {"mode": "evaluation", "evaluation": spec.model_dump_json(), "wait-for-sites": str(wait_for_sites),
                  "wait-timeout-s": str(wait_timeout_s), "timeout-s": str(timeout_s)}  # as pyproject.toml declares them
    out.mkdir(parents=True, exist_ok=True)
    try:
        run_id, final, local = start_run(fed, "", [], app or app_dir(), out, echo, timeout=wait_timeout_s + timeout_s + 300,
                                         run_config=run_config, folders=EVALUATIONS)
    except (PermissionError, RuntimeError) as exc:
        raise EvaluationFailed(str(exc)) from None
    if final == "lost":
        raise EvaluationFailed(f"evaluation run {run_id}: the server was lost (its SuperLink stopped answering); "
                               "evaluate again once `aseanfl server start` runs")
    if local is None or not (local / "evaluation.json").is_file():
        raise EvaluationFailed(f"evaluation run {run_id}: {final or 'status unknown'}, and no figures were written "
                               "(see the lines above)")
    return json.loads((local / "evaluation.json").read_text()), local


# -- the store ----------------------------------------------------------------------------------

def store_path(fed: Federation) -> Path:
    return fed.server_dir / "contests.db"


def _db(fed: Federation) -> sqlite3.Connection:
    db = sqlite3.connect(store_path(fed), timeout=30)
    db.execute("CREATE TABLE IF NOT EXISTS contests (name TEXT PRIMARY KEY, definition TEXT NOT NULL, "
               "created_at TEXT NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS submissions (id INTEGER PRIMARY KEY AUTOINCREMENT, contest TEXT NOT NULL, "
               "team TEXT NOT NULL, model_sha256 TEXT NOT NULL, card TEXT NOT NULL, submitted_at TEXT NOT NULL, "
               "run_id TEXT, result TEXT NOT NULL, UNIQUE (contest, model_sha256))")
    return db


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def register_contest(fed: Federation, contest: Contest) -> None:
    """Keep the contest's definition; a different definition under the same name is refused
    (its submissions were scored under the first one)."""
    definition = contest.model_dump_json()
    with closing(_db(fed)) as db, db:
        row = db.execute("SELECT definition FROM contests WHERE name = ?", (contest.name,)).fetchone()
        if row is None:
            db.execute("INSERT INTO contests VALUES (?, ?, ?)", (contest.name, definition, _now()))
        elif json.loads(row[0]) != json.loads(definition):
            raise ConfigError(f"contest {contest.name}: the store holds another definition under this name (its "
                              "submissions were scored under it); give the changed contest another name")


def find_contest(fed: Federation, name: str) -> Contest:
    with closing(_db(fed)) as db:
        row = db.execute("SELECT definition FROM contests WHERE name = ?", (name,)).fetchone()
        names = [r[0] for r in db.execute("SELECT name FROM contests ORDER BY name")]
    if row is None:
        raise ConfigError(f"no contest {name!r} in {store_path(fed)}" + (f" (it has: {', '.join(names)})" if names else ""))
    return Contest.model_validate_json(row[0])


def contests(fed: Federation) -> list[Contest]:
    if not store_path(fed).is_file():
        return []
    with closing(_db(fed)) as db:
        return [Contest.model_validate_json(r[0]) for r in db.execute("SELECT definition FROM contests ORDER BY name")]


def earlier(fed: Federation, contest: str, digest: str) -> dict | None:
    with closing(_db(fed)) as db:
        row = db.execute("SELECT id, team, submitted_at FROM submissions WHERE contest = ? AND model_sha256 = ?",
                         (contest, digest)).fetchone()
    return None if row is None else {"id": row[0], "team": row[1], "submitted_at": row[2]}


def submit(fed: Federation, contest: Contest, team: str, model: Path, card: ModelCard, where: str,
           out: Path, app: Path | None = None, echo: Callable[[str], None] = print) -> tuple[dict, bool]:
    """Score a team's model in the contest and keep its figures; (its submission, whether it was
    scored now). A model the contest already scored (same sha256) is not scored again."""
    from server.evaluation.federated import sha256

    if not team.strip() or len(team) > 80:
        raise ConfigError("--team: give the team's name (1-80 characters)")
    if not model.is_file():
        raise ConfigError(f"model file {model}: not found")
    register_contest(fed, contest)
    digest = sha256(model)
    if (seen := earlier(fed, contest.name, digest)) is not None:
        return {**seen, "model_sha256": digest}, False
    result, local = run_evaluation(
        fed, model, card, contest.task.shape(), where, min_cases=contest.min_cases, out=out, split=contest.split,
        seed=contest.seed, name=f"{contest.name}-{digest[:12]}", wait_for_sites=contest.wait_for_sites,
        wait_timeout_s=contest.wait_timeout_s, timeout_s=contest.timeout_s, app=app, echo=echo)
    scored = [s for s in result["sites"].values() if "error" not in s]
    if not scored:
        raise EvaluationFailed(f"no hospital scored the model (see {local / 'evaluation.md'}); nothing was recorded")
    with closing(_db(fed)) as db, db:
        cur = db.execute("INSERT INTO submissions (contest, team, model_sha256, card, submitted_at, run_id, result) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (contest.name, team.strip(), digest, card.model_dump_json(),
                                                         _now(), local.name, json.dumps(result)))
        sid = cur.lastrowid
    return {"id": sid, "team": team.strip(), "model_sha256": digest, "folder": str(local)}, True


def figure(result: dict, metric: str) -> tuple[float | None, dict]:
    """(the pooled figure the contest ranks by, its 95 % interval)."""
    pooled = result["pooled"]
    if metric == "dice":
        dice = [d for d in pooled.get("global_dice", []) if d is not None]
        return (sum(dice) / len(dice) if dice else None), {}
    value = pooled.get(metric)
    return (value if isinstance(value, float) else None), pooled.get("intervals", {}).get(metric) or {}


def leaderboard(fed: Federation, name: str) -> tuple[Contest, list[dict]]:
    """The contest and its submissions ranked by the pooled metric (a submission whose figure
    was withheld everywhere comes last, unranked); ties share a rank."""
    contest = find_contest(fed, name)
    with closing(_db(fed)) as db:
        rows = db.execute("SELECT id, team, model_sha256, submitted_at, result FROM submissions WHERE contest = ? "
                          "ORDER BY id", (name,)).fetchall()
    board = []
    for sid, team, digest, at, result in rows:
        result = json.loads(result)
        value, ci = figure(result, contest.metric)
        sites = result["sites"]
        board.append({"id": sid, "team": team, "model_sha256": digest, "submitted_at": at, "value": value,
                      "low": ci.get("low"), "high": ci.get("high"), "cases": result["pooled"]["cases"],
                      "scored": sum("error" not in s for s in sites.values()), "asked": len(sites),
                      "withheld": result["pooled"].get("left_out", [])})
    board.sort(key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["id"]))
    rank, last = 0, object()
    for i, row in enumerate(board, 1):
        if row["value"] is None:
            row["rank"] = None
            continue
        if row["value"] != last:
            rank, last = i, row["value"]
        row["rank"] = rank
    return contest, board
