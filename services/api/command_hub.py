"""Command delivery for the device API: PostgreSQL LISTEN/NOTIFY fanned out to SSE streams.

The seed's CommandHub kept commands in memory, so a restart lost them and a second
API instance never saw them. Here the trigger row in `scheduled_triggers` is the
command; this hub only moves it:

* one dedicated asyncpg connection per API process LISTENs on `camfleet_triggers`
  (a database trigger announces every new pending row, whoever inserted it);
* a notification for a device streaming from *this* process goes onto that stream's
  local queue, at the trigger's `scheduled_at` (the scheduler writes a minute ahead);
* the stream *claims* the trigger (`pending -> sent`, one UPDATE) right before writing
  it, so with several instances or a reconnect race a command is written once;
* on connect, and after the listener reconnects, a device's pending unexpired
  triggers are loaded from the table, so nothing created while it was offline or
  while the API restarted is lost;
* presence (`device_connections`, owned by a heart-beating `api_instances` row) is
  written in coalesced batches, so `GET /v1/devices/connected` sees every instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import asyncpg

from camfleet import db as camfleet_db
from camfleet import metrics
from camfleet.pg_listener import PgListener

log = logging.getLogger("camfleet.api.commands")

CHANNEL = "camfleet_triggers"
# Seconds between instance heartbeats; an instance silent for STALE_SECONDS is dead
# and its presence rows go (three missed beats: a GC pause or a slow disk is not death).
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 20.0
# last_seen_at of streaming devices is refreshed this often in one batched UPDATE.
LAST_SEEN_REFRESH_SECONDS = 60.0
# Presence changes are written together after this pause, so 1,000 devices connecting
# in a burst cost a handful of statements, not 1,000.
PRESENCE_COALESCE_SECONDS = 0.05
# Commands queued for one stream before the oldest is dropped (it stays pending in the
# table and is re-loaded on the next connect): a device that stops reading cannot
# make the API hold unbounded memory.
MAX_QUEUED_PER_STREAM = 64
# Pending triggers sent on connect: a device offline for days gets the newest
# deliverable ones (older ones expire), never an unbounded backlog.
MAX_PENDING_ON_CONNECT = 50
# Pending MQTT-device triggers re-loaded at start-up: a fleet's worth of the next minutes.
MAX_MQTT_RELOAD = 20_000
# Pause before retrying a failed presence write.
PRESENCE_RETRY_SECONDS = 1.0


@dataclass(eq=False)
class Stream:
    """One SSE connection's queue of (trigger_id, trigger_type); None closes it."""

    device_id: str
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(MAX_QUEUED_PER_STREAM))

    def offer(self, item: tuple[str, str] | None) -> None:
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()  # drop the oldest: it stays pending in the table


class CommandHub:
    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        *,
        instance_id: str | None = None,
        mqtt_sender=None,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.instance_id = (
            instance_id or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self.mqtt_sender = mqtt_sender
        self._streams: dict[str, Stream] = {}
        self._added: set[str] = set()
        self._removed: set[str] = set()
        self._dirty = asyncio.Event()
        self._listener = PgListener(
            dsn, CHANNEL, self._on_notify, on_reconnect=self._reload, name="command listener"
        )
        self._tasks: list[asyncio.Task] = []
        self._q = camfleet_db.async_queries()
        self._timers: set[asyncio.TimerHandle] = set()
        self.notifications = 0

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        async with self.pool.acquire() as conn:
            await self._q.triggers_instance_heartbeat(conn, instance_id=self.instance_id)
        await self._listener.start()
        await self.load_pending_mqtt()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="hub-heartbeat"),
            asyncio.create_task(self._presence_loop(), name="hub-presence"),
        ]
        log.info("command hub %s listening on %s", self.instance_id, CHANNEL)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for timer in self._timers:
            timer.cancel()
        for stream in list(self._streams.values()):
            stream.offer(None)
        with contextlib.suppress(Exception):
            async with self.pool.acquire() as conn:
                await self._q.triggers_drop_instance(conn, instance_id=self.instance_id)
        await self._listener.stop()

    async def _reload(self) -> None:
        """After LISTEN reconnected: re-load the triggers whose notifications were missed."""
        for stream in list(self._streams.values()):
            with contextlib.suppress(Exception):
                await self.load_pending(stream)
        with contextlib.suppress(Exception):
            await self.load_pending_mqtt()

    async def _heartbeat_loop(self) -> None:
        last_touch = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                async with self.pool.acquire() as conn:
                    row = await self._q.triggers_instance_heartbeat(
                        conn, instance_id=self.instance_id
                    )
                    await self._q.triggers_drop_stale_instances(conn, stale_seconds=STALE_SECONDS)
                    if row["created"]:  # we were presumed dead: re-announce every stream
                        self._added |= set(self._streams)
                        self._dirty.set()
                    if time.monotonic() - last_touch >= LAST_SEEN_REFRESH_SECONDS:
                        last_touch = time.monotonic()
                        await self._q.triggers_touch_devices(conn, device_ids=list(self._streams))
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("heartbeat failed: %s", type(exc).__name__)

    async def _presence_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(PRESENCE_COALESCE_SECONDS)
            self._dirty.clear()
            added, removed = self._added, self._removed
            self._added, self._removed = set(), set()
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    if removed:
                        await self._q.triggers_presence_remove(
                            conn, instance_id=self.instance_id, device_ids=sorted(removed)
                        )
                    if added:
                        await self._q.triggers_presence_add(
                            conn,
                            instance_id=self.instance_id,
                            device_ids=sorted(added),
                            transport="sse",
                        )
                        await self._q.triggers_touch_devices(conn, device_ids=sorted(added))
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("presence write failed (%s); retrying", type(exc).__name__)
                self._added |= added - self._removed
                self._removed |= removed - self._added
                self._dirty.set()
                await asyncio.sleep(PRESENCE_RETRY_SECONDS)

    # --- streams ----------------------------------------------------------------------

    def subscribe(self, device_id: str) -> Stream:
        """A new stream for `device_id`; an older stream of it on this instance closes."""
        old = self._streams.get(device_id)
        if old is not None:
            old.offer(None)
        stream = Stream(device_id)
        self._streams[device_id] = stream
        self._removed.discard(device_id)
        self._added.add(device_id)
        self._dirty.set()
        return stream

    def unsubscribe(self, stream: Stream) -> None:
        if self._streams.get(stream.device_id) is stream:
            del self._streams[stream.device_id]
            self._added.discard(stream.device_id)
            self._removed.add(stream.device_id)
            self._dirty.set()

    async def load_pending(self, stream: Stream) -> int:
        async with self.pool.acquire() as conn:
            rows = [
                r
                async for r in self._q.triggers_pending_for_device(
                    conn, device_id=stream.device_id, max_rows=MAX_PENDING_ON_CONNECT
                )
            ]
        for row in rows:
            self._schedule(
                stream.device_id,
                row["trigger_id"],
                row["trigger_type"],
                row["scheduled_at"].timestamp(),
            )
        return len(rows)

    async def load_pending_mqtt(self) -> int:
        """Pending triggers of MQTT-transport devices (made while no API was listening)."""
        if self.mqtt_sender is None or not self.mqtt_sender.devices:
            return 0
        async with self.pool.acquire() as conn:
            rows = [
                r
                async for r in self._q.triggers_pending_for_devices(
                    conn, device_ids=sorted(self.mqtt_sender.devices), max_rows=MAX_MQTT_RELOAD
                )
            ]
        for row in rows:
            self._schedule(
                row["device_id"],
                row["trigger_id"],
                row["trigger_type"],
                row["scheduled_at"].timestamp(),
                via_mqtt=True,
            )
        return len(rows)

    async def claim(self, device_id: str, trigger_id: str) -> str | None:
        """pending -> sent; the trigger type when this caller won, else None."""
        async with self.pool.acquire() as conn:
            row = await self._q.triggers_claim(conn, trigger_id=trigger_id, device_id=device_id)
        return row["trigger_type"] if row else None

    # --- notifications ----------------------------------------------------------------

    def _on_notify(self, payload: str) -> None:
        self.notifications += 1
        try:
            note = json.loads(payload)
            device_id, trigger_id = note["device_id"], note["trigger_id"]
            trigger_type, due = note["type"], float(note["due"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed %s notification", CHANNEL)
            return
        if device_id in self._streams:
            self._schedule(device_id, trigger_id, trigger_type, due)
        elif self.mqtt_sender is not None and self.mqtt_sender.handles(device_id):
            self._schedule(device_id, trigger_id, trigger_type, due, via_mqtt=True)

    def _schedule(
        self, device_id: str, trigger_id: str, trigger_type: str, due: float, via_mqtt=False
    ) -> None:
        delay = due - time.time()
        if delay <= 0:
            self._deliver(device_id, trigger_id, trigger_type, via_mqtt, due)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._timers.discard(handle)
            self._deliver(device_id, trigger_id, trigger_type, via_mqtt, due)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _deliver(
        self, device_id: str, trigger_id: str, trigger_type: str, via_mqtt: bool, due: float
    ) -> None:
        stream = self._streams.get(device_id)
        if stream is not None:
            stream.offer((trigger_id, trigger_type))
            _observe_lag("sse", due)
        elif via_mqtt and self.mqtt_sender is not None:
            asyncio.get_running_loop().create_task(
                self._deliver_mqtt(device_id, trigger_id, trigger_type, due)
            )
        # else: the device left; the trigger stays pending and is loaded on reconnect.

    async def _deliver_mqtt(
        self, device_id: str, trigger_id: str, trigger_type: str, due: float
    ) -> None:
        if await self.claim(device_id, trigger_id):
            await self.mqtt_sender.send(device_id, trigger_id, trigger_type)
            _observe_lag("mqtt", due)


def _observe_lag(transport: str, due: float) -> None:
    """Trigger dispatch lag: due time to hand-off. A trigger loaded late (the device was
    away, or no API was listening) shows its whole wait, which is what a user feels."""
    metrics.TRIGGER_DISPATCH_LAG.labels(transport).observe(max(0.0, time.time() - due))


class MqttCommandSender:
    """Publishes commands to `ESP32CAM/{device_id}/cmd` (QoS 1) for MQTT-transport devices.

    Several API instances may run one each: the claim in the table decides which
    instance publishes a given trigger, so a device gets each command once.
    """

    # The set of MQTT-transport devices is re-read this often, so a config change
    # takes effect without restarting the API.
    REFRESH_SECONDS = 30.0

    def __init__(self, broker, topic_template: str, pool: asyncpg.Pool) -> None:
        self.broker = broker
        self.topic_template = topic_template
        self.pool = pool
        self._devices: set[str] = set()
        self._client = None
        self._task: asyncio.Task | None = None

    def handles(self, device_id: str) -> bool:
        return device_id in self._devices

    @property
    def devices(self) -> set[str]:
        return self._devices

    async def start(self) -> None:
        self._client = self.broker.client(client_id=f"camfleet-cmd-{uuid.uuid4().hex[:8]}")
        self._client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive)
        self._client.loop_start()
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop())

    async def refresh(self) -> None:
        async with self.pool.acquire() as conn:
            rows = [r async for r in camfleet_db.async_queries().triggers_mqtt_devices(conn)]
        self._devices = {r["device_id"] for r in rows}

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.REFRESH_SECONDS)
            with contextlib.suppress(Exception):
                await self.refresh()

    async def send(self, device_id: str, trigger_id: str, trigger_type: str) -> None:
        from camfleet.protocol.triggers import command

        topic = self.topic_template.format(device_id=device_id)
        payload = json.dumps(command(trigger_id, trigger_type))
        info = self._client.publish(topic, payload, qos=1)
        await asyncio.to_thread(info.wait_for_publish, 10)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
