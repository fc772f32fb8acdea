"""The Mosquitto `camfleet up` runs: fixed port, state under the data dir, ACL and limits.

Everything lives in <data dir>/mosquitto: the persistence database (QoS 1 sessions
and queued messages survive a restart), `passwd` (mosquitto_passwd hashes), `acl` and
`service_password` (0600, the password of the `camfleet` account the services use).

- Anonymous clients are refused. The `camfleet` account (assembler, signer, simulators
  started beside the stack) may use every topic; a device account (`camfleet broker
  add-device ID`, username = the device id or edge serial) only its own topics.
- Limits: a packet over MAX_PACKET_SIZE is refused by the broker (the connection that
  sent it is closed), and each client's queue is bounded, so one device cannot make
  the broker or the services hold unbounded data (issue 12).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import signal
from pathlib import Path

from camfleet.localsvc import run_command

SERVICE_USER = "camfleet"
DEFAULT_PORT = 1883

# The largest legitimate message is an edge box's URL answer (50 presigned POST forms,
# ~100 KiB); an ESP32 chunk is ~1.4 KiB.
MAX_PACKET_SIZE = 256 * 1024
LIMITS = {
    "max_packet_size": str(MAX_PACKET_SIZE),
    # Per client: messages in flight to it, and queued while it is slow or offline.
    "max_inflight_messages": "100",
    "max_queued_messages": "10000",
    "max_queued_bytes": str(64 * 1024 * 1024),
}

# Device ids become MQTT usernames and ACL patterns: no wildcards, separators or spaces.
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

ACL = """\
# Written by `camfleet up`; regenerated on every start.
# Devices (username = device id or edge serial): their own topics only.
pattern write ESP32CAM/%u/data
pattern write ESP32CAM/%u/status
pattern read ESP32CAM/%u/ack
pattern write cameraDevice/generateURL/%u
pattern read cameraDevice/getURL/%u
pattern read cameraDevice/fileUploaded/%u

# camfleet's own services: every topic.
user {service_user}
topic readwrite #
"""


class BrokerAuthError(ValueError):
    """A device id that cannot be an MQTT username."""


class BrokerAuth:
    """The password file, ACL and service account of the local broker in `directory`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.password_file = directory / "passwd"
        self.acl_file = directory / "acl"
        self.service_password_file = directory / "service_password"

    def ensure(self) -> str:
        """Create what is missing (keeping device accounts); returns the service password."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.service_password_file.exists():
            fd = os.open(self.service_password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        password = self.service_password_file.read_text().strip()
        self._set_password(SERVICE_USER, password)
        self.acl_file.write_text(ACL.format(service_user=SERVICE_USER))
        self._hand_to_broker_user()
        return password

    def add_device(self, device_id: str, password: str | None = None) -> str:
        """Create or replace a device's account; returns its password."""
        if not DEVICE_ID.match(device_id) or device_id == SERVICE_USER:
            raise BrokerAuthError(
                "device id must be 1-64 letters, digits, '_', '.', '-' (starting with a "
                f"letter or digit) and not {SERVICE_USER!r}"
            )
        password = password or secrets.token_urlsafe(18)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._set_password(device_id, password)
        self._hand_to_broker_user()
        return password

    def _set_password(self, user: str, password: str) -> None:
        # -b takes the password on the command line, visible in ps for an instant; the
        # alternative (interactive prompt) needs a tty. The file must exist first.
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        run_command(["mosquitto_passwd", "-b", self.password_file, user, password], timeout=30)

    def _hand_to_broker_user(self) -> None:
        """As root, Mosquitto drops to the `mosquitto` user, which must read these files."""
        if os.geteuid() != 0:
            return
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return
        for path in (self.directory, self.password_file, self.acl_file):
            if path.exists():
                os.chown(path, user.pw_uid, user.pw_gid)


def broker(directory: Path, port: int = DEFAULT_PORT):
    """The stack's Mosquitto (not started): accounts, ACL and limits as described above.

    Returns (MosquittoInstance, service password).
    """
    from camfleet.localsvc import MosquittoInstance

    auth = BrokerAuth(directory)
    password = auth.ensure()
    instance = MosquittoInstance(
        port=port,
        workdir=directory,
        password_file=auth.password_file,
        acl_file=auth.acl_file,
        limits=LIMITS,
    )
    return instance, password


def reload(broker_pid: int | None) -> bool:
    """Ask a running Mosquitto to reread its password file and ACL (SIGHUP)."""
    if not broker_pid:
        return False
    try:
        os.kill(broker_pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True
