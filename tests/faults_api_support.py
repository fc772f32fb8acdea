"""Fleets and checks for the device-API fault tests (tests/test_faults_api.py).

Three kinds of load run on background threads, each recording what the devices
themselves saw, so the invariants compare the server's state with the devices' view:

* `AgentFleet`: real `camfleet agent` loops (camfleet.agent.client.Agent) holding SSE
  command streams, capturing from an image file and uploading to POST /v1/captures;
* `TriggerMaker`: manual triggers through the API (falling back to the CLI/Prefect
  path, a direct row, while that API is down) and scheduler-style batch rows;
* `LifelogFleet`: paired devices (camfleet.simulators.lifelog) doing upload-url ->
  PUT -> ingest, retrying a photo under the same seq, as the firmware's manifest does.

`check_invariants` then reads PostgreSQL and storage.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from camfleet import db, tokens
from camfleet.agent.camera import FileCamera
from camfleet.agent.client import Agent, AgentConfig
from camfleet.protocol import triggers as core
from camfleet.simulators.lifelog import DeviceError, LifelogDevice, pair
from tasks import triggers as trig
from tests.faults_common import wait_until as _wait_until
from tests.test_api_commands_helpers import SECRET, add_device, fetch

# Agents reconnect fast so a test does not wait on backoff; the ceiling still doubles
# a few times, as in production, between the API going away and coming back.
AGENT_RECONNECT_S = 0.5
AGENT_MAX_RECONNECT_S = 4.0
# A stream with no byte for this long is dead (pings come every second in these tests).
AGENT_STREAM_TIMEOUT_S = 10.0
# Triggers live long enough to outlast every outage below, so each one must be
# delivered after recovery; "unless expired" is exercised by the expiry sweep at the end.
TRIGGER_TTL_S = 60.0
# A photo is retried under the same seq for this long before the device gives up on it
# (its manifest would keep it PENDING for the next wake-up; the test records it).
PHOTO_RETRY_S = 90.0


def make_user_key(dsn: str, user_id: str = "fleet-owner") -> str:
    """A user API key for pairing, hashed with the API processes' server secret."""
    key = tokens.new_user_key()
    with db.transaction(dsn) as conn:
        db.queries.devices_create_user(conn, user_id=user_id, name=user_id)
        db.queries.devices_create_user_key(
            conn, user_id=user_id, key_hash=tokens.hash_user_key(SECRET.encode(), key), label="f"
        )
    return key


class _LoopThread:
    """An asyncio loop on a daemon thread; `run(coro)` schedules, `call(fn)` pokes it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class RecordingAgent(Agent):
    """The real agent, noting each command it read and each upload the API accepted."""

    def __init__(self, cfg: AgentConfig, camera, fleet: AgentFleet) -> None:
        super().__init__(cfg, camera)
        self.fleet = fleet

    def _enqueue(self, command: dict) -> None:
        self.fleet.received[command["trigger_id"]] += 1
        super()._enqueue(command)

    async def _capture_and_upload(self, client, command: dict) -> None:
        await super()._capture_and_upload(client, command)  # raises unless a 2xx
        self.fleet.uploaded[command["trigger_id"]] = time.monotonic()


class AgentFleet:
    """`devices` agents (device-id-only mode), streaming from `api_url`."""

    def __init__(self, dsn: str, api_url: str, devices: list[str], image: Path) -> None:
        self.devices = devices
        self.received: Counter = Counter()
        self.uploaded: dict[str, float] = {}
        self.loop = _LoopThread("agent-fleet")
        self.agents = []
        for device_id in devices:
            add_device(dsn, device_id)
            cfg = AgentConfig(
                api_url=api_url,
                device_id=device_id,
                reconnect_delay=AGENT_RECONNECT_S,
                max_reconnect_delay=AGENT_MAX_RECONNECT_S,
                stream_timeout=AGENT_STREAM_TIMEOUT_S,
                upload_timeout=20.0,
            )
            self.agents.append(RecordingAgent(cfg, FileCamera(image), self))
        self.runs = [self.loop.run(a.run()) for a in self.agents]

    def uploads_after(self, t: float) -> int:
        return sum(1 for v in list(self.uploaded.values()) if v > t)

    def failures(self) -> int:
        return sum(a.stats.failures for a in self.agents)

    def close(self) -> None:
        for agent in self.agents:
            self.loop.call(agent.stop)
        for run in self.runs:
            try:
                run.result(15)
            except Exception:  # noqa: S110 - a stuck agent must not hide the results
                pass
        self.loop.close()


@dataclass
class Made:
    device_id: str
    how: str  # "api", "db" (manual, CLI/Prefect path) or "scheduled"
    at: float  # monotonic
    expires_at: datetime
    while_down: bool


class TriggerMaker:
    """A trigger every `interval` s, round robin over devices and over the three ways."""

    def __init__(self, dsn: str, api_url: str, devices: list[str], interval: float = 1.0):
        self.dsn, self.api_url, self.devices, self.interval = dsn, api_url, devices, interval
        self.made: dict[str, Made] = {}
        self.refused = 0
        self.down = threading.Event()  # set by the test while a dependency is down
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, name="trigger-maker", daemon=True)
        self.t.start()

    def _one(self, device_id: str, n: int) -> tuple[str, str, datetime] | None:
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=TRIGGER_TTL_S)
        if n % 2 == 0:  # the scheduler's batch insert, a slot a second ahead
            slot = now.replace(microsecond=0) + timedelta(seconds=1)
            planned = core.PlannedTrigger(
                core.scheduled_trigger_id(device_id, slot),
                device_id,
                slot,
                slot + timedelta(seconds=TRIGGER_TTL_S),
                "scheduled_interval",
            )
            if trig.insert_planned(self.dsn, [planned]) == 0:
                return None  # that slot exists already
            return planned.trigger_id, "scheduled", planned.expires_at
        try:
            r = httpx.post(
                f"{self.api_url}/v1/devices/{device_id}/trigger",
                json={"ttl_seconds": int(TRIGGER_TTL_S), "label": "fault-test"},
                timeout=10,
            )
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 200:
            body = r.json()
            return body["trigger_id"], "api", datetime.fromisoformat(body["expires_at"])
        if r is not None:
            raise RuntimeError(f"trigger refused: {r.status_code}")
        # The API is unreachable: an operator's `prefect deployment run` / CLI still works.
        tid = trig.create_manual(self.dsn, device_id, ttl_seconds=TRIGGER_TTL_S)
        return tid, "db", expires

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            device_id = self.devices[n % len(self.devices)]
            down = self.down.is_set()
            start = time.monotonic()
            try:
                made = self._one(device_id, n // len(self.devices))
            except Exception:  # database down, API answering 5xx: that trigger was not made
                self.refused += 1
                made = None
            if made is not None:
                tid, how, expires = made
                self.made[tid] = Made(device_id, how, start, expires, down or self.down.is_set())
            n += 1
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - start)))

    def close(self) -> None:
        self.stop.set()
        self.t.join(30)


@dataclass
class Photo:
    device_id: str
    seq: int
    object_key: str
    status: str  # the first answer: queued, or duplicate when a lost answer was retried
    item_id: str
    at: float


@dataclass
class LifelogFleet:
    """Paired lifelog devices uploading photos back to back until closed."""

    api_url: str
    user_key: str
    devices: int
    image: bytes
    pause: float = 0.5
    photos: dict[tuple[str, int], Photo] = field(default_factory=dict)
    answers: Counter = field(default_factory=Counter)
    in_flight: dict[tuple[str, int], float] = field(default_factory=dict)
    retries: int = 0
    gave_up: int = 0
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = asyncio.Event()
        self.loop = _LoopThread("lifelog-fleet")
        self._main = self.loop.run(self._fleet())

    async def _fleet(self) -> None:
        self._stop = asyncio.Event()
        devices = []
        for i in range(self.devices):
            code = (await pair(self.api_url, self.user_key, name=f"fault-{i}"))["pairing_code"]
            device = LifelogDevice(self.api_url)
            await device.activate(code)
            devices.append(device)
        try:
            await asyncio.gather(*(self._device(d) for d in devices))
        finally:
            for d in devices:
                await d.aclose()

    async def _device(self, device: LifelogDevice) -> None:
        while not self._stop.is_set():
            seq = device.next_seq()
            captured_at = datetime.now(UTC)
            key = (device.device_id, seq)
            self.in_flight[key] = time.monotonic()
            give_up = time.monotonic() + PHOTO_RETRY_S
            try:
                while True:
                    try:
                        photo = await self._upload(device, seq, captured_at)
                        break
                    except DeviceError as exc:
                        if 400 <= exc.status < 500 and exc.status != 429:
                            self.refused.append(str(exc))
                            photo = None
                            break
                        self.retries += 1
                        if time.monotonic() > give_up:
                            self.gave_up += 1
                            photo = None
                            break
                        await asyncio.sleep(0.5)
            finally:
                del self.in_flight[key]
            if photo is not None:
                self.photos.setdefault(key, photo)
                self.answers[(key, photo.status)] += 1
            try:
                await asyncio.wait_for(self._stop.wait(), self.pause)
            except TimeoutError:
                pass

    async def _upload(self, device: LifelogDevice, seq: int, captured_at: datetime) -> Photo:
        filename = f"{captured_at:%Y-%m-%dT%H-%M-%SZ}_{seq:06d}.jpg"
        target = await device.upload_url(filename, seq)
        await device.put(target, self.image, "image/jpeg")
        answer = await device.ingest(target["object_key"], seq, captured_at)
        return Photo(
            device.device_id,
            seq,
            target["object_key"],
            answer["status"],
            answer["item_id"],
            time.monotonic(),
        )

    def problem(self) -> str:
        """Why the fleet stopped, when it did."""
        if not self._main.done():
            return "running"
        exc = self._main.exception()
        return repr(exc) if exc else "finished"

    def delivered_after(self, t: float) -> int:
        return sum(1 for p in list(self.photos.values()) if p.at > t)

    def close(self, timeout: float = PHOTO_RETRY_S + 30) -> None:
        self.loop.call(self._stop.set)
        try:
            self._main.result(timeout)
        finally:
            self.loop.close()


def trigger_rows(dsn: str) -> dict[str, tuple]:
    rows = fetch(
        dsn,
        "SELECT trigger_id, status, capture_id, expires_at, sent_at FROM scheduled_triggers",
    )
    return {r[0]: r[1:] for r in rows}


def check_invariants(dsn, has_object, agents: AgentFleet, maker: TriggerMaker, fleet):
    """Lost and duplicated, comparing what devices were told with rows and objects.

    has_object(key) -> bool looks the object up in storage.
    """
    lost: list[tuple] = []
    # What the devices were told, read BEFORE the database: an answer that arrives while
    # the rows are being read (its row committed just after our SELECT) is checked in
    # the next accounting, not counted lost in this one.
    photos = dict(fleet.photos)
    uploaded = list(agents.uploaded)
    # lifelog: every photo answered queued (or duplicate after a lost answer) has
    # exactly one row, with its key, and its object
    rows = fetch(
        dsn,
        "SELECT device_id, seq, record_id, storage_path FROM captures WHERE source = 'lifelog'",
    )
    by_seq: dict[tuple, list] = {}
    for device_id, seq, record_id, path in rows:
        by_seq.setdefault((device_id, seq), []).append((record_id, path))
    duplicated = sum(len(v) - 1 for v in by_seq.values() if len(v) > 1)
    for key, photo in photos.items():
        found = by_seq.get(key)
        if not found:
            lost.append(("ingest", key, "no captures row"))
        elif found[0] != (photo.item_id, photo.object_key):
            lost.append(("ingest", key, f"row {found[0]} is not the answer {photo.item_id}"))
        elif not has_object(photo.object_key):
            lost.append(("ingest", key, "no object"))
    # each seq answered queued at most once (a retry of it must say duplicate)
    queued = [n for (_, status), n in fleet.answers.items() if status == "queued"]
    duplicated += sum(n - 1 for n in queued if n > 1)
    # captures: every 2xx upload has its row, object, and the trigger executed with it
    caps = fetch(
        dsn,
        "SELECT trigger_id, record_id, storage_path FROM captures "
        "WHERE source = 'api' AND trigger_id IS NOT NULL",
    )
    cap_rows: dict[str, list] = {}
    for tid, record_id, path in caps:
        cap_rows.setdefault(tid, []).append((record_id, path))
    duplicated += sum(len(v) - 1 for v in cap_rows.values() if len(v) > 1)
    triggers = trigger_rows(dsn)
    for tid in uploaded:
        found = cap_rows.get(tid)
        if not found:
            lost.append(("capture", tid, "no captures row"))
            continue
        record_id, path = found[0]
        if not has_object(path):
            lost.append(("capture", tid, "no object"))
        status, capture_id = triggers[tid][0], triggers[tid][1]
        if status != core.EXECUTED or capture_id != record_id:
            lost.append(("capture", tid, f"trigger {status}, capture {capture_id}"))
    # a trigger written to a device twice would be executed twice
    duplicated += sum(n - 1 for n in agents.received.values() if n > 1)
    if lost:
        print("LOST:", lost[:10])
    return {"lost": len(lost), "duplicated": duplicated, "details": lost}


def final_trigger_states(dsn: str, maker: TriggerMaker) -> dict[str, int]:
    made = list(maker.made)  # before the rows: a newer one has no row yet
    rows = trigger_rows(dsn)
    return dict(Counter(rows[tid][0] for tid in made))


def wait_until(fn, timeout: float, step: float = 0.2):
    """tests.faults_common.wait_until, polling less often: these checks query PostgreSQL."""
    return _wait_until(fn, timeout, step)
