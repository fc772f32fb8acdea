"""Prefect automations camfleet needs on a self-hosted Prefect server.

Zombie flow runs: a run whose process or machine dies (a worker killed, a box losing
power) stays Running on the server forever unless something marks it Crashed. Prefect
Cloud does that itself; a self-hosted server needs this automation, after Prefect's
recipe (https://docs.prefect.io/v3/advanced/detect-zombie-flows): a run that sent a
heartbeat and then neither another heartbeat nor a final state within ZOMBIE_AFTER_S
is set Crashed, so the UI shows it failed and its events are visibly someone else's.

Runs must send heartbeats for it: PREFECT_FLOWS_HEARTBEAT_FREQUENCY=HEARTBEAT_S in
the environment of workers and served deployments (`camfleet up` sets it). Prefect's
default is no heartbeat at all or 180 s depending on the version, and the window must
exceed the heartbeat period or healthy long runs would be crashed.

Known gap (docs/reliability.md, event upload finding 5): a run killed before its first
heartbeat reached the server is never armed, so it stays Running.

`camfleet up` creates the automation once (`ensure_automations`); with a work pool,
run `python -m deployments.automations` against the server once.
"""

from __future__ import annotations

HEARTBEAT_S = 30  # Prefect's minimum heartbeat period
ZOMBIE_AFTER_S = 75  # two and a half heartbeats: one late heartbeat is not a death
ZOMBIE_AUTOMATION = "camfleet: crash zombie flow runs"
CRASH_MESSAGE = "Flow run stopped sending heartbeats."


def zombie_automation():
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    trigger = EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        after={"prefect.flow-run.heartbeat"},
        expect={
            "prefect.flow-run.heartbeat",
            "prefect.flow-run.Completed",
            "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled",
            "prefect.flow-run.Crashed",
        },
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=ZOMBIE_AFTER_S,
    )
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="Marks flow runs whose heartbeats stopped as Crashed (camfleet).",
        trigger=trigger,
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=CRASH_MESSAGE)],
    )


async def ensure_automation(client, wanted, up_to_date=lambda existing: True) -> bool:
    """Create `wanted` when no automation has its name, or replace the existing one when
    `up_to_date(existing)` says it is stale; True when the server changed.

    Automations are found by name because that is what an operator sees and keeps:
    camfleet never makes a second automation of a name it owns.
    """
    existing = await client.read_automations_by_name(wanted.name)
    if not existing:
        await client.create_automation(wanted)
        return True
    if up_to_date(existing[0]):
        return False
    await client.update_automation(existing[0].id, wanted)
    return True


async def ensure_automations(client) -> list[str]:
    """Create what is missing (by name); returns the names created."""
    created = await ensure_automation(client, zombie_automation())
    return [ZOMBIE_AUTOMATION] if created else []


def run_against_server(ensure, verb: str, up_to_date: str) -> None:
    """`python -m deployments.<module>`: run `ensure(client)` against the configured
    Prefect server and print the names it changed."""
    import anyio
    from prefect.client.orchestration import get_client

    async def run() -> list[str]:
        async with get_client() as client:
            return await ensure(client)

    names = anyio.run(run)
    print(f"{verb}: " + ", ".join(names) if names else up_to_date)


def main() -> None:
    run_against_server(ensure_automations, "created", "automations up to date")


if __name__ == "__main__":
    main()
