"""Run camfleet's long-running processes side by side, restart a crashed one, stop all.

Used by `camfleet up`. Each child gets its own process group and log file; Ctrl-C
stops them in reverse start order (SIGTERM, then SIGKILL after a grace period), so no
stray process is left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("camfleet.up")

# A service that dies this soon after starting is broken, not unlucky: stop retrying
# fast and back off, so a misconfiguration does not spin the CPU.
MIN_HEALTHY_UPTIME_S = 10.0
MAX_RESTART_BACKOFF_S = 60.0
# Long enough for the assembler to finish in-flight stores on SIGTERM.
STOP_GRACE_S = 15.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    extra: dict = field(default_factory=dict)


class Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def names(self) -> list[str]:
        return [child.name for child in self.children]

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, env, self.log_dir / f"{name}.log")
        self.children.append(child)
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        with open(child.log_path, "ab") as out:
            child.proc = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **child.env},
                start_new_session=True,
            )
        child.started_at = time.monotonic()

    def poll(self) -> list[str]:
        """Restart children that exited; returns a line for each event worth telling."""
        events = []
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            if child.next_start == 0.0:
                uptime = now - child.started_at
                backoff = (
                    1.0
                    if uptime > MIN_HEALTHY_UPTIME_S
                    else min(MAX_RESTART_BACKOFF_S, 2.0 ** min(child.restarts + 1, 6))
                )
                child.next_start = now + backoff
                events.append(
                    f"{child.name} exited with code {child.proc.returncode}; "
                    f"restarting in {backoff:.0f} s (log: {child.log_path})"
                )
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                self._spawn(child)
        return events

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(child, signal.SIGKILL)
                child.proc.wait(timeout=5)
            # Anything the child left in its process group goes too.
            self._signal(child, signal.SIGKILL)

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        if child.proc is None:
            return
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
