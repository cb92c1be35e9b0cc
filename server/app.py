"""The coordinator's ServerApp."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .loop import Plan, run_federation
from .report import write_report


def _plan_from_run_config(context: Context) -> Plan:
    from simulations.runner import plan_from_run_config  # `flwr run .` of a simulation

    return plan_from_run_config(context.run_config)


def build_server_app(make_plan: Callable[[Context], Plan] = _plan_from_run_config) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if context.run_config.get("mode") == "deployment":  # `aseanfl run` on real hospitals
            from .deployment import deployment_plan

            plan = deployment_plan(context, grid)
        else:
            plan = make_plan(context)
        run_federation(grid, plan)
        write_report(plan.run_dir)

    return app


app = build_server_app()
