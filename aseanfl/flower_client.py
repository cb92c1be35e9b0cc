"""The Flower App's ClientApp ([tool.flwr.app.components] in pyproject.toml), which both
`flwr run .` (a simulation) and `aseanfl run` (a deployment) start. This is where the roles
meet: each node gets its hospital from its own kind (a deployed SuperNode names its site.yaml,
a simulated one carries a partition-id), so the hospital's code (client/) never reaches into the
researcher's (simulations/), and a deployed hospital never imports simulation code."""

from __future__ import annotations

from flwr.app import Context

from client.training.app import Hospital, build_client_app
from client.training.site import SITE_CONFIG_KEY, load_site_hospital


def _hospital(context: Context, image_size: int) -> Hospital:
    if SITE_CONFIG_KEY in context.node_config:
        return load_site_hospital(context, image_size)
    from simulations.federation import hospital_from_context

    return hospital_from_context(context, image_size)


clientapp = build_client_app(_hospital)
