"""A private Redis on a loopback port, no persistence (for the shared rate-limit tests).

camfleet keeps its rate-limit counters in PostgreSQL by default; Redis is the optional
store (CAMFLEET_RATE_LIMIT_STORAGE=redis://...). Attributes: host, port, url.
"""

from __future__ import annotations

import shutil

from ._base import LocalService


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("redis-server not found: install it (apt-get install redis-server)")
    return found


class RedisInstance(LocalService):
    name = "redis"

    def __init__(self, port: int | None = None):
        super().__init__(port=port)
        self.binary = find_redis_server()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--dir", str(self.workdir),
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host=self.host, port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False
