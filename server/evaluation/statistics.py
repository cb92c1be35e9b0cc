"""`aseanfl stats -f`: the ServerApp job that asks every connected hospital for its statistics
(server/engine/census.py) and writes them (server/records/statistics.py), and the coordinator's
command that starts it through the approved app, as `aseanfl evaluate -f` is started."""

from __future__ import annotations

import logging

from common.i18n import _
from medimaging.yamlconfig import ConfigError
from protocol.messages import DescribeSpec

from server.engine.census import ask, site_statistics

log = logging.getLogger("aseanfl")
STATS = "stats"  # beside runs/ on the coordinator's disk: run-<id> folders of statistics


def deployed_statistics(context, grid) -> None:
    """The ServerApp of `aseanfl stats -f`: every connected hospital's statistics, pooled, into
    server/stats/run-<id>."""
    import os
    from pathlib import Path

    from server.engine.deployment import _stream_logs, await_sites, lock_run_dir, run_folder
    from server.engine.names import registered_names
    from server.operations.control import RUNS_ENV
    from server.records.statistics import write_statistics

    _stream_logs()
    rc = context.run_config
    spec = DescribeSpec.model_validate_json(str(rc["describe"]))
    runs = Path(os.environ.get(RUNS_ENV) or "runs")
    out_dir = run_folder(runs.parent / STATS, context.run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not lock_run_dir(out_dir):
        raise ConfigError(f"{out_dir}: another server process is writing these statistics")
    wanted, wait = int(rc.get("wait-for-sites", 1)), float(rc.get("wait-timeout-s", 120))
    log.info(_("statistics {request}: waiting for {count} hospital(s) (up to {seconds} s)", request=spec.request,
               count=wanted, seconds=f"{wait:g}"))
    connected = await_sites(grid, wanted, wait)
    log.info(_("{count} hospital(s) connected; asking for their statistics", count=connected))
    answers = ask(grid, registered_names(runs.parent / "registered.json"), spec, "stats", float(rc.get("timeout-s", 600)))
    result = write_statistics(out_dir, site_statistics(answers), spec.min_count, spec.request)
    for site, s in result["sites"].items():
        log.info("%s: %s", site, s.get("error") or _("released"))
    log.info(_("done: {file}", file=out_dir / "stats.md"))



class StatisticsFailed(RuntimeError):
    """`aseanfl stats -f` could not run or wrote nothing (one line, for the operator)."""


def run_statistics(fed, min_count: int, out, wait_for_sites: int = 1, wait_timeout_s: float = 120.0,
                   timeout_s: float = 600.0, image_size: int = 64, echo=print):
    """`aseanfl stats -f`: the approved ServerApp asks every connected hospital; (stats.json's
    content, the local copy of its folder)."""
    import json
    import time

    from server.operations.bundle import app_dir
    from server.operations.control import start_run

    spec = DescribeSpec(request=f"stats-{time.strftime('%Y%m%d-%H%M%S')}", image_size=image_size, min_count=min_count)
    run_config = {"mode": "stats", "describe": spec.model_dump_json(), "wait-for-sites": str(wait_for_sites),
                  "wait-timeout-s": str(wait_timeout_s), "timeout-s": str(timeout_s)}
    out.mkdir(parents=True, exist_ok=True)
    try:
        run_id, final, local = start_run(fed, "", [], app_dir(), out, echo, timeout=wait_timeout_s + timeout_s + 300,
                                         run_config=run_config, folders=STATS)
    except (PermissionError, RuntimeError) as exc:
        raise StatisticsFailed(str(exc)) from None
    if final == "lost":
        raise StatisticsFailed(f"statistics run {run_id}: the server was lost (its SuperLink stopped answering)")
    if local is None or not (local / "stats.json").is_file():
        raise StatisticsFailed(f"statistics run {run_id}: {final or 'status unknown'}, and nothing was written "
                               "(see the lines above)")
    return json.loads((local / "stats.json").read_text()), local
