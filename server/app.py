"""The coordinator's ServerApp."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.engine.plan import Plan

from server.engine.rounds import run_federation
from server.records.report import write_report


def build_server_app(make_plan: Callable[[Context], Plan] | None = None) -> ServerApp:
    """The ServerApp: a deployment (`aseanfl run`) plans itself from its run config; a simulation
    hands its `make_plan`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if make_plan is None:  # a deployment's ServerApp: the language of who ran `aseanfl run`/`evaluate`
            from common.i18n import use

            use(str(context.run_config.get("lang", "") or "") or None)
        if context.run_config.get("mode") == "evaluation":  # `aseanfl evaluate -f`: score a model, train nothing
            from server.evaluation.federated import deployed_evaluation

            return deployed_evaluation(context, grid)
        if context.run_config.get("mode") == "stats":  # `aseanfl stats -f`: the hospitals' statistics, no model
            from server.evaluation.statistics import deployed_statistics

            return deployed_statistics(context, grid)
        if context.run_config.get("mode") == "deployment":  # `aseanfl run` on real hospitals
            from server.engine.deployment import deployment_plan

            plan = deployment_plan(context, grid)
        elif make_plan is None:
            raise ValueError("this ServerApp runs deployments (`aseanfl run`); a simulation hands it its plan")
        else:
            plan = make_plan(context)
        run_federation(grid, plan)
        write_report(plan.run_dir)

    return app


app = build_server_app()  # deployments only
