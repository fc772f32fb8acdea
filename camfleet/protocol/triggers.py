"""Sans-IO core of capture triggers (seed 003, "Visant Cloud-Triggered Camera System").

What lives here is free of sockets, SQL and Prefect:

* the **schedule**: which slots a device's ``config`` asks for in a time window
  (``{"trigger": {"enabled", "interval_seconds"}}`` and an optional ``"cron"``), with
  deterministic trigger ids so a re-run scheduler cannot double a slot;
* the names of the lifecycle states and its time limits (TTLs, execution timeout).

The **lifecycle** itself, ``pending -> sent -> executed | failed | expired``, has one
home: the guarded ``UPDATE`` statements in ``sql/queries/triggers.sql`` (claim, execute,
expire, fail), which every API instance, flow and CLI command runs. There is no Python
copy of those rules to keep in step.

Wire format of a command (fixed by DESIGN.md, pipeline 4, so deployed Visant clients
work unchanged): ``{"cmd": "capture", "trigger_id": ..., "type": "scheduled"|"manual"}``.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from camfleet.keys import MAX_ID_LEN

# --- Limits --------------------------------------------------------------------------

# A capture every 5 s is the fastest a camera that grabs, encodes and uploads a frame
# over a phone link (~1-2 s) can follow without triggers queueing behind each other.
MIN_INTERVAL_SECONDS = 5
# A week: anything rarer is better expressed as a cron expression.
MAX_INTERVAL_SECONDS = 7 * 24 * 3600
# A manual trigger is a person waiting for a picture: after 5 minutes offline the
# moment has passed, so it expires rather than firing when the device comes back.
MANUAL_TTL_SECONDS = 300
# A scheduled trigger expires when the next slot is due (it is superseded), but never
# lives longer than this, so a daily schedule does not fire a day-old trigger.
SCHEDULED_MAX_TTL_SECONDS = 600
# Between "sent" and the upload: camera warm-up + capture + the agent's default 30 s
# upload timeout, with room for one retry. A trigger sent longer ago ends "failed".
EXECUTION_TIMEOUT_SECONDS = 90
# Cron expressions are at most this long: five fields with lists fit easily, and the
# bound keeps a hostile config from costing the scheduler unbounded parsing.
MAX_CRON_LEN = 120
# The scheduler never materialises more slots than this per device per window, so a
# misconfigured device cannot flood the table.
MAX_SLOTS_PER_WINDOW = 1000

PENDING, SENT, EXECUTED, FAILED, EXPIRED = "pending", "sent", "executed", "failed", "expired"
STATES = (PENDING, SENT, EXECUTED, FAILED, EXPIRED)
FINAL_STATES = frozenset({EXECUTED, FAILED, EXPIRED})
SCHEDULED, MANUAL = "scheduled", "manual"


class BadTriggerConfig(ValueError):
    """A device config whose "trigger" section cannot be scheduled; says why."""


def command(trigger_id: str, trigger_type: str) -> dict:
    """The command as deployed Visant clients read it."""
    return {"cmd": "capture", "trigger_id": trigger_id, "type": trigger_type}


# --- Trigger ids ---------------------------------------------------------------------


# Trigger ids travel back in `/v1/captures` (trigger_id, a safe id of at most
# keys.MAX_ID_LEN) and become object key names, so every id made here must fit there
# for every device id the API accepts (up to keys.MAX_ID_LEN characters).
MAX_TRIGGER_ID_LEN = MAX_ID_LEN
# The hash that stands in for the tail of a long device id: 48 bits, per device.
_DEVICE_HASH_CHARS = 12


def _device_part(device_id: str, room: int) -> str:
    """`device_id` when it fits in `room` characters, else its head plus a hash of the
    whole id: deterministic (a re-run scheduler makes the same id) and distinct per
    device, and still readable in logs."""
    if len(device_id) <= room:
        return device_id
    digest = hashlib.sha256(device_id.encode()).hexdigest()[:_DEVICE_HASH_CHARS]
    return f"{device_id[: room - _DEVICE_HASH_CHARS - 1]}-{digest}"


def scheduled_trigger_id(device_id: str, slot: datetime) -> str:
    """The seed's id form, ``sched_FLOOR1_20251109_140530``: one id per device and slot."""
    stamp = f"{slot.astimezone(UTC):%Y%m%d_%H%M%S}"
    room = MAX_TRIGGER_ID_LEN - len("sched__") - len(stamp)
    return f"sched_{_device_part(device_id, room)}_{stamp}"


def manual_trigger_id(device_id: str, now: datetime) -> str:
    stamp = f"{now.astimezone(UTC):%Y%m%d_%H%M%S}_{secrets.token_hex(3)}"
    room = MAX_TRIGGER_ID_LEN - len("manual__") - len(stamp)
    return f"manual_{_device_part(device_id, room)}_{stamp}"


def manual_expiry(now: datetime, ttl: float = MANUAL_TTL_SECONDS) -> datetime:
    return now + timedelta(seconds=ttl)


# --- Schedules -----------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerConfig:
    enabled: bool
    interval_seconds: int | None = None
    cron: str | None = None

    def ttl_seconds(self) -> float:
        """How long a scheduled slot stays deliverable: until the next one, at most."""
        if self.interval_seconds:
            return min(self.interval_seconds, SCHEDULED_MAX_TTL_SECONDS)
        return SCHEDULED_MAX_TTL_SECONDS


def parse_trigger_config(config: object) -> TriggerConfig:
    """The device config's ``"trigger"`` section, validated; BadTriggerConfig says why."""
    if config is None:
        return TriggerConfig(enabled=False)
    if not isinstance(config, Mapping):
        raise BadTriggerConfig("config must be a JSON object")
    section = config.get("trigger")
    if section is None:
        return TriggerConfig(enabled=False)
    if not isinstance(section, Mapping):
        raise BadTriggerConfig('"trigger" must be an object')
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise BadTriggerConfig('"trigger.enabled" must be true or false')
    interval = section.get("interval_seconds")
    cron = section.get("cron")
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise BadTriggerConfig('"trigger.interval_seconds" must be an integer')
        if not MIN_INTERVAL_SECONDS <= interval <= MAX_INTERVAL_SECONDS:
            raise BadTriggerConfig(
                f'"trigger.interval_seconds" must be {MIN_INTERVAL_SECONDS}-{MAX_INTERVAL_SECONDS}'
            )
    if cron is not None:
        if not isinstance(cron, str) or not cron.strip() or len(cron) > MAX_CRON_LEN:
            raise BadTriggerConfig(f'"trigger.cron" must be a cron expression (<= {MAX_CRON_LEN})')
        from cronsim import CronSim, CronSimError

        try:
            CronSim(cron, datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError as exc:
            raise BadTriggerConfig(f'"trigger.cron" is not valid: {exc}') from None
    if enabled and interval is None and cron is None:
        raise BadTriggerConfig('an enabled trigger needs "interval_seconds" or "cron"')
    return TriggerConfig(enabled=enabled, interval_seconds=interval, cron=cron)


def device_phase(device_id: str, interval_seconds: int) -> int:
    """A stable per-device offset in [0, interval), so 1,000 devices on a 10 s interval
    fire 100 per second instead of 1,000 at once on every tenth second."""
    digest = hashlib.sha256(device_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % interval_seconds


def slots(device_id: str, cfg: TriggerConfig, start: datetime, end: datetime) -> Iterator[datetime]:
    """Slot times in ``[start, end)`` (UTC, whole seconds) that `cfg` asks for."""
    if not cfg.enabled:
        return
    found = 0
    if cfg.interval_seconds:
        step = cfg.interval_seconds
        phase = device_phase(device_id, step)
        t0 = int(start.timestamp())
        if t0 < start.timestamp():
            t0 += 1
        first = t0 + ((phase - t0) % step)
        t = first
        while t < end.timestamp() and found < MAX_SLOTS_PER_WINDOW:
            yield datetime.fromtimestamp(t, UTC)
            found += 1
            t += step
    if cfg.cron:
        from cronsim import CronSim

        # CronSim yields times strictly after its start: begin one second earlier.
        it = CronSim(cfg.cron, start.astimezone(UTC) - timedelta(seconds=1))
        for t in it:
            if t >= end or found >= MAX_SLOTS_PER_WINDOW:
                break
            yield t.astimezone(UTC)
            found += 1


@dataclass(frozen=True)
class PlannedTrigger:
    trigger_id: str
    device_id: str
    scheduled_at: datetime
    expires_at: datetime
    label: str


def plan(
    devices: Iterator[tuple[str, object]] | list[tuple[str, object]],
    start: datetime,
    end: datetime,
) -> tuple[list[PlannedTrigger], dict[str, str]]:
    """Scheduled triggers for ``(device_id, config)`` pairs in a window.

    Returns the planned triggers (sorted by time) and ``{device_id: reason}`` for
    configs that could not be scheduled: one bad config never stops the others.
    """
    out: list[PlannedTrigger] = []
    bad: dict[str, str] = {}
    for device_id, config in devices:
        try:
            cfg = parse_trigger_config(config)
        except BadTriggerConfig as exc:
            bad[device_id] = str(exc)
            continue
        label = "scheduled_cron" if cfg.cron and not cfg.interval_seconds else "scheduled_interval"
        seen: set[datetime] = set()
        for slot in slots(device_id, cfg, start, end):
            if slot in seen:
                continue
            seen.add(slot)
            out.append(
                PlannedTrigger(
                    trigger_id=scheduled_trigger_id(device_id, slot),
                    device_id=device_id,
                    scheduled_at=slot,
                    expires_at=slot + timedelta(seconds=cfg.ttl_seconds()),
                    label=label,
                )
            )
    out.sort(key=lambda p: (p.scheduled_at, p.device_id))
    return out, bad
