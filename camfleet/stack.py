"""The local stack behind `camfleet up`: what is configured is used, what is not is started.

- PostgreSQL: DATABASE_URL, or a cluster in <data dir>/postgres (kept across runs).
- MQTT: MQTT_HOST when set in the environment, or a Mosquitto on 127.0.0.1:1883
  (CAMFLEET_MQTT_PORT / --mqtt-port) with its persistence, password file and ACL in
  <data dir>/mosquitto (camfleet/localbroker.py) when `mosquitto` is installed.
- Prefect: PREFECT_API_URL, or a Prefect server whose database is a `prefect`
  database in the same PostgreSQL (SQLite turns concurrent writes into 503s).
- Object storage: STORAGE_URL, or <data dir>/objects.
- Server secret: CAMFLEET_SECRET_KEY, or one generated once into <data dir>/secret_key.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from psycopg2 import sql

from camfleet import db
from camfleet.settings import Settings

DATABASE_NAME = "camfleet"
PREFECT_DATABASE_NAME = "prefect"


class StackError(RuntimeError):
    """Something `camfleet up` needs is missing; the message says what to install or set."""


@dataclass
class LocalStack:
    settings: Settings
    prefect_port: int | None = None
    mqtt_port: int | None = None
    broker_pid: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    lines: list[tuple[str, str]] = field(default_factory=list)
    services: list = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir.resolve()

    def port_problems(self, prefect: bool = True, api_port: int | None = None) -> list[str]:
        """One line per port this stack would listen on that is taken, naming the fix.

        Checked before anything starts, so a busy port never leaves half a stack.
        """
        wanted = []
        if "MQTT_HOST" not in os.environ:
            wanted.append(("MQTT broker", self.mqtt_port, "--mqtt-port or CAMFLEET_MQTT_PORT"))
        if prefect and not os.environ.get("PREFECT_API_URL"):
            wanted.append(
                (
                    "Prefect server",
                    self.prefect_port,
                    "--prefect-port or CAMFLEET_PREFECT_PORT, or PREFECT_API_URL="
                    "http://HOST:PORT/api to use a Prefect server that is already running",
                )
            )
        if api_port is not None:
            wanted.append(("device API", api_port, "--api-port or CAMFLEET_API_PORT"))
        return [
            f"port 127.0.0.1:{port} ({what}) is already in use: set {fix}"
            for what, port, fix in wanted
            if port is not None and not _port_free(port)
        ]

    def start(self, prefect: bool = True) -> LocalStack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._database()
        self._broker()
        self._storage()
        self._secret()
        if prefect:
            self._prefect()
        return self

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    # ---- pieces ---------------------------------------------------------------------

    def _database(self) -> None:
        if self.settings.database_url:
            dsn = self.settings.database_url.get_secret_value()
            where = _redact(dsn)
            self.prefect_database_url = None
        else:
            from camfleet.localsvc import PostgresInstance

            try:
                pg = PostgresInstance(data_dir=self.data_dir / "postgres").start()
            except FileNotFoundError as exc:
                raise StackError(
                    "DATABASE_URL is not set and PostgreSQL is not installed: "
                    "apt-get install postgresql, or set DATABASE_URL"
                ) from exc
            self.services.append(pg)
            for name in (DATABASE_NAME, PREFECT_DATABASE_NAME):
                _ensure_database(pg.dsn, name)
            dsn = pg.dsn_for(DATABASE_NAME)
            self.prefect_database_url = pg.dsn_for(PREFECT_DATABASE_NAME)
            where = f"{dsn} (local cluster in {pg.data_dir})"
        applied = db.migrate(dsn)
        self.env["DATABASE_URL"] = dsn
        self.dsn = dsn
        note = f", applied {', '.join(applied)}" if applied else ", schema up to date"
        self.lines.append(("database", where + note))

    def _broker(self) -> None:
        if "MQTT_HOST" in os.environ:
            self.lines.append(("broker", f"{self.settings.mqtt_host}:{self.settings.mqtt_port}"))
            return
        if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
            raise StackError(
                "no MQTT broker configured (MQTT_HOST) and Mosquitto is not installed: "
                "apt-get install mosquitto, or set MQTT_HOST"
            )
        from camfleet import localbroker

        directory = self.data_dir / "mosquitto"
        broker, service_password = localbroker.broker(
            directory, self.mqtt_port or localbroker.DEFAULT_PORT
        )
        broker.start()
        self.services.append(broker)
        self.broker_pid = broker.pid
        self.env.update(
            MQTT_HOST=broker.host,
            MQTT_PORT=str(broker.port),
            MQTT_TLS="false",
            MQTT_USERNAME=localbroker.SERVICE_USER,
            MQTT_PASSWORD=service_password,
        )
        self.lines.append(
            (
                "broker",
                f"{broker.url} (local Mosquitto, state in {directory}; "
                "device accounts: camfleet broker add-device ID)",
            )
        )

    def _storage(self) -> None:
        url = self.settings.resolved_storage_url()
        self.env["STORAGE_URL"] = url
        self.lines.append(("storage", _redact(url)))

    def _secret(self) -> None:
        if self.settings.secret_key:
            return
        path = self.data_dir / "secret_key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        self.env["CAMFLEET_SECRET_KEY"] = path.read_text().strip()

    def _prefect(self) -> None:
        if os.environ.get("PREFECT_API_URL"):
            self.env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
            self.lines.append(("prefect", os.environ["PREFECT_API_URL"]))
            return
        from camfleet.localsvc import PrefectServerInstance

        server = PrefectServerInstance(
            port=self.prefect_port,
            home=self.data_dir / "prefect",
            database_url=self.prefect_database_url,
            ui=True,
        ).start()
        self.services.append(server)
        self.env["PREFECT_API_URL"] = server.api_url
        self.lines.append(("prefect UI", server.ui_url))


def _port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (as the services bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ensure_database(admin_dsn: str, name: str) -> None:
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def _redact(url: str) -> str:
    """A URL without its password, for banners and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
