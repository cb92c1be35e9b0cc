"""The Flower App's ServerApp ([tool.flwr.app.components]): a deployment plans itself from its
run config (server/engine/deployment.py); `flwr run .` of a simulation gets its plan from simulations/."""

from __future__ import annotations

from flwr.app import Context

from server.app import build_server_app
from server.engine.plan import Plan


def _simulation_plan(context: Context) -> Plan:
    from simulations.runner import plan_from_run_config

    return plan_from_run_config(context.run_config)


serverapp = build_server_app(_simulation_plan)
