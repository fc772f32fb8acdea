"""A real Prefect server (`prefect server start`) on a loopback port.

By default its state is SQLite under a private PREFECT_HOME (temp dir, or `home=`
to keep it, as `camfleet up` does). With `database_url=` it uses PostgreSQL instead,
which is what anything beyond a demo needs (SQLite turns concurrent writes into 503s).
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.request
from pathlib import Path

from ._base import LocalService

# The SQLite migrations on first start take several seconds on 2 cores; PostgreSQL
# ones longer still when the box is busy with tests.
PREFECT_START_TIMEOUT_S = 120.0


def asyncpg_url(database_url: str) -> str:
    """Prefect's server wants SQLAlchemy's asyncpg dialect: postgresql+asyncpg://..."""
    for prefix in (
        "postgresql+asyncpg://",
        "postgresql+psycopg2://",
        "postgresql://",
        "postgres://",
    ):
        if database_url.startswith(prefix):
            return "postgresql+asyncpg://" + database_url[len(prefix) :]
    raise ValueError("database_url must be a postgresql:// URL")


def find_prefect() -> str:
    beside_python = Path(sys.executable).parent / "prefect"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("prefect")
    if found:
        return found
    raise FileNotFoundError("the prefect command is not installed in this environment")


class PrefectServerInstance(LocalService):
    """`prefect server start` on 127.0.0.1:port.

    home: PREFECT_HOME (kept if given; a temp dir otherwise). database_url: a
    postgresql:// URL for the server's database (SQLite in home when None). ui: serve
    the web UI. services: run the background services (scheduler, late runs...).

    Attributes: host, port, api_url, ui_url, home, database_url, log_path.
    """

    name = "prefect"
    start_timeout_s = PREFECT_START_TIMEOUT_S

    def __init__(
        self,
        port: int | None = None,
        home: str | os.PathLike[str] | None = None,
        database_url: str | None = None,
        ui: bool = False,
        services: bool = True,
    ):
        super().__init__(port=port)
        self.home = Path(home).resolve() if home is not None else self.workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.database_url = asyncpg_url(database_url) if database_url else None
        self.ui = ui
        self.services = services
        self.binary = find_prefect()

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _env(self) -> dict[str, str]:
        # Our own PREFECT_* settings (a test harness' API URL, a profile) must not leak
        # into the server; it gets exactly these.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="true" if self.ui else "false",
            PREFECT_SERVER_UI_API_URL=self.api_url,
            PYTHONUNBUFFERED="1",
        )
        if self.database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.database_url
        return env

    def _command(self) -> list[str]:
        args = [
            self.binary,
            "server",
            "start",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--analytics-off",
            "--ui" if self.ui else "--no-ui",
        ]
        if not self.services:
            args.append("--no-services")
        return args

    def _is_ready(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.api_url}/health", timeout=2) as resp:
            return resp.status == 200
