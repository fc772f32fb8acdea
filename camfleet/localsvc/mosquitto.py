"""A private Mosquitto broker on a loopback port, optionally TLS and/or password protected.

With tls=True the broker requires a client certificate signed by its own CA (mutual
TLS, as AWS IoT does); the client side files are `.ca_file`, `.client_cert`,
`.client_key`. With password=True anonymous clients are refused and `.username` /
`.password` are accepted.

Queue and in-flight limits are lifted so benchmarks measure our code, not the broker's
defaults (20 in flight, 1000 queued per client). Persistence is on by default and saved
every `autosave_interval` seconds and on graceful stop: a restart after stop() keeps
QoS 1 sessions and their queued messages; after kill() only what the last autosave
wrote survives.

`camfleet up` passes `workdir=` (kept under its data directory), `password_file=` /
`acl_file=` (camfleet/localbroker.py owns them) and `limits=` (packet size and queue
limits that protect the services from a flooding device).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
from pathlib import Path

from ._base import LocalService, run_command
from ._tls import make_test_pki

# One second between persistence saves: a kill() loses at most ~1 s of broker state,
# which fault-injection tests can wait out; the save of a test-sized queue is cheap.
DEFAULT_AUTOSAVE_INTERVAL_S = 1

# Lifted for tests and benchmarks (0 = unlimited); `limits=` overrides any of them.
UNLIMITED = {
    "max_inflight_messages": "0",
    "max_queued_messages": "0",
    "max_queued_bytes": "0",
}


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError("mosquitto not found: install it (apt-get install mosquitto)")


class MosquittoInstance(LocalService):
    """Mosquitto on 127.0.0.1:port.

    Attributes: host, port, tls, username/password (None unless password=True),
    ca_file/client_cert/client_key (None unless tls=True), conf_path, log_path.
    """

    name = "mosquitto"

    def __init__(
        self,
        port: int | None = None,
        tls: bool = False,
        password: bool = False,
        persistence: bool = True,
        autosave_interval: int = DEFAULT_AUTOSAVE_INTERVAL_S,
        require_certificate: bool = True,
        workdir: str | os.PathLike[str] | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        limits: dict[str, str] | None = None,
    ):
        super().__init__(port=port, workdir=workdir)
        self.password_file = password_file
        self.acl_file = acl_file
        self.limits = {**UNLIMITED, **(limits or {})}
        self.binary = find_mosquitto()
        self.tls = tls
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.require_certificate = require_certificate
        self.username: str | None = "camfleet" if password else None
        self.password: str | None = secrets.token_urlsafe(18) if password else None
        self.ca_file: Path | None = None
        self.client_cert: Path | None = None
        self.client_key: Path | None = None
        self.conf_path = self.workdir / "mosquitto.conf"
        self.data_dir = self.workdir / "data"
        # As root, mosquitto drops to the `mosquitto` user after start; it must still
        # read its files and write its persistence database.
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("mosquitto")
            except KeyError:
                self._run_as = pwd.getpwuid(0)

    @property
    def url(self) -> str:
        """mqtt:// or mqtts:// URL without credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def _prepare(self) -> None:
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "set_tcp_nodelay true",
        ]
        lines += [f"{key} {value}" for key, value in self.limits.items()]
        if self._run_as is not None:
            lines.append(f"user {self._run_as.pw_name}")
        if self.persistence:
            self.data_dir.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                f"autosave_interval {self.autosave_interval}",
            ]
        else:
            lines.append("persistence false")
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
            if self.acl_file is not None:
                lines.append(f"acl_file {self.acl_file}")
        elif self.password is not None:
            pw_file = self.workdir / "passwd"
            run_command(
                ["mosquitto_passwd", "-b", "-c", pw_file, self.username, self.password],
                timeout=30,
            )
            lines += ["allow_anonymous false", f"password_file {pw_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            pki = make_test_pki(self.workdir / "tls")
            self.ca_file, self.client_cert, self.client_key = (
                pki.ca_file,
                pki.client_cert,
                pki.client_key,
            )
            lines += [
                f"cafile {pki.ca_file}",
                f"certfile {pki.server_cert}",
                f"keyfile {pki.server_key}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        if self._run_as is not None and self._run_as.pw_uid != 0:
            uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
            os.chown(self.workdir, uid, gid)
            for root, dirs, files in os.walk(self.workdir):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), uid, gid)

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.conf_path)]
