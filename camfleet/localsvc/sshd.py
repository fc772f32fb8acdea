"""A private OpenSSH sshd (SFTP via internal-sftp) on a loopback port.

Everything it needs is in its temp directory: its own ed25519 host key, a client
keypair (ed25519, plus RSA as `.client_rsa_key_path`) whose public halves are the only
authorized keys, and a `root/` directory that tests use as the remote base directory.
The login user is whoever runs the tests (root included: `PermitRootLogin
prohibit-password`, keys only).

sshd puts each connection's process in a new session, so stop()/kill() also end the
per-connection processes: killing sshd drops live SFTP sessions, as a crash would.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import socket
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ._base import LocalService

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
# sshd's privilege separation directory (Debian's compiled-in default); it must exist
# and be root-owned, not group/world writable, even when we never log in as anyone else.
PRIVSEP_DIR = Path("/run/sshd")
# RSA client key size: the smallest size current OpenSSH accepts without complaint.
RSA_CLIENT_KEY_BITS = 2048


def find_sshd() -> str:
    for candidate in SSHD_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError("sshd not found: install openssh-server")


def _write_private_key(path: Path, key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> str:
    """Write an OpenSSH-format private key (0600) and its .pub; return the public line."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = public.decode()
    Path(f"{path}.pub").write_text(line + "\n")
    return line


def openssh_fingerprint(public_line: str) -> str:
    """`SHA256:...` fingerprint of an OpenSSH public key line, as `ssh-keygen -lf` prints."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class SshdInstance(LocalService):
    """OpenSSH sshd on 127.0.0.1:port.

    Attributes: host, port, username, client_key_path, client_rsa_key_path,
    host_key_path, host_public_key (OpenSSH line), host_key_fingerprint ("SHA256:..."),
    known_hosts_path, root (remote base directory), config_path, log_path.
    """

    name = "sshd"

    def __init__(self, port: int | None = None):
        super().__init__(port=port)
        self.binary = find_sshd()
        self.username = pwd.getpwuid(os.geteuid()).pw_name
        self.config_path = self.workdir / "sshd_config"
        self.host_key_path = self.workdir / "ssh_host_ed25519_key"
        self.client_key_path = self.workdir / "id_ed25519"
        self.client_rsa_key_path = self.workdir / "id_rsa"
        self.authorized_keys_path = self.workdir / "authorized_keys"
        self.known_hosts_path = self.workdir / "known_hosts"
        self.pid_file = self.workdir / "sshd.pid"
        self.root = self.workdir / "root"
        # Keys exist from construction on so callers can read them before start().
        self.host_public_key = _write_private_key(
            self.host_key_path, ed25519.Ed25519PrivateKey.generate()
        )
        self.host_key_fingerprint = openssh_fingerprint(self.host_public_key)
        client_lines = [
            _write_private_key(self.client_key_path, ed25519.Ed25519PrivateKey.generate()),
            _write_private_key(
                self.client_rsa_key_path,
                rsa.generate_private_key(public_exponent=65537, key_size=RSA_CLIENT_KEY_BITS),
            ),
        ]
        self.authorized_keys_path.write_text("\n".join(client_lines) + "\n")
        os.chmod(self.authorized_keys_path, 0o600)
        self.known_hosts_path.write_text(f"[{self.host}]:{self.port} {self.host_public_key}\n")
        self.root.mkdir()

    def _prepare(self) -> None:
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.config_path.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {self.host_key_path}",
                    f"PidFile {self.pid_file}",
                    f"AuthorizedKeysFile {self.authorized_keys_path}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    f"AllowUsers {self.username}",
                    "UsePAM no",
                    "StrictModes no",
                    "UseDNS no",
                    "PrintMotd no",
                    "X11Forwarding no",
                    "AllowTcpForwarding no",
                    "AllowAgentForwarding no",
                    "PermitTTY no",
                    # Benchmarks open many sessions at once; the default 10:30:100 would
                    # start dropping unauthenticated connections.
                    "MaxStartups 200",
                    "MaxSessions 100",
                    "LogLevel VERBOSE",
                    "Subsystem sftp internal-sftp",
                ]
            )
            + "\n"
        )

    def _command(self) -> list[str]:
        return [self.binary, "-D", "-e", "-f", str(self.config_path)]

    def _is_ready(self) -> bool:
        # Listening is not enough to prove it is sshd (and not someone else on a reused
        # port): wait for the protocol banner.
        with socket.create_connection((self.host, self.port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-2.0-")
