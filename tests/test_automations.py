"""camfleet's zombie-run automation on a real Prefect server: created once, by name."""

from __future__ import annotations

import anyio

from deployments.automations import ZOMBIE_AFTER_S, ZOMBIE_AUTOMATION, ensure_automations


def test_zombie_automation_is_created_once(prefect_api_url):
    from prefect.client.orchestration import get_client

    async def scenario():
        async with get_client() as client:
            for old in await client.read_automations_by_name(ZOMBIE_AUTOMATION):
                await client.delete_automation(old.id)  # a clean slate on a shared server
            first = await ensure_automations(client)
            second = await ensure_automations(client)
            found = await client.read_automations_by_name(ZOMBIE_AUTOMATION)
            return first, second, found

    first, second, found = anyio.run(scenario)
    assert first == [ZOMBIE_AUTOMATION] and second == []
    assert len(found) == 1
    automation = found[0]
    assert automation.trigger.within.total_seconds() == ZOMBIE_AFTER_S
    assert automation.actions[0].state.value == "CRASHED"
