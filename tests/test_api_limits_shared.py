"""Rate limits hold across API instances (issue 13, item 15).

Two `camfleet api` processes share one PostgreSQL (and, in the last test, one private
Redis): a limit of N admits N requests in total however they are spread over the
instances, and concurrent failed activations cannot slip past their budget.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from camfleet.localsvc.redis import RedisInstance
from tests.faults_api_support import make_user_key
from tests.test_api_access import SECURE, bearer, give_token
from tests.test_api_commands_helpers import ApiProcess, add_device, fetch, jpeg_bytes

LIMITS = {
    **SECURE,
    "CAMFLEET_RATE_LIMIT_TRIGGER": "4/minute",
    "CAMFLEET_RATE_LIMIT_CAPTURE": "3/minute",
    "CAMFLEET_RATE_LIMIT_STREAM": "2/minute",
    "CAMFLEET_RATE_LIMIT_DEVICE": "5/minute",
    "CAMFLEET_RATE_LIMIT_ACTIVATE": "1000/minute",
    "CAMFLEET_RATE_LIMIT_ACTIVATE_FAIL": "10/10 minutes",
}


@pytest.fixture
def storage_dir(tmp_path):
    d = tmp_path / "objects"
    d.mkdir()
    return d


def alternate(apis, n: int, request) -> list[int]:
    """`n` requests, alternating between the instances; their status codes."""
    return [request(apis[i % len(apis)].url).status_code for i in range(n)]


def assert_limits_shared(apis, dsn: str) -> None:
    alice = make_user_key(dsn, "alice")
    add_device(dsn, "CAM1")
    token = give_token(dsn, "CAM1", "alice")
    device = {"X-Device-Token": token}

    # manual triggers per user: 4 in total, then 429 on either instance
    def trigger(url):
        return httpx.post(f"{url}/v1/devices/CAM1/trigger", headers=bearer(alice), timeout=10)

    codes = alternate(apis, 6, trigger)
    assert codes == [200] * 4 + [429] * 2, codes
    refused = trigger(apis[0].url)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["detail"]["error"] == "rate_limited"

    # captures per device: 3
    image = base64.b64encode(jpeg_bytes()).decode()

    def capture(url):
        body = {"device_id": "CAM1", "image_base64": image}
        return httpx.post(f"{url}/v1/captures", json=body, headers=device, timeout=10)

    codes = alternate(apis, 5, capture)
    assert codes[:3] in ([201] * 3,) and codes[3:] == [429, 429], codes

    # command-stream connects per device: 2 (a plain GET with a short read is enough)
    def connect(url):
        with httpx.stream(
            "GET", f"{url}/v1/devices/CAM1/commands", headers=device, timeout=10
        ) as r:
            return r

    assert alternate(apis, 4, connect) == [200, 200, 429, 429]


def assert_failed_activations_counted_atomically(apis) -> None:
    """40 concurrent wrong codes over both instances: exactly 10 are checked."""

    def activate(i):
        url = apis[i % len(apis)].url
        r = httpx.post(f"{url}/devices/activate", json={"pairing_code": f"WRONG{i:04d}"})
        return r.status_code

    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(activate, range(40)))
    assert codes.count(400) == 10 and codes.count(429) == 30, sorted(codes)


def test_limits_hold_across_two_instances_on_postgresql(database_url, storage_dir):
    with (
        ApiProcess(database_url, storage_dir, **LIMITS) as a,
        ApiProcess(database_url, storage_dir, **LIMITS) as b,
    ):
        assert_limits_shared([a, b], database_url)
        assert_failed_activations_counted_atomically([a, b])


def test_limits_hold_across_two_instances_on_redis(database_url, storage_dir):
    with RedisInstance() as redis_server:
        env = {**LIMITS, "CAMFLEET_RATE_LIMIT_STORAGE": redis_server.url}
        with (
            ApiProcess(database_url, storage_dir, **env) as a,
            ApiProcess(database_url, storage_dir, **env) as b,
        ):
            assert_limits_shared([a, b], database_url)
            assert_failed_activations_counted_atomically([a, b])
        # the counters really were in Redis, not in PostgreSQL
        import redis

        assert redis.Redis(host=redis_server.host, port=redis_server.port).dbsize() > 0
        assert fetch(database_url, "SELECT count(*) FROM rate_limit_counters") == [(0,)]


def test_a_mistyped_limit_or_store_is_refused_at_start():
    from services.api.ratelimit import RateLimits

    for bad in ({"storage": "mongodb://127.0.0.1"}, {"trigger": "lots"}):
        with pytest.raises(ValueError):
            RateLimits(**bad)
    assert RateLimits(storage="redis://127.0.0.1:1/0").storage.startswith("redis")
