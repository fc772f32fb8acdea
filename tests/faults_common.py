"""What the fault suites share: polling (the services they watch have no events) and
child processes that can be SIGKILLed and started again."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# A child (Python importing Prefect, boto3...) can take this long to start on a busy box.
START_WAIT_S = 60.0


def wait_until(fn, timeout: float, step: float = 0.1):
    """fn's first truthy value within `timeout` seconds, polled every `step`; else fn()."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := fn():
            return value
        time.sleep(step)
    return fn()


class ChildProcess:
    """A child process logging to a file, that can be SIGKILLed and started again."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        ready_line: str,
        stop_wait_s: float = 15.0,
    ):
        self.argv, self.env, self.log, self.ready_line = argv, env, log, ready_line
        self.stop_wait_s = stop_wait_s  # a clean stop finishes in-flight work; then SIGKILL
        self.p: subprocess.Popen | None = None
        self._offset = 0

    def start(self, timeout: float = START_WAIT_S) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting (two children then import in parallel)."""
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.p = subprocess.Popen(  # noqa: S603 - our own code, loopback only
                self.argv,
                env=self.env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = START_WAIT_S) -> None:
        def ready():
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.argv[1]} exited: {self.tail()}")
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                return self.ready_line.encode() in f.read()

        if not wait_until(ready, timeout, 0.05):
            raise RuntimeError(f"{self.argv[1]} not ready after {timeout:.0f} s: {self.tail()}")

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self) -> None:
        if self.p and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"
