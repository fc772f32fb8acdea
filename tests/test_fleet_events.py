"""Prefect events for the fleet: one per device and kind, the device as the resource."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect.events.clients import AssertingEventsClient
from prefect.testing.fixtures import asserting_events_worker  # noqa: F401 - a fixture

from camfleet.settings import get_settings
from tasks import events
from tasks import triggers as trig
from tests.test_api_commands_helpers import add_device


def _sent(worker) -> list:
    worker.drain()
    assert isinstance(worker._client, AssertingEventsClient)
    return list(worker._client.events)


def test_expired_triggers_emit_one_event_per_device(
    prefect_api_url,
    database_url,
    monkeypatch,
    asserting_events_worker,  # noqa: F811
):
    from flows.triggers import expire_triggers

    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    past = datetime.now(UTC) - timedelta(hours=1)
    for device, count in (("E1", 2), ("E2", 1)):
        add_device(database_url, device)
        for i in range(count):
            trig.create_manual(database_url, device, 1, f"t{i}", now=past - timedelta(seconds=i))
    try:
        assert expire_triggers()["expired"] == 3
    finally:
        get_settings.cache_clear()
    sent = [e for e in _sent(asserting_events_worker) if e.event == "camfleet.trigger.expired"]
    by_device = {e.resource.id: e.payload["count"] for e in sent}
    assert by_device == {"camfleet.device.E1": 2, "camfleet.device.E2": 1}


def test_batches_are_bounded_and_hostile_ids_are_cut(
    prefect_api_url,
    asserting_events_worker,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(events, "MAX_EVENTS_PER_CALL", 3)
    pairs = [(f"D{i}", f"c{i}-{j}") for i in range(5) for j in range(60)]
    pairs.append(("X" * 5000, "id"))
    assert events.emit_per_device("camfleet.capture.stored", pairs) == 4  # 3 + a summary
    sent = _sent(asserting_events_worker)
    assert len(sent) == 4
    listed = [e for e in sent if e.resource.id.startswith("camfleet.device.")]
    assert all(len(e.payload["ids"]) <= events.MAX_IDS_PER_EVENT for e in listed)
    assert all(len(e.resource.id) <= len("camfleet.device.") + events.MAX_ID_CHARS for e in sent)
    [summary] = [e for e in sent if e.resource.id == "camfleet.fleet"]
    assert summary.payload["devices_not_listed"] == 3
