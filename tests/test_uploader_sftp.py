"""tasks/sftp.py against a real OpenSSH sshd: host keys, safe writes, write errors."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import paramiko
import pytest

from camfleet.localsvc import SshdInstance
from camfleet.uploader.sftp import (
    HostKeyRejected,
    SftpConnection,
    confirm_writes,
    fingerprint,
    temp_path,
    upload_file,
)


def target(sshd, **overrides):
    fields = dict(
        host=sshd.host,
        port=sshd.port,
        username=sshd.username,
        ssh_key_path=str(sshd.client_key_path),
        private_key=None,
        passphrase=None,
        host_key_fingerprint=None,
        known_hosts_path=str(sshd.known_hosts_path),
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.fixture
def remote_dir(sshd) -> Path:
    path = Path(sshd.root) / f"t-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def test_known_hosts_and_fingerprint_are_accepted(sshd):
    with SftpConnection(target(sshd)) as conn:
        assert conn.alive
    with SftpConnection(
        target(sshd, known_hosts_path=None, host_key_fingerprint=sshd.host_key_fingerprint)
    ) as conn:
        assert conn.alive


def test_unknown_host_key_is_refused_before_authenticating(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    conn = SftpConnection(target(sshd, known_hosts_path=str(empty)))
    with pytest.raises(HostKeyRejected, match="unknown") as info:
        conn.connect()
    assert sshd.host_key_fingerprint in str(info.value)  # so the user can check it
    assert not conn.alive
    # sshd saw no authentication from that connection: we hung up after key exchange.
    log = sshd.log_tail(2000)
    port = re.findall(r"Connection from \S+ port (\d+)", log)[-1]
    assert f"port {port} ssh2" not in log


def test_changed_host_key_is_refused(sshd, tmp_path):
    other = paramiko.Ed25519Key.from_private_key_file(str(sshd.client_key_path))
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd.host}]:{sshd.port} ssh-ed25519 {other.get_base64()}\n")
    with pytest.raises(HostKeyRejected, match="does not match"):
        SftpConnection(target(sshd, known_hosts_path=str(known))).connect()
    with pytest.raises(HostKeyRejected, match="not the configured fingerprint"):
        SftpConnection(target(sshd, host_key_fingerprint=fingerprint(other))).connect()


def test_upload_lands_complete_under_the_final_name_and_replaces_an_older_copy(
    sshd, remote_dir, tmp_path
):
    local = tmp_path / "v.mp4"
    local.write_bytes(os.urandom(700_000))
    final = str(remote_dir / "v.mp4")
    (remote_dir / "v.mp4").write_bytes(b"older copy")
    with SftpConnection(target(sshd)) as conn:
        client = conn.channel()
        assert upload_file(client, local, final, expected_size=700_000) == 700_000
    assert (remote_dir / "v.mp4").read_bytes() == local.read_bytes()
    assert not Path(temp_path(final)).exists()
    assert temp_path(final) == str(remote_dir / ".v.mp4.part")


def test_a_failed_pipelined_write_is_an_error_not_a_short_file(sshd):
    """paramiko alone drops pipelined write errors; confirm_writes reads every status."""
    with SftpConnection(target(sshd)) as conn:
        client = conn.channel()
        with client.open("/dev/full", "wb") as f:  # every write fails with ENOSPC
            f.set_pipelined(True)
            f.write(b"x" * 200_000)
        # ...and close() said nothing: that is the hole confirm_writes closes.
        with client.open("/dev/full", "wb") as f:
            f.set_pipelined(True)
            f.write(b"x" * 200_000)
            with pytest.raises(OSError):
                confirm_writes(client, f)


def test_local_file_that_changed_since_the_scan_is_not_renamed_into_place(
    sshd, remote_dir, tmp_path
):
    local = tmp_path / "v.mp4"
    local.write_bytes(b"x" * 1000)
    with SftpConnection(target(sshd)) as conn, pytest.raises(OSError, match="size"):
        upload_file(conn.channel(), local, str(remote_dir / "v.mp4"), expected_size=999)
    assert not (remote_dir / "v.mp4").exists()


def kill_when_partial(sshd: SshdInstance, partial: Path, min_bytes: int = 1) -> threading.Thread:
    """Kill sshd as soon as `partial` exists with at least `min_bytes` in it."""

    def watch():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if partial.stat().st_size >= min_bytes:
                    sshd.kill()
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sshd_killed_mid_transfer_leaves_nothing_under_the_final_name(tmp_path):
    local = tmp_path / "big.mp4"
    local.write_bytes(os.urandom(40 * 1024 * 1024))
    with SshdInstance() as sshd:
        final = Path(sshd.root) / "big.mp4"
        watcher = kill_when_partial(sshd, Path(temp_path(str(final))), min_bytes=1024 * 1024)
        conn = SftpConnection(target(sshd))
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            upload_file(conn.channel(), local, str(final))
        watcher.join()
        assert not sshd.running
        assert not final.exists()
        partial = Path(temp_path(str(final)))
        assert 0 < partial.stat().st_size < local.stat().st_size

        sshd.start()
        upload_file(conn.channel(), local, str(final))  # reconnects by itself
        assert final.read_bytes() == local.read_bytes()
        assert not partial.exists()  # the stale temp was overwritten and renamed
        conn.close()


def test_hashed_known_hosts_entries_are_understood(sshd, tmp_path):
    hashed = tmp_path / "known_hosts"
    hashed.write_text(Path(sshd.known_hosts_path).read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert hashed.read_text().startswith("|1|")
    with SftpConnection(target(sshd, known_hosts_path=str(hashed))) as conn:
        assert conn.alive
