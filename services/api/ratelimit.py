"""Rate limits of the device endpoints: per device, per user and per client address.

Limits are fixed windows in the `limits` notation ("20/second;600/minute"). The
counters live where every API instance sees them, so N instances enforce one limit,
not N (issue 13, item 15):

* PostgreSQL (default): `rate_limit_counters`, one multi-key upsert per request
  (services/api/counters.py);
* Redis, when CAMFLEET_RATE_LIMIT_STORAGE=redis://host:port/db (`limits`' own async
  Redis storage);
* `memory`: per process (`LoopMemoryStorage`), for a single instance or a benchmark.

Every refusal is a 429 with `Retry-After` (seconds until the window that refused
resets) and a JSON reason. A hit is counted and checked in one atomic step, so
concurrent requests cannot all slip under a limit (failed activations included: an
attempt is charged to the failure budget before its code is checked, and refunded when
the code was valid).

Values come from `RateLimits.from_settings()` (CAMFLEET_RATE_LIMIT_* in camfleet/settings.py) or
`create_app(rate_limits=RateLimits(...))`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import limits
from fastapi import Depends, HTTPException, Request
from limits.storage import Storage

from camfleet.settings import Settings
from services.api.auth import DeviceIdentity, UserIdentity, current_device, current_user
from services.api.counters import CountersUnavailable, open_counters

# A device shoots one photo every ~30 s and flushes its SD backlog when it finds Wi-Fi:
# two requests per photo (upload-url + ingest) at a few photos per second is the honest
# worst case; 20/s leaves room for retries, 600/min stops a runaway loop within a minute.
DEFAULT_DEVICE_LIMIT = "20/second;600/minute"
# A user's devices share this: a household or lab fleet of up to ~50 devices flushing
# together; more needs a raised limit, deliberately.
DEFAULT_USER_LIMIT = "200/second;6000/minute"
# Pairing is a person clicking in the web app: a few a minute is plenty.
DEFAULT_PAIR_LIMIT = "10/minute;100/hour"
# Activation is unauthenticated: every attempt per client address is limited, and the
# FAILED ones much more tightly, which (with 40-bit, 10-minute codes) makes guessing
# a pairing code hopeless. A device activates once; a person retyping a code a few times.
DEFAULT_ACTIVATE_LIMIT = "30/minute"
DEFAULT_ACTIVATE_FAIL_LIMIT = "10/10 minutes;50/day"
# Manual triggers per user (or per device in device-id-only mode without a key): a
# person clicking, or an automation triggering a fleet of a few dozen cameras at once.
DEFAULT_TRIGGER_LIMIT = "20/second;600/minute"
# POST /v1/captures per device: one image per trigger. A device reconnecting after an
# outage gets up to 50 pending commands at once (command_hub.MAX_PENDING_ON_CONNECT) and
# uploads them back to back: the burst allows that backlog, the minute a sustained
# 10 per second, far above any camera's real rate.
DEFAULT_CAPTURE_LIMIT = "60/10 seconds;600/minute"
# Command-stream connects per device: a device reconnects after a network drop or an
# API restart; more than one every two seconds on average is a loop, not a device.
DEFAULT_STREAM_LIMIT = "10/10 seconds;30/minute"


LIMIT_NAMES = (
    "device",
    "user",
    "pair",
    "activate",
    "activate_fail",
    "trigger",
    "capture",
    "stream",
)


def _parse(spec: str) -> list[limits.RateLimitItem]:
    return limits.parse_many(spec)


@dataclass
class RateLimits:
    device: str = DEFAULT_DEVICE_LIMIT
    user: str = DEFAULT_USER_LIMIT
    pair: str = DEFAULT_PAIR_LIMIT
    activate: str = DEFAULT_ACTIVATE_LIMIT
    activate_fail: str = DEFAULT_ACTIVATE_FAIL_LIMIT
    trigger: str = DEFAULT_TRIGGER_LIMIT
    capture: str = DEFAULT_CAPTURE_LIMIT
    stream: str = DEFAULT_STREAM_LIMIT
    enabled: bool = True
    # "postgresql" (shared by every instance), "memory" (this process) or a redis:// URL.
    storage: str = "postgresql"
    _items: dict[str, list[limits.RateLimitItem]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in LIMIT_NAMES:
            self._items[name] = _parse(getattr(self, name))
        storage = (self.storage or "").strip()
        if storage not in ("postgresql", "postgres", "database", "memory") and not (
            storage.startswith(("redis://", "rediss://", "redis+unix://"))
        ):
            raise ValueError(
                "CAMFLEET_RATE_LIMIT_STORAGE must be postgresql, memory or a redis:// URL"
            )

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> RateLimits:
        """The CAMFLEET_RATE_LIMIT* settings (camfleet/settings.py); unset ones default."""
        s = settings or Settings()
        named = {name: getattr(s, f"rate_limit_{name}") for name in LIMIT_NAMES}
        return cls(
            **{name: spec for name, spec in named.items() if spec is not None},
            storage=s.rate_limit_storage,
            enabled=s.rate_limits,
        )

    def items(self, name: str) -> list[limits.RateLimitItem]:
        return self._items[name]


# Expired counters are swept at most this often, so memory stays bounded by the
# devices seen in the last window rather than growing with every device ever seen.
SWEEP_INTERVAL_S = 10.0


class LoopMemoryStorage(Storage):
    """Fixed-window counters in a dict, for one asyncio process; no threads, no locks.

    Only for CAMFLEET_RATE_LIMIT_STORAGE=memory: its limits hold per process.

    `limits`' own MemoryStorage starts a threading.Timer every 10 ms while counters
    change; under a few hundred requests per second those threads and their GIL
    hand-offs cost ~0.2 ms per hit (measured), more than the rest of the hit.
    Everything here runs on the event loop, so plain dict updates are atomic.
    """

    STORAGE_SCHEME = ["camfleet-loop-memory"]

    def __init__(self, uri: str | None = None, **options) -> None:
        super().__init__(uri, **options)
        self._counts: dict[str, list] = {}  # key -> [count, expires_at]
        self._next_sweep = time.time() + SWEEP_INTERVAL_S

    @property
    def base_exceptions(self):
        return ValueError

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL_S
        for key in [k for k, (_, exp) in self._counts.items() if exp <= now]:
            del self._counts[key]

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        if now >= self._next_sweep:
            self._sweep(now)
        entry = self._counts.get(key)
        if entry is None or entry[1] <= now:
            entry = self._counts[key] = [0, now + expiry]
        entry[0] += amount
        return entry[0]

    def get(self, key: str) -> int:
        entry = self._counts.get(key)
        return entry[0] if entry is not None and entry[1] > time.time() else 0

    def get_expiry(self, key: str) -> float:
        entry = self._counts.get(key)
        return entry[1] if entry is not None else time.time()

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        count = len(self._counts)
        self._counts.clear()
        return count

    def clear(self, key: str) -> None:
        self._counts.pop(key, None)


Charge = tuple[str, str | None, str]  # (limit name, caller key, what to call it in a 429)


class Limiter:
    """Count-and-check against named limits in one step; raises the 429 itself."""

    def __init__(self, config: RateLimits, counters) -> None:
        self.config = config
        self.counters = counters  # services/api/counters.py

    def _checks(self, charges: tuple[Charge, ...]):
        return [
            (item.key_for(name, key), item, what)
            for name, key, what in charges
            if key
            for item in self.config.items(name)
        ]

    async def hit(self, name: str, key: str | None, what: str) -> None:
        await self.hit_many((name, key, what))

    async def hit_many(self, *charges: Charge) -> None:
        """One hit on every limit of every charge, atomically; 429 when one is exceeded."""
        if not self.config.enabled:
            return
        checks = self._checks(charges)
        if not checks:
            return
        try:
            counts = await self.counters.hit(
                [k for k, _, _ in checks], [item.get_expiry() for _, item, _ in checks]
            )
        except CountersUnavailable:
            raise HTTPException(
                503,
                detail={"error": "rate_limit_store_unavailable", "reason": "retry shortly"},
                headers={"Retry-After": "2"},
            ) from None
        refused = [
            (expires_at, item, what)
            for (_, item, what), (hits, expires_at) in zip(checks, counts, strict=True)
            if hits > item.amount
        ]
        if refused:
            expires_at, item, what = max(refused, key=lambda r: r[0])
            retry_after = max(1, math.ceil(expires_at - time.time()))
            raise HTTPException(
                status_code=429,
                detail={
                    "error": "rate_limited",
                    "reason": f"{what} rate limit of {item} exceeded",
                    "retry_after": retry_after,
                },
                headers={"Retry-After": str(retry_after)},
            )

    async def refund(self, name: str, key: str) -> None:
        """Give back one hit counted up front (a valid activation code)."""
        if self.config.enabled:
            checks = self._checks(((name, key, name),))
            with contextlib.suppress(CountersUnavailable):
                await self.counters.refund([k for k, _, _ in checks])


def limiter(request: Request) -> Limiter:
    app = request.app
    found = getattr(app.state, "limiter", None)
    if found is None:
        config = getattr(app.state, "rate_limits", None) or RateLimits.from_settings()
        found = app.state.limiter = Limiter(config, open_counters(config.storage, app))
    return found


def client_address(request: Request) -> str:
    # The direct peer: behind a reverse proxy, configure uvicorn's --proxy-headers.
    return request.client.host if request.client else "unknown"


async def charge_device(request: Request, device: DeviceIdentity) -> None:
    """Count one request against the device's and its user's limits (or raise 429)."""
    await limiter(request).hit_many(
        ("device", device.device_id, "device"), ("user", device.user_id, "user")
    )


async def authorized_device(request: Request) -> DeviceIdentity:
    """The authenticated device, counted against its limits: a plain call, for hot paths
    where FastAPI's dependency solving is a measurable share of the request."""
    device = await current_device(request)
    await charge_device(request, device)
    return device


async def limited_device(
    request: Request, device: DeviceIdentity = Depends(current_device)
) -> DeviceIdentity:
    """FastAPI dependency: the authenticated device, counted against device and user."""
    await charge_device(request, device)
    return device


async def limited_user(request: Request, user: UserIdentity = Depends(current_user)):
    """FastAPI dependency: the authenticated user, counted against the user limit."""
    await limiter(request).hit("user", user.user_id, "user")
    return user


async def check_activation(request: Request) -> None:
    """Before an activation attempt: charge the per-address attempt budget AND the
    failure budget in one atomic step, so concurrent wrong codes cannot all be checked
    while the failure count lags behind; `activation_succeeded` refunds the latter."""
    address = client_address(request)
    await limiter(request).hit_many(
        ("activate", address, "activation"), ("activate_fail", address, "failed activation")
    )


async def activation_succeeded(request: Request) -> None:
    await limiter(request).refund("activate_fail", client_address(request))
