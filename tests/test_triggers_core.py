"""The sans-IO trigger core: wire format, trigger ids, schedules.

The lifecycle (claim, execute, expire, fail) is SQL only (sql/queries/triggers.sql) and
is tested against PostgreSQL in tests/test_api_commands.py and tests/test_triggers_sql.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from camfleet.protocol import triggers as core

T0 = datetime(2025, 11, 9, 14, 5, 30, tzinfo=UTC)


def test_command_wire_format_is_the_seeds():
    assert core.command("sched_FLOOR1_20251109_140530", "scheduled") == {
        "cmd": "capture",
        "trigger_id": "sched_FLOOR1_20251109_140530",
        "type": "scheduled",
    }
    assert core.scheduled_trigger_id("FLOOR1", T0) == "sched_FLOOR1_20251109_140530"
    assert core.manual_trigger_id("FLOOR1", T0).startswith("manual_FLOOR1_20251109_140530_")


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("nope", "JSON object"),
        ({"trigger": []}, "must be an object"),
        ({"trigger": {"enabled": "yes", "interval_seconds": 10}}, "true or false"),
        ({"trigger": {"enabled": True, "interval_seconds": "10"}}, "integer"),
        ({"trigger": {"enabled": True, "interval_seconds": True}}, "integer"),
        ({"trigger": {"enabled": True, "interval_seconds": 1}}, "5-"),
        ({"trigger": {"enabled": True, "interval_seconds": 10**9}}, "5-"),
        ({"trigger": {"enabled": True}}, "needs"),
        ({"trigger": {"enabled": True, "cron": "every day"}}, "not valid"),
        ({"trigger": {"enabled": True, "cron": "* " * 100}}, "cron"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(config, reason):
    with pytest.raises(core.BadTriggerConfig, match=reason):
        core.parse_trigger_config(config)


def test_disabled_or_missing_trigger_config_plans_nothing():
    for config in ({}, None, {"trigger": {"enabled": False, "interval_seconds": 10}}):
        planned, bad = core.plan([("D", config)], T0, T0 + timedelta(hours=1))
        assert planned == [] and bad == {}


@given(
    interval=st.integers(min_value=core.MIN_INTERVAL_SECONDS, max_value=3600),
    offset=st.integers(min_value=0, max_value=86_400),
    window=st.integers(min_value=1, max_value=4000),  # under MAX_SLOTS_PER_WINDOW at 5 s
    device=st.text(alphabet="ABCDEF0123456789", min_size=1, max_size=12),
)
def test_interval_slots_are_evenly_spaced_inside_the_window_and_stable(
    interval, offset, window, device
):
    cfg = core.TriggerConfig(enabled=True, interval_seconds=interval)
    start = T0 + timedelta(seconds=offset)
    end = start + timedelta(seconds=window)
    got = list(core.slots(device, cfg, start, end))
    assert all(start <= s < end for s in got)
    assert all((b - a).total_seconds() == interval for a, b in zip(got, got[1:], strict=False))
    assert len(got) in (window // interval, window // interval + 1)
    # the same slot lands in overlapping windows: two runs never make two slots
    mid = start + timedelta(seconds=window // 2)
    again = list(core.slots(device, cfg, mid, end + timedelta(seconds=window)))
    assert [s for s in got if s >= mid] == [s for s in again if s < end]
    phase = core.device_phase(device, interval)
    assert all(int(s.timestamp()) % interval == phase for s in got)


def test_a_thousand_devices_at_10_s_spread_over_the_seconds():
    devices = [
        (f"CAM{i:04d}", {"trigger": {"enabled": True, "interval_seconds": 10}}) for i in range(1000)
    ]
    planned, bad = core.plan(devices, T0, T0 + timedelta(seconds=60))
    assert not bad and len(planned) == 6000
    per_second: dict[datetime, int] = {}
    for p in planned:
        per_second[p.scheduled_at] = per_second.get(p.scheduled_at, 0) + 1
        assert p.expires_at - p.scheduled_at == timedelta(seconds=10)
    assert max(per_second.values()) < 200  # ~100/s, never all 1,000 in one second
    assert len({p.trigger_id for p in planned}) == 6000


def test_cron_slots_and_interval_plus_cron():
    cfg = core.parse_trigger_config({"trigger": {"enabled": True, "cron": "*/15 * * * *"}})
    got = list(core.slots("D", cfg, T0, T0 + timedelta(hours=1)))
    assert [s.minute for s in got] == [15, 30, 45, 0]
    assert all(s.second == 0 for s in got)
    planned, _ = core.plan(
        [("D", {"trigger": {"enabled": True, "cron": "*/15 * * * *"}})], T0, T0 + timedelta(hours=1)
    )
    assert [p.label for p in planned] == ["scheduled_cron"] * 4
    assert planned[0].expires_at - planned[0].scheduled_at == timedelta(
        seconds=core.SCHEDULED_MAX_TTL_SECONDS
    )


def test_one_bad_config_does_not_stop_the_others():
    planned, bad = core.plan(
        [
            ("BAD", {"trigger": {"enabled": True, "interval_seconds": 0}}),
            ("GOOD", {"trigger": {"enabled": True, "interval_seconds": 30}}),
        ],
        T0,
        T0 + timedelta(minutes=1),
    )
    assert set(bad) == {"BAD"} and {p.device_id for p in planned} == {"GOOD"}
    assert len(planned) == 2


def test_slots_per_window_are_capped():
    cfg = core.TriggerConfig(enabled=True, interval_seconds=5)
    got = list(core.slots("D", cfg, T0, T0 + timedelta(days=1)))
    assert len(got) == core.MAX_SLOTS_PER_WINDOW
