"""SFTP with paramiko: a checked, tuned connection and safe remote writes.

- **Host key**: the server's key must match the configured `SHA256:` fingerprint, or
  the known_hosts file (the block's, else `~/.ssh/known_hosts`). Unknown or changed
  keys are refused (paramiko's RejectPolicy behaviour); nothing is ever auto-added.
- **Safe writes**: a file is written to a hidden temporary name in the target
  directory (`.name.part`), its size is checked on the open handle and after close,
  and only then renamed into place (`posix-rename@openssh.com`, atomic, replaces an
  older copy). A reader never sees a half-written file under the final name; a
  crashed attempt leaves only the hidden temporary name, which the next attempt
  overwrites (one writer per event at a time: camfleet/uploader/session.py holds its
  lock, and an uploader asks whether it still holds it right before each rename, since
  a run whose database session died mid-transfer may share the temporary name with
  the event's next owner).
- **Refusals**: a refused host key or client key is remembered for the run (REFUSALS)
  and raised again without dialling; the next run tries once more.
- **Throughput**: one SSH connection per run, shared by every lane (one SFTP channel
  per lane); TCP_NODELAY; AES-GCM first; pipelined writes in large requests.

Connections go wherever the configuration says; tests and benchmarks only ever point
them at loopback.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import logging
import os
import posixpath
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import paramiko

log = logging.getLogger("camfleet.uploader.sftp")

# Waiting longer than this for TCP connect, the SSH banner or authentication means
# the server is not going to answer; the job is retried on the next attempt.
CONNECT_TIMEOUT_S = 15.0
# A single SFTP request (open, a write ack, stat, rename) that takes longer than this
# means the server or the network died under us. Without a timeout a half-open TCP
# connection would hang the run forever.
IO_TIMEOUT_S = 60.0
# SSH keepalive between scans so NAT boxes and firewalls keep an idle connection.
KEEPALIVE_S = 30
# AEAD ciphers first: GCM authenticates in the same pass as it encrypts, where the
# CTR modes need a separate HMAC-SHA2 over every packet; paramiko's default order
# would pick aes128-ctr + hmac-sha2-256. (Loopback runs were faster with GCM, within
# the noise of a busy 2-core box.)
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# Bytes per SFTP write request. OpenSSH's sftp-server accepts up to 256 KiB messages;
# 64 KiB halves the number of requests (and their Python overhead) against paramiko's
# 32 KiB default while staying a small multiple of the 32 KiB SSH packet. On loopback
# 32-255 KiB were within noise of each other (bench/bench_sftp_upload.py, part 2).
WRITE_CHUNK = 64 * 1024
# Our receive window and max packet size (they govern downloads and replies; uploads
# are paced by the server's window, which OpenSSH sets to 2 MiB / 32 KiB packets).
WINDOW_SIZE = 4 * 1024 * 1024
MAX_PACKET_SIZE = 32 * 1024
# Temporary names: hidden (the scanner on the other side skips dot files) and marked.
TEMP_PREFIX = "."
TEMP_SUFFIX = ".part"


class SftpTarget(Protocol):
    """What a connection needs (the SftpServer block has all of it)."""

    host: str
    port: int
    username: str
    ssh_key_path: str | None
    private_key: object | None  # SecretStr
    passphrase: object | None  # SecretStr
    host_key_fingerprint: str | None
    known_hosts_path: str | None


class HostKeyRejected(paramiko.SSHException):
    """The server presented a host key we were not told to trust."""


# Answers no retry within a run can change: the server's host key is not the one we
# trust, or it does not accept our key. A connection remembers the first one and raises
# it again without dialling, so a run with 20 pending events makes one attempt, not 20.
REFUSALS = (HostKeyRejected, paramiko.AuthenticationException)


def _again(refusal: Exception) -> Exception:
    """A fresh copy of a remembered refusal (same type and message)."""
    try:
        return type(refusal)(*refusal.args)
    except Exception:
        return HostKeyRejected(str(refusal))


class RemoteSizeMismatch(OSError):
    """The remote file does not have the size we sent: never renamed into place."""


class LocalFileChanged(OSError):
    """The local file changed size while it was being sent (a writer is still at it)."""


# ---- host keys --------------------------------------------------------------------------


def fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:...` as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _normal_fingerprint(value: str) -> str:
    value = value.strip()
    if not value.startswith("SHA256:"):
        value = "SHA256:" + value
    return value.rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: `host`, or `[host]:port` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def check_host_key(target: SftpTarget, key: paramiko.PKey) -> None:
    """Accept `key` only if the configuration vouches for it; HostKeyRejected otherwise."""
    seen = fingerprint(key)
    where = f"{target.host}:{target.port}"
    if target.host_key_fingerprint:
        if hmac.compare_digest(_normal_fingerprint(target.host_key_fingerprint), seen):
            return
        raise HostKeyRejected(
            f"host key of {where} is {seen}, not the configured fingerprint: refusing to "
            "connect (the server was replaced, or someone is in the middle)"
        )
    path = Path(target.known_hosts_path or Path.home() / ".ssh" / "known_hosts").expanduser()
    known = paramiko.HostKeys()
    if path.is_file():
        known.load(str(path))
    entries = known.lookup(known_hosts_name(target.host, target.port)) or {}
    expected = entries.get(key.get_name())
    if expected is not None and hmac.compare_digest(expected.asbytes(), key.asbytes()):
        return
    if entries:
        raise HostKeyRejected(
            f"host key of {where} ({key.get_name()} {seen}) does not match {path}: refusing "
            "to connect (the server was replaced, or someone is in the middle)"
        )
    raise HostKeyRejected(
        f"host key of {where} ({key.get_name()} {seen}) is unknown: not in {path}. "
        "Check it out of band, then set host_key_fingerprint or add it to known_hosts"
    )


# ---- keys -------------------------------------------------------------------------------


def load_private_key(target: SftpTarget) -> paramiko.PKey:
    passphrase = target.passphrase.get_secret_value() if target.passphrase else None  # type: ignore[attr-defined]
    if target.private_key is not None:
        text = target.private_key.get_secret_value()  # type: ignore[attr-defined]
        for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            with contextlib.suppress(paramiko.SSHException, ValueError):
                return cls.from_private_key(io.StringIO(text), password=passphrase)
        raise paramiko.SSHException("private_key is not a readable Ed25519, ECDSA or RSA key")
    if target.ssh_key_path:
        return paramiko.PKey.from_path(Path(target.ssh_key_path).expanduser(), passphrase)
    raise paramiko.SSHException("no SSH key configured: set ssh_key_path or private_key")


# ---- the connection ---------------------------------------------------------------------


class SftpConnection:
    """One authenticated SSH connection; `channel()` opens a tuned SFTP channel on it.

    Thread-safe for opening channels; each SFTPClient must be used by one thread.
    """

    def __init__(self, target: SftpTarget):
        self.target = target
        self._transport: paramiko.Transport | None = None
        self._lock = threading.Lock()
        self._dirs_checked: set[str] = set()
        # The first refusal (REFUSALS) of this run; forget_refusal() before the next run.
        self.refused: Exception | None = None

    def describe(self) -> str:
        return f"sftp://{self.target.username}@{self.target.host}:{self.target.port}"

    @property
    def alive(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    def connect(self) -> SftpConnection:
        """Connect if not connected (or reconnect after the server went away)."""
        with self._lock:
            if self.alive:
                return self
            if self.refused is not None:
                raise _again(self.refused)
            self._close_transport()
            try:
                self._transport = self._open_transport()
            except REFUSALS as exc:
                self.refused = exc
                raise
            self._dirs_checked.clear()
            return self

    def forget_refusal(self) -> None:
        """A new run dials again: the operator may have fixed known_hosts meanwhile."""
        with self._lock:
            self.refused = None

    def _open_transport(self) -> paramiko.Transport:
        t = self.target
        sock = socket.create_connection((t.host, t.port), timeout=CONNECT_TIMEOUT_S)
        try:
            # Every SFTP request waits for its reply; with Nagle's algorithm on, small
            # requests sit behind delayed ACKs (~40 ms each: 20 events/s instead of 300).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = paramiko.Transport(
                sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
            )
        except Exception:
            sock.close()
            raise
        try:
            transport.banner_timeout = CONNECT_TIMEOUT_S
            transport.auth_timeout = CONNECT_TIMEOUT_S
            options = transport.get_security_options()
            available = options.ciphers
            options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in available) + tuple(
                c for c in available if c not in PREFERRED_CIPHERS
            )
            transport.start_client(timeout=CONNECT_TIMEOUT_S)
            check_host_key(t, transport.get_remote_server_key())
            transport.auth_publickey(t.username, load_private_key(t))
            if not transport.is_authenticated():
                raise paramiko.AuthenticationException(f"{self.describe()}: not authenticated")
            transport.set_keepalive(KEEPALIVE_S)
            return transport
        except Exception:
            transport.close()
            raise

    def channel(self) -> paramiko.SFTPClient:
        """A new SFTP session on the shared connection (connecting first if needed)."""
        self.connect()
        assert self._transport is not None
        client = paramiko.SFTPClient.from_transport(
            self._transport, window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE
        )
        if client is None:
            raise paramiko.SSHException(f"{self.describe()}: server refused an SFTP session")
        client.get_channel().settimeout(IO_TIMEOUT_S)
        return client

    def ensure_dirs(self, client: paramiko.SFTPClient, *paths: str) -> None:
        """`mkdir -p` each remote directory, once per connection."""
        for path in paths:
            if path in self._dirs_checked:
                continue
            ensure_remote_dir(client, path)
            self._dirs_checked.add(path)

    def close(self) -> None:
        with self._lock:
            self._close_transport()

    def _close_transport(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
            self._transport = None

    def __enter__(self) -> SftpConnection:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


def ensure_remote_dir(client: paramiko.SFTPClient, path: str) -> None:
    """Create `path` and its missing parents on the server."""
    try:
        if stat.S_ISDIR(client.stat(path).st_mode or 0):
            return
        raise OSError(f"remote path {path} exists and is not a directory")
    except FileNotFoundError:
        pass
    parent = posixpath.dirname(path.rstrip("/"))
    if parent and parent != path:
        ensure_remote_dir(client, parent)
    with contextlib.suppress(OSError):  # created meanwhile by a concurrent lane
        client.mkdir(path)
    if not stat.S_ISDIR(client.stat(path).st_mode or 0):
        raise OSError(f"could not create remote directory {path}")


# ---- safe upload ------------------------------------------------------------------------


def temp_path(final_path: str) -> str:
    directory, name = posixpath.split(final_path)
    return posixpath.join(directory, f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}")


def upload_file(
    client: paramiko.SFTPClient,
    local_path: str | os.PathLike[str],
    final_path: str,
    *,
    expected_size: int | None = None,
    chunk: int = WRITE_CHUNK,
    progress: Callable[[int], None] | None = None,
    before_rename: Callable[[], None] | None = None,
) -> int:
    """Upload to `.name.part`, verify its size, rename to `final_path`; returns bytes.

    Raises (and leaves nothing under `final_path`) on any transfer error, a size
    mismatch, or a local file that changed while it was sent. `before_rename` runs
    last and may raise to stop the rename: the uploader checks there that it still
    owns the event, because a second owner writes the same temporary name.
    """
    tmp = temp_path(final_path)
    with open(local_path, "rb") as local:
        size = os.fstat(local.fileno()).st_size
        if expected_size is not None and size != expected_size:
            raise LocalFileChanged(f"{local_path}: size {size}, scanned as {expected_size}")
        sent = 0
        with client.open(tmp, "wb") as remote:
            remote.set_pipelined(True)
            remote.MAX_REQUEST_SIZE = chunk  # paramiko caps requests at 32 KiB by default
            while block := local.read(chunk):
                remote.write(block)
                sent += len(block)
                if progress is not None:
                    progress(sent)
            confirm_writes(client, remote)
            remote_size = remote.stat().st_size
        if os.fstat(local.fileno()).st_size != size or sent != size:
            raise LocalFileChanged(f"{local_path} changed while it was uploaded")
    if remote_size != size:
        raise RemoteSizeMismatch(f"{tmp}: remote size {remote_size}, sent {size}")
    if before_rename is not None:
        before_rename()
    rename_into_place(client, tmp, final_path)
    return size


def confirm_writes(client: paramiko.SFTPClient, remote: paramiko.SFTPFile) -> None:
    """Read the status of every pipelined write still unanswered; raise on the first error.

    paramiko (5.x) registers pipelined writes without a file object, so their replies
    are dropped unchecked when any later request (fstat, close) reads past them: a
    failed write in the middle (disk full, quota) would leave a hole in a file of the
    right size. This drains them in order, as paramiko's own `_write` does, before any
    other request is sent on this channel. It uses paramiko internals (`_reqs`,
    `_read_response`); pyproject pins paramiko below 6 and a test covers it.
    """
    pending = remote._reqs
    while pending:
        reply_type, _ = client._read_response(pending.popleft())  # raises on an error status
        if reply_type != paramiko.sftp.CMD_STATUS:
            raise paramiko.SFTPError(f"expected a write status, got SFTP message {reply_type}")


def rename_into_place(client: paramiko.SFTPClient, tmp: str, final_path: str) -> None:
    """Atomic replace where the server offers it (OpenSSH does), else remove + rename."""
    try:
        client.posix_rename(tmp, final_path)
        return
    except OSError as exc:
        if "unsupported" not in str(exc).lower():
            raise
    # SFTPv3 rename refuses to replace; the temp file is complete, so the only window
    # is a moment with no file under the final name, never a partial one.
    with contextlib.suppress(FileNotFoundError):
        client.remove(final_path)
    client.rename(tmp, final_path)


def remove_quietly(client: paramiko.SFTPClient, path: str) -> None:
    """Best-effort cleanup of a temporary file after a failed attempt."""
    with contextlib.suppress(Exception):
        client.remove(path)
