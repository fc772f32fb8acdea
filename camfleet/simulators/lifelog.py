"""A simulated Lifelog camera (seed 004): pair -> activate -> upload-url -> PUT -> ingest.

It behaves like the seed's firmware: a monotonic `seq` (kept in a state file when one
is given, as the ESP32 keeps it in NVS), the body streamed in 8 KB chunks (never the
whole file in memory), and retries with exponential backoff on network errors, 5xx and
429 (honouring Retry-After). An ingest retry after a lost answer is safe: the server
answers `duplicate` with the same item_id.

    device = LifelogDevice(api_url)
    code = await pair(api_url, user_key, name="esp32-proto")      # the web app's part
    await device.activate(code)
    result = await device.upload_photo(path_or_bytes, captured_at)
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

# The seed's streaming requirement: 8 KB pieces from SD to the network.
STREAM_CHUNK_BYTES = 8 * 1024
# Backoff: 0.2 s doubling to 10 s, five attempts per request; then the photo stays
# queued (the caller decides), as the firmware's manifest keeps it PENDING.
RETRY_ATTEMPTS = 5
RETRY_BASE_S = 0.2
RETRY_MAX_S = 10.0
REQUEST_TIMEOUT_S = 30.0


class DeviceError(RuntimeError):
    """A request the server refused for good (4xx other than 429), with its reason."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


@dataclass
class Timings:
    """Per-endpoint latencies (seconds) of successful requests, and retry counts."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    retries: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.latencies.setdefault(name, []).append(seconds)

    def count(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1


async def _retrying(send, timings: Timings | None, name: str) -> httpx.Response:
    delay = RETRY_BASE_S
    for attempt in range(RETRY_ATTEMPTS):
        start = time.perf_counter()
        try:
            response = await send()
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code < 500 and response.status_code != 429:
            if timings is not None:
                timings.add(name, time.perf_counter() - start)
            if response.status_code >= 400:
                raise DeviceError(response.status_code, response.text)
            return response
        if attempt == RETRY_ATTEMPTS - 1:
            status = response.status_code if response is not None else 0
            raise DeviceError(status, response.text if response is not None else "unreachable")
        if timings is not None:
            timings.retries += 1
        wait = delay * (0.5 + random.random())
        if response is not None and response.headers.get("Retry-After", "").isdigit():
            wait = max(wait, float(response.headers["Retry-After"]))
        await asyncio.sleep(min(wait, RETRY_MAX_S))
        delay = min(delay * 2, RETRY_MAX_S)
    raise AssertionError("unreachable")


async def pair(
    api_url: str, user_key: str, name: str | None = None, client: httpx.AsyncClient | None = None
) -> dict:
    """The web app's step: a user pairs a new device; returns {device_id, pairing_code, ...}."""
    own = client is None
    client = client or httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S)
    try:
        r = await _retrying(
            lambda: client.post(
                f"{api_url}/devices/pair",
                json={"name": name} if name else {},
                headers={"Authorization": f"Bearer {user_key}"},
            ),
            None,
            "pair",
        )
        return r.json()
    finally:
        if own:
            await client.aclose()


async def _stream(data: bytes | Path) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        for i in range(0, len(data), STREAM_CHUNK_BYTES):
            yield data[i : i + STREAM_CHUNK_BYTES]
        return
    with open(data, "rb") as f:
        while chunk := f.read(STREAM_CHUNK_BYTES):
            yield chunk


class LifelogDevice:
    def __init__(
        self,
        api_url: str,
        token: str | None = None,
        device_id: str | None = None,
        state_file: Path | None = None,
        client: httpx.AsyncClient | None = None,
        timings: Timings | None = None,
        duplicate_rate: float = 0.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.device_id = device_id
        self.seq = 0
        self.state_file = state_file
        self.client = client or httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S)
        self.timings = timings or Timings()
        # Fraction of ingests re-sent as if the answer had been lost (duplicate handling).
        self.duplicate_rate = duplicate_rate
        if state_file is not None and state_file.exists():
            state = json.loads(state_file.read_text())
            self.device_id, self.token, self.seq = state["device_id"], state["token"], state["seq"]

    def _save(self) -> None:
        if self.state_file is not None:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"device_id": self.device_id, "token": self.token, "seq": self.seq})
            )
            tmp.chmod(0o600)  # it holds the device token, like the ESP32's NVS
            tmp.replace(self.state_file)

    def _headers(self) -> dict[str, str]:
        return {"X-Device-Token": self.token or ""}

    async def activate(self, pairing_code: str) -> str:
        r = await _retrying(
            lambda: self.client.post(
                f"{self.api_url}/devices/activate", json={"pairing_code": pairing_code}
            ),
            self.timings,
            "activate",
        )
        body = r.json()
        self.device_id, self.token = body["device_id"], body["device_token"]
        self._save()
        return self.device_id

    def next_seq(self) -> int:
        self.seq += 1
        self._save()  # before use: a seq is never reused after a crash
        return self.seq

    async def upload_url(self, filename: str, seq: int, content_type: str = "image/jpeg") -> dict:
        r = await _retrying(
            lambda: self.client.post(
                f"{self.api_url}/devices/upload-url",
                json={"filename": filename, "content_type": content_type, "seq": seq},
                headers=self._headers(),
            ),
            self.timings,
            "upload-url",
        )
        return r.json()

    async def put(self, target: dict, data: bytes | Path, content_type: str) -> None:
        url = f"http://{target['upload_host']}:{target['upload_port']}{target['upload_path']}"
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        await _retrying(
            lambda: self.client.put(url, content=_stream(data), headers=headers),
            self.timings,
            "put",
        )

    async def ingest(
        self, object_key: str, seq: int, captured_at: datetime, content_type: str = "image/jpeg"
    ) -> dict:
        body = {
            "object_key": object_key,
            "captured_at": captured_at.isoformat().replace("+00:00", "Z"),
            "seq": seq,
            "content_type": content_type,
            "ntp_synced": True,
        }
        r = await _retrying(
            lambda: self.client.post(
                f"{self.api_url}/devices/ingest", json=body, headers=self._headers()
            ),
            self.timings,
            "ingest",
        )
        return r.json()

    async def upload_photo(
        self,
        data: bytes | Path,
        captured_at: datetime | None = None,
        content_type: str = "image/jpeg",
        put: bool = True,
    ) -> dict:
        """One photo through the whole path; returns the ingest answer."""
        captured_at = captured_at or datetime.now(UTC)
        seq = self.next_seq()
        filename = f"{captured_at:%Y-%m-%dT%H-%M-%SZ}_{seq:06d}.jpg"
        target = await self.upload_url(filename, seq, content_type)
        if put:
            await self.put(target, data, content_type)
        result = await self.ingest(target["object_key"], seq, captured_at, content_type)
        self.timings.count(result["status"])
        if self.duplicate_rate and random.random() < self.duplicate_rate:
            again = await self.ingest(target["object_key"], seq, captured_at, content_type)
            self.timings.count(f"retry-{again['status']}")
            if again.get("item_id") != result.get("item_id"):
                self.timings.count("retry-mismatch")
        return result

    async def aclose(self) -> None:
        await self.client.aclose()


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]
