"""Serve camfleet's deployments from this process (what `camfleet up` runs).

prefect.yaml is the one list of deployments, schedules, parameters and concurrency
limits: this module reads it, so `camfleet up` and `prefect deploy --all` + a worker
run the same thing. Deployments tagged `device-side` (the edge upload, which runs on
a camera's own machine) are not served here.

    python -m deployments.serve [--only name,name]

Before serving it recovers what a previous stop left behind (deployments/recovery.py)
and turns result persistence on (deployments/results.py). SIGINT and SIGTERM stop it
cleanly: no new runs are taken, runs in progress are cancelled, the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("camfleet.deployments")

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"
# Deployments with this tag run on devices (seed 000), never on the central stack.
DEVICE_SIDE_TAG = "device-side"
# Deployments with this tag resume after a restart instead of being marked Crashed:
# their work is tied to their run id (see deployments/recovery.py).
RESUME_TAG = "resume-after-restart"
# Runs this process executes at once beyond the routine deployments' own limits, so an
# ad-hoc run (a fleet report, a manual trigger) never waits behind routine ones.
AD_HOC_SLOTS = 2


def definitions(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml (anchors resolved)."""
    return yaml.safe_load(path.read_text())["deployments"]


def served_definitions(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    return [d for d in definitions(path) if DEVICE_SIDE_TAG not in (d.get("tags") or [])]


def load_flow(entrypoint: str):
    """`flows/fleet_report.py:fleet_report` -> the flow object (imported as a module)."""
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def schedules(entries: list[dict] | None) -> list:
    from prefect.schedules import Cron, Interval

    built = []
    for entry in entries or []:
        active = entry.get("active", True)
        if "cron" in entry:
            built.append(Cron(entry["cron"], timezone=entry.get("timezone"), active=active))
        elif "interval" in entry:
            built.append(Interval(entry["interval"], active=active))
        else:
            raise ValueError(f"unsupported schedule in prefect.yaml: {entry}")
    return built


def concurrency(value: int | dict | None):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    if isinstance(value, dict):
        return ConcurrencyLimitConfig(**value)
    return value


def limit_of(definition: dict) -> int:
    value = definition.get("concurrency_limit")
    return value["limit"] if isinstance(value, dict) else int(value or 0)


def runner_limit(defs: list[dict]) -> int:
    """Routine deployments' own limits plus room for ad-hoc runs."""
    return sum(limit_of(d) for d in defs) + AD_HOC_SLOTS


def build(defs: list[dict] | None = None) -> list:
    """RunnerDeployments for every served entry of prefect.yaml."""
    deployments = []
    for d in served_definitions() if defs is None else defs:
        deployments.append(
            load_flow(d["entrypoint"]).to_deployment(
                name=d["name"],
                description=d.get("description"),
                parameters=d.get("parameters") or {},
                schedules=schedules(d.get("schedules")),
                concurrency_limit=concurrency(d.get("concurrency_limit")),
                tags=d.get("tags") or [],
                # a pause left by an older serve that paused on shutdown ends here
                paused=False,
            )
        )
    return deployments


def _runner_class():
    from prefect.runner import Runner

    class CamfleetRunner(Runner):
        """A Runner that stops on SIGINT as on SIGTERM, from inside its own event loop.

        Prefect's handler calls the sync `stop()` from the loop thread, which only
        creates an `astop()` coroutine nobody awaits, then exits: runs being submitted
        stayed Pending for ever.
        """

        async def start(self, *args: Any, **kwargs: Any) -> None:
            self._camfleet_loop = asyncio.get_running_loop()
            self._camfleet_stopping = False
            signal.signal(signal.SIGINT, self.handle_sigterm)
            await super().start(*args, **kwargs)

        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            if self._camfleet_stopping:
                return
            self._camfleet_stopping = True
            self._logger.info("stopping: taking no new runs, cancelling runs in progress")
            loop = self._camfleet_loop
            loop.call_soon_threadsafe(lambda: loop.create_task(self.astop()))

    return CamfleetRunner


async def serve(defs: list[dict], deployments: list) -> None:
    from deployments.recovery import recover_interrupted_runs

    runner = _runner_class()(limit=runner_limit(defs), pause_on_shutdown=False)
    ids = {}
    for definition, deployment in zip(defs, deployments, strict=True):
        ids[await runner.aadd_deployment(deployment)] = definition
    summary = await recover_interrupted_runs(ids, resume_tag=RESUME_TAG)
    log.info("recovered after the previous stop: %s", summary)
    await runner.start()


def main(argv: list[str] | None = None) -> None:
    from deployments.results import apply_result_settings

    parser = argparse.ArgumentParser(prog="python -m deployments.serve")
    parser.add_argument("--only", help="comma-separated deployment names to serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    apply_result_settings()  # before any flow runs: served runs inherit the environment
    defs = served_definitions()
    if args.only:
        wanted = set(args.only.split(","))
        defs = [d for d in defs if d["name"] in wanted]
        if unknown := wanted - {d["name"] for d in defs}:
            raise SystemExit(f"not in prefect.yaml (or device-side): {', '.join(sorted(unknown))}")
    deployments = build(defs)  # outside the loop: to_deployment is sync only there
    asyncio.run(serve(defs, deployments))
    log.info("stopped")


if __name__ == "__main__":
    main()
