"""Serve every camfleet deployment from this process (what `camfleet up` runs).

Same deployments as prefect.yaml, for a single machine without a work pool:
`python -m deployments.serve`. With a worker pool, use `prefect deploy --all` and
`prefect worker start --pool camfleet-process` instead.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

log = logging.getLogger("camfleet.deployments")


@dataclass(frozen=True)
class Spec:
    module: str
    flow: str
    name: str
    interval: int | None = None  # seconds
    cron: str | None = None
    parameters: dict = field(default_factory=dict)
    description: str = ""


# One line per deployment; the schedules match prefect.yaml.
DEPLOYMENTS = [
    Spec(
        "flows.fleet_report",
        "fleet_report",
        "fleet-report",
        cron="0 6 * * *",
        description="Daily fleet summary as artifacts, Parquet, CSV and a chart.",
    ),
    # Capture triggers (docs/triggers.md): one scheduler run a minute plans the next window.
    Spec(
        "flows.triggers",
        "trigger_scheduler",
        "trigger-scheduler",
        interval=60,
        description="Sweep ended triggers, then plan the next window of scheduled captures.",
    ),
    Spec(
        "flows.triggers",
        "manual_trigger",
        "manual-trigger",
        description="One capture now; fails when the device does not execute it in time.",
    ),
    Spec(
        "flows.triggers",
        "expire_triggers",
        "expire-triggers",
        description="End triggers whose time is up.",
    ),
    Spec(
        "flows.evaluation",
        "evaluate_captures",
        "evaluate-captures",
        interval=60,
        description="Score pending captures with Pillow.",
    ),
    # No schedule: the device API creates one run per 10 s window of ingests (docs/devices-api.md).
    Spec(
        "flows.ingest_processing",
        "lifelog_ingest_processing",
        "lifelog-ingest-processing",
        description="Verify and record the Lifelog items ingested in one window.",
    ),
]


def build():
    deployments = []
    for spec in DEPLOYMENTS:
        try:
            module = importlib.import_module(spec.module)
        except ModuleNotFoundError as exc:
            if exc.name != spec.module:
                raise
            log.warning("skipping %s: %s is not installed", spec.name, spec.module)
            continue
        flow = getattr(module, spec.flow)
        deployments.append(
            flow.to_deployment(
                name=spec.name,
                interval=spec.interval,
                cron=spec.cron,
                parameters=spec.parameters,
                description=spec.description or None,
            )
        )
    return deployments


def main() -> None:
    from prefect import serve

    serve(*build(), limit=4)


if __name__ == "__main__":
    main()
