"""Where rate-limit counters live: PostgreSQL (default), Redis, or this process.

Each backend does one thing: `hit(keys, windows)` adds one to every key's fixed window
(started at the key's first hit, `windows` seconds long) and returns, per key, the
count after this hit and the window's end (epoch seconds), in one atomic step per key;
`refund(keys)` takes one back. `services/api/ratelimit.py` decides what a count means.

PostgreSQL and Redis are seen by every API instance, so a limit holds for the whole
deployment however many instances serve it (issue 13, item 15).
"""

from __future__ import annotations

import logging
import time

from services.api.db import queries

log = logging.getLogger("camfleet.api.ratelimit")

# Expired PostgreSQL windows are deleted at most this often per instance (a bounded
# batch), so the table holds roughly the callers of the longest window, not all ever seen.
PG_SWEEP_INTERVAL_S = 60.0


class CountersUnavailable(Exception):
    """The counter store did not answer (the request gets a 503, not a free pass)."""


class PgCounters:
    """`rate_limit_counters` (sql/migrations/0090): one upsert for all keys of a request."""

    def __init__(self, app) -> None:
        self.app = app  # the pool is opened by the app's lifespan, after we are made
        self._next_sweep = time.monotonic() + PG_SWEEP_INTERVAL_S

    async def hit(self, keys: list[str], windows: list[int]) -> list[tuple[int, float]]:
        async with self.app.state.pool.acquire() as conn:
            rows = queries().access_rate_hit(conn, keys=keys, windows=windows, amount=1)
            by_key = {r["key"]: (r["hits"], r["expires_at"]) async for r in rows}
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + PG_SWEEP_INTERVAL_S
                await queries().access_rate_sweep(conn)
        return [by_key[k] for k in keys]

    async def refund(self, keys: list[str]) -> None:
        async with self.app.state.pool.acquire() as conn:
            await queries().access_rate_refund(conn, keys=keys, amount=1)


class LimitsStorageCounters:
    """A `limits` storage (async Redis, or the in-process LoopMemoryStorage)."""

    def __init__(self, storage, is_async: bool) -> None:
        self.storage = storage
        self.is_async = is_async

    async def _call(self, method: str, *args):
        result = getattr(self.storage, method)(*args)
        return await result if self.is_async else result

    async def hit(self, keys: list[str], windows: list[int]) -> list[tuple[int, float]]:
        try:
            out = []
            for key, window in zip(keys, windows, strict=True):
                hits = await self._call("incr", key, window, 1)
                out.append((hits, await self._call("get_expiry", key)))
            return out
        except (OSError, self.storage.base_exceptions) as exc:
            log.warning("rate-limit store unreachable: %s", type(exc).__name__)
            raise CountersUnavailable from None

    async def refund(self, keys: list[str]) -> None:
        try:
            for key in keys:
                if await self._call("get", key) > 0:
                    await self._call("incr", key, 1, -1)  # the window's expiry is kept
        except (OSError, self.storage.base_exceptions) as exc:
            log.warning("rate-limit store unreachable: %s", type(exc).__name__)
            raise CountersUnavailable from None


def open_counters(spec: str, app):
    """The counter store named by CAMFLEET_RATE_LIMIT_STORAGE (`spec`)."""
    spec = (spec or "postgresql").strip()
    if spec in ("postgresql", "postgres", "database"):
        return PgCounters(app)
    if spec == "memory":
        from services.api.ratelimit import LoopMemoryStorage

        return LimitsStorageCounters(LoopMemoryStorage(), is_async=False)
    if spec.startswith(("redis://", "rediss://", "redis+unix://")):
        from limits.aio.storage import RedisStorage

        # redis-py's asyncio client (the `redis` package), not coredis.
        storage = RedisStorage(
            "async+" + spec, implementation="redispy", key_prefix="camfleet-limits"
        )
        return LimitsStorageCounters(storage, is_async=True)
    raise ValueError("CAMFLEET_RATE_LIMIT_STORAGE must be postgresql, memory or a redis:// URL")
