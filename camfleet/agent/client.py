"""The agent loop: hold the command stream, capture on command, upload, reconnect.

One asyncio task reads the SSE stream (httpx streaming, read timeout = the seed's
`--stream-timeout`, longer than two pings); captures run one at a time on a worker
task fed by a small queue, so a slow upload never stalls the stream. On any error the
agent waits `--reconnect-delay`, doubling (with jitter) up to a ceiling, and resets
after a stream that reached `connected`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

import camfleet
from camfleet.agent.sse import SseParser

log = logging.getLogger("camfleet.agent")

# Commands waiting for the camera; more than this means the camera cannot keep up, and
# the oldest are dropped (their triggers end failed/expired on the server, visibly).
# On reconnect the API sends every pending trigger at once (up to 50, the hub's
# MAX_PENDING_ON_CONNECT): that burst after an outage is not a slow camera, so the
# queue holds all of it (commands are ~100 bytes each).
MAX_QUEUED_CAPTURES = 64
# Pauses between upload attempts of one capture: the server treats a retried upload of
# a trigger as the same capture, so retrying is safe. Together they span ~30 s, longer
# than an API restart or a database failover, and well inside the server's 90 s
# execution timeout (EXECUTION_TIMEOUT_SECONDS), so a frame taken just before the API
# went away is still delivered rather than thrown away.
UPLOAD_RETRY_DELAYS_SECONDS = (1, 2, 4, 8, 16)
UPLOAD_ATTEMPTS = len(UPLOAD_RETRY_DELAYS_SECONDS) + 1
# Ceiling of the reconnect backoff: a fleet that lost its API comes back within a minute
# of it returning, without hammering it meanwhile.
MAX_RECONNECT_DELAY_SECONDS = 60.0


@dataclass
class AgentConfig:
    api_url: str
    device_id: str
    device_token: str | None = None
    upload_timeout: float = 30.0
    stream_timeout: float = 70.0
    reconnect_delay: float = 5.0
    max_reconnect_delay: float = MAX_RECONNECT_DELAY_SECONDS
    save_frames: bool = False
    save_frames_dir: Path = Path("debug_captures")
    max_captures: int | None = None  # stop after this many uploads (demos, tests)


@dataclass
class AgentStats:
    connects: int = 0
    commands: int = 0
    uploads: int = 0
    failures: int = 0
    last_error: str | None = None
    events: list = field(default_factory=list)


class StreamRefused(RuntimeError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"stream refused ({status}): {reason}")
        self.status = status


class Agent:
    def __init__(self, cfg: AgentConfig, camera) -> None:
        self.cfg = cfg
        self.camera = camera
        self.stats = AgentStats()
        self._queue: asyncio.Queue = asyncio.Queue(MAX_QUEUED_CAPTURES)
        self._done = asyncio.Event()
        base = cfg.api_url.rstrip("/")
        self._stream_url = f"{base}/v1/devices/{cfg.device_id}/commands"
        self._upload_url = f"{base}/v1/captures"
        self._headers = {"User-Agent": f"camfleet-agent/{camfleet.__version__}"}
        if cfg.device_token:
            self._headers["X-Device-Token"] = cfg.device_token

    async def run(self) -> AgentStats:
        async with httpx.AsyncClient(headers=self._headers) as client:
            worker = asyncio.create_task(self._capture_worker(client))
            delay = self.cfg.reconnect_delay
            try:
                while not self._done.is_set():
                    try:
                        if await self._until_stopped(self._stream_once(client)):
                            delay = self.cfg.reconnect_delay
                    except (httpx.HTTPError, StreamRefused, OSError) as exc:
                        self.stats.last_error = str(exc) or type(exc).__name__
                        log.warning("command stream: %s", self.stats.last_error)
                    if self._done.is_set():
                        break
                    wait = delay * random.uniform(0.8, 1.2)
                    log.info("reconnecting in %.1f s", wait)
                    try:
                        await asyncio.wait_for(self._done.wait(), wait)
                    except TimeoutError:
                        pass
                    delay = min(delay * 2, self.cfg.max_reconnect_delay)
            finally:
                worker.cancel()
                self.camera.close()
        return self.stats

    def stop(self) -> None:
        self._done.set()

    async def _until_stopped(self, coro):
        """Run `coro` until it ends or stop() is called (then it is cancelled)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self._done.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        return task.result()

    async def _stream_once(self, client: httpx.AsyncClient) -> bool:
        """Read one stream to its end; True when it got as far as `connected`."""
        timeout = httpx.Timeout(10.0, read=self.cfg.stream_timeout)
        connected = False
        parser = SseParser()
        async with client.stream("GET", self._stream_url, timeout=timeout) as resp:
            if resp.status_code != 200:
                body = (await resp.aread())[:500].decode(errors="replace")
                raise StreamRefused(resp.status_code, body)
            async for line in resp.aiter_lines():
                event = parser.feed_line(line)
                if event is None:
                    continue
                if event.get("event") == "connected":
                    connected = True
                    self.stats.connects += 1
                    log.info("connected as %s", self.cfg.device_id)
                elif event.get("event") == "ping":
                    log.debug("ping")
                elif event.get("cmd") == "capture" and isinstance(event.get("trigger_id"), str):
                    self.stats.commands += 1
                    self._enqueue(event)
        return connected

    def _enqueue(self, command: dict) -> None:
        if self._queue.full():
            dropped = self._queue.get_nowait()
            log.warning("camera busy: dropped trigger %s", dropped.get("trigger_id"))
        self._queue.put_nowait(command)

    async def _capture_worker(self, client: httpx.AsyncClient) -> None:
        while True:
            command = await self._queue.get()
            try:
                await self._capture_and_upload(client, command)
            except Exception as exc:  # one bad capture must not end the agent
                self.stats.failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("capture for %s failed: %s", command["trigger_id"], exc)

    async def _capture_and_upload(self, client: httpx.AsyncClient, command: dict) -> None:
        trigger_id, kind = command["trigger_id"], command.get("type", "scheduled")
        captured_at = datetime.now(UTC)
        image = await asyncio.to_thread(self.camera.capture)
        if self.cfg.save_frames:
            await asyncio.to_thread(self._save_frame, trigger_id, image)
        body = {
            "device_id": self.cfg.device_id,
            "trigger_id": trigger_id,
            "image_base64": base64.b64encode(image).decode(),
            "captured_at": captured_at.isoformat().replace("+00:00", "Z"),
            "trigger_label": f"{kind}_interval" if kind == "scheduled" else kind,
            "metadata": {"device_version": camfleet.__version__, "trigger_type": kind},
        }
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                resp = await client.post(
                    self._upload_url, json=body, timeout=self.cfg.upload_timeout
                )
            except httpx.HTTPError as exc:
                if attempt == UPLOAD_ATTEMPTS:
                    raise
                log.info("upload attempt %d failed (%s); retrying", attempt, type(exc).__name__)
                await asyncio.sleep(UPLOAD_RETRY_DELAYS_SECONDS[attempt - 1])
                continue
            if resp.status_code < 300:
                self.stats.uploads += 1
                log.info("uploaded %s -> %s", trigger_id, resp.json().get("record_id"))
                if self.cfg.max_captures and self.stats.uploads >= self.cfg.max_captures:
                    self.stop()
                return
            if resp.status_code < 500 or attempt == UPLOAD_ATTEMPTS:
                raise RuntimeError(f"upload refused ({resp.status_code}): {resp.text[:300]}")
            await asyncio.sleep(UPLOAD_RETRY_DELAYS_SECONDS[attempt - 1])

    def _save_frame(self, trigger_id: str, image: bytes) -> None:
        from camfleet.keys import sanitize_name

        self.cfg.save_frames_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.save_frames_dir / f"{sanitize_name(trigger_id)}.jpg").write_bytes(image)
