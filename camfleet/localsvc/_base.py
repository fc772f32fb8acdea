"""Process management shared by every local service.

Each service runs as a child process in its own session (so its process group id is
its pid), logs to a file in its private temp directory and is waited on until it
really answers. Stopping signals the process group and every descendant, because
some servers (sshd, the Prefect CLI) put their children in new sessions.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import psutil

LOOPBACK = "127.0.0.1"

# Ports handed out by free_port() in this process; never handed out twice, so two
# instances created back to back before either binds cannot collide with each other.
_given_ports: set[int] = set()
_given_ports_lock = threading.Lock()

# Lowest port free_port() picks: above the registered ports of common local daemons
# (PostgreSQL 5432, Redis 6379, 8000-8080 dev servers...).
PORT_RANGE_START = 20000

# How many log lines a start failure shows: enough for a stack trace or a config error,
# short enough to read in a pytest report.
LOG_TAIL_LINES = 40

# Grace period between the polite signal and SIGKILL on stop(); PostgreSQL's fast
# shutdown and Prefect's uvicorn shutdown finish well inside it.
STOP_TIMEOUT_S = 15.0


class ServiceStartError(RuntimeError):
    """A local service did not become ready; the message carries its log tail."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux default


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now and not handed out before by us.

    Chosen below the kernel's ephemeral range: outgoing connections take their local
    port from that range, so a port inside it could be grabbed by some client while a
    service is down for restart() (or a client reconnecting to 127.0.0.1:P could even
    connect to itself). Falls back to a kernel-chosen port if there is no room below.
    """
    low, _ = _ephemeral_range()
    lowest = min(PORT_RANGE_START, low)
    for _ in range(200):
        if low - lowest >= 1000:
            port = random.randrange(lowest, low)
            if not _bindable(host, port):
                continue
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        with _given_ports_lock:
            if port not in _given_ports:
                _given_ports.add(port)
                return port
    raise RuntimeError("could not find a free TCP port")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run_command(
    args: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,  # noqa: A002 - same name as subprocess.run
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command-line tool with a timeout, capturing stdout and stderr as text.

    With check=True a non-zero exit raises CalledProcessError whose message includes
    both streams (pytest then shows what the tool said).
    """
    full_env = None if env is None else {**os.environ, **env}
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
        input=input,
        check=False,
    )
    if check and result.returncode != 0:
        raise CommandError(result)
    return result


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose str() shows the captured output."""

    def __init__(self, result: subprocess.CompletedProcess[str]):
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def _dead(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still alive after `timeout`.

    A zombie counts as gone: it holds no ports or files any more, and orphans are
    reaped by PID 1, which in containers can take a second or more.
    """
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _dead(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if not _dead(p)]
    return alive


def _tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:]) or "(log is empty)"


# Every instance not yet closed: at interpreter exit their processes are stopped and
# their temp directories removed, even when the owner forgot or crashed.
_live: set[LocalService] = set()
_live_lock = threading.Lock()


@atexit.register
def _cleanup_all() -> None:
    with _live_lock:
        services = list(_live)
    for svc in services:
        with contextlib.suppress(Exception):
            svc.close()


class LocalService:
    """Base class: a server process on a loopback port with a private work directory.

    Subclasses set `name`, implement `_prepare()` (one-time files), `_command()` and
    `_is_ready()`, and may override `_env()`, `_popen_user()` and the stop signal.
    """

    name = "service"
    start_timeout_s = 30.0
    # Signal for a graceful stop, and whether it goes to the whole process group or
    # only to the main process (PostgreSQL's postmaster coordinates its children).
    stop_signal = signal.SIGTERM
    stop_signal_group = True

    def __init__(self, port: int | None = None, workdir: str | os.PathLike[str] | None = None):
        self.host = LOOPBACK
        self.port = port if port is not None else free_port()
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"camfleet-{self.name}-"))
            self._owns_workdir = True
        else:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._owns_workdir = False
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._prepared = False
        self._closed = False
        with _live_lock:
            _live.add(self)

    # ---- subclass hooks -------------------------------------------------------------

    def _prepare(self) -> None:
        """Create config files, keys, data directories. Called once, before first start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _popen_user(self) -> dict[str, object]:
        """Extra Popen kwargs (user/group) when the service must not run as us."""
        return {}

    def _cwd(self) -> Path:
        return self.workdir

    def _is_ready(self) -> bool:
        return port_open(self.host, self.port)

    # ---- lifecycle -----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self._closed:
            raise RuntimeError(f"{self.name} instance was closed")
        if self.running:
            return self
        if not self._prepared:
            self._prepare()
            self._prepared = True
        if port_open(self.host, self.port, timeout=0.2):
            raise ServiceStartError(
                f"{self.name}: port {self.host}:{self.port} is already in use by another process"
            )
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"--- camfleet: starting {self.name} at {time.ctime()} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self._cwd(),
                start_new_session=True,
                **self._popen_user(),  # type: ignore[arg-type]
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.02
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                self._finish(self.processes())  # whatever it forked before dying
                raise ServiceStartError(
                    f"{self.name} exited with code {code} while starting "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            try:
                if self._is_ready():
                    return
            except Exception:  # noqa: S110 - not ready yet, keep polling
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.kill()
                raise ServiceStartError(
                    f"{self.name} not ready on {self.host}:{self.port} after "
                    f"{self.start_timeout_s:.0f}s (log {self.log_path}):\n{tail}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines logged since the latest start."""
        return _tail(self.log_path, self._log_offset, lines)

    def processes(self) -> list[psutil.Process]:
        """The main process, everything in its process group, and all descendants."""
        if self._proc is None:
            return []
        found: dict[int, psutil.Process] = {}
        try:
            main = psutil.Process(self._proc.pid)
            found[main.pid] = main
            for child in main.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
        pgid = self._proc.pid
        for p in psutil.process_iter():
            try:
                if p.pid not in found and os.getpgid(p.pid) == pgid:
                    found[p.pid] = p
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return list(found.values())

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop: polite signal, wait, then SIGKILL whatever is left. Keeps data."""
        if self._proc is None:
            return
        family = self.processes()
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.stop_signal_group:
                    os.killpg(self._proc.pid, self.stop_signal)
                else:
                    self._proc.send_signal(self.stop_signal)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        alive = wait_gone(family, timeout=min(timeout, 5.0))
        self._finish(alive)

    def kill(self) -> None:
        """SIGKILL the service and all its processes at once (simulates a crash)."""
        if self._proc is None:
            return
        self._finish(self.processes())

    def _finish(self, alive: list[psutil.Process]) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        wait_gone(alive, timeout=5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5.0)
        self._proc = None

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port with the same data."""
        self.stop()
        return self.start()

    def close(self, graceful: bool = True) -> None:
        """Stop and remove the private work directory if we created it."""
        if graceful:
            self.stop()
        else:
            self.kill()
        self._closed = True
        with _live_lock:
            _live.discard(self)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"
