"""Which components each side runs, in what order, gated on what readiness.

The supervisor (``facehub.process``) runs any list of :class:`ChildSpec`; this
module is the only place that knows what the edge and the cloud consist of.
"""

from __future__ import annotations

import importlib
from typing import Callable

from facehub.config import Config
from facehub.process.supervisor import ChildSpec
from facehub.runtime import Runtime

COMPONENTS = {
    "detector": "facehub.edge.detector:run",
    "forwarder": "facehub.edge.forwarder:run",
    "logger": "facehub.edge.face_logger:run",
    "saver": "facehub.cloud.saver:run",
    "console": "facehub.cloud.console.app:run",
    "retention": "facehub.cloud.console.retention:run",
}
ROLES = ("edge", "cloud")
# Gauges the supervisor adds up across children for its one-line summary.
SUMMARY_GAUGES = ("spool_depth", "dead_letters")


def role_specs(config: Config, role: str) -> list[ChildSpec]:
    """The children a role runs.

    On the edge the detector starts only once the forwarder reports its persistent
    session subscribed on the edge broker, so the very first faces of a new device
    are not published before anyone will keep them.
    """
    if role == "edge":
        return [ChildSpec("forwarder", COMPONENTS["forwarder"]),
                ChildSpec("logger", COMPONENTS["logger"]),
                ChildSpec("detector", COMPONENTS["detector"], after=("forwarder", "edge_subscribed"))]
    if role == "cloud":
        count = config.saver.instances
        specs = [ChildSpec(f"saver-{i}", COMPONENTS["saver"]) for i in range(1, count + 1)]
        if config.console.enabled:
            specs.append(ChildSpec("console", COMPONENTS["console"]))
        if config.retention.days:
            specs.append(ChildSpec("retention", COMPONENTS["retention"]))
        return specs
    raise ValueError(f"unknown role {role!r}")


def component_target(name: str) -> Callable[[Config, Runtime], None]:
    """A component's ``run`` function, by component or instance name (``saver-2``)."""
    base = name if name in COMPONENTS else name.split("-")[0]
    module, _, function = COMPONENTS[base].partition(":")
    return getattr(importlib.import_module(module), function)
