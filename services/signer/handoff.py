"""The Prefect hand-off: new captures go to a flow run in batches, on their own thread.

Nothing in the signer waits on Prefect: a hand-off that fails is logged and the
captures stay stored and recorded (without a flow run id); the backlog is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from camfleet import db

log = logging.getLogger("camfleet.signer")

# Verified captures waiting for a Prefect hand-off while Prefect is down: beyond this
# the oldest are not handed off (they are stored and recorded regardless; counted).
MAX_HANDOFF_BACKLOG = 10_000

# Hand verified captures to Prefect in batches: at most this many per flow run, and no
# capture waits longer than HANDOFF_MAX_WAIT_S (one flow run per file would cost the
# Prefect server ~40 ms of CPU per image, see DESIGN.md).
HANDOFF_BATCH = 200
HANDOFF_MAX_WAIT_S = 5.0


class Handoff:
    """Collects new captures and hands them to a Prefect flow run in batches."""

    def __init__(self, run: Callable[[list[dict]], str | None], pool: db.Pool) -> None:
        self._run = run
        self._pool = pool
        self._items: list[dict] = []
        self._first_at: float | None = None
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="edge-handoff", daemon=True)
        self.flow_runs: list[str] = []
        self.dropped = 0
        self.stamp_failed = 0  # captures handed off whose rows did not get the run id
        self._retry_at = 0.0  # after a failed hand-off, not before this

    def start(self) -> None:
        self._thread.start()

    def add(self, captures: list[dict]) -> None:
        if not captures:
            return
        with self._lock:
            if not self._items:
                self._first_at = time.monotonic()
            self._items.extend(captures)
            over = len(self._items) - MAX_HANDOFF_BACKLOG
            if over > 0:  # Prefect down for long: stored captures, just not handed off
                del self._items[:over]
                self.dropped += over
                log.warning("signer: hand-off backlog full; %d captures not handed off", over)
            self._lock.notify()

    def backlog(self) -> int:
        with self._lock:
            return len(self._items)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(30)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._ready():
                    wait = None
                    if self._first_at is not None:
                        wait = max(0.0, self._first_at + HANDOFF_MAX_WAIT_S - time.monotonic())
                    self._lock.wait(wait)
                batch, self._items = self._items[:HANDOFF_BATCH], self._items[HANDOFF_BATCH:]
                self._first_at = time.monotonic() if self._items else None
                stopping = self._stop
            handed = self._hand(batch) if batch else True
            if stopping and (not self._items or not handed):  # Prefect down at stop: no loop
                return

    def _ready(self) -> bool:
        if not self._items or time.monotonic() < self._retry_at:
            return False
        waited = time.monotonic() - (self._first_at or time.monotonic())
        return len(self._items) >= HANDOFF_BATCH or waited >= HANDOFF_MAX_WAIT_S

    def _hand(self, batch: list[dict]) -> bool:
        try:
            flow_run_id = self._run(batch)
        except Exception as exc:  # Prefect unreachable: the captures are stored regardless
            log.warning("signer: post-processing hand-off failed: %s", type(exc).__name__)
            with self._lock:  # tried again later, within the bounded backlog (counted)
                self._items[:0] = batch
                over = len(self._items) - MAX_HANDOFF_BACKLOG
                if over > 0:
                    del self._items[:over]
                    self.dropped += over
                self._first_at = time.monotonic()
                self._retry_at = self._first_at + HANDOFF_MAX_WAIT_S
            return False
        if flow_run_id:
            self.flow_runs.append(flow_run_id)
            try:
                with self._pool.connection() as conn:
                    db.queries.edge_captures_set_flow_run(
                        conn, flow_run_id=flow_run_id, record_ids=[c["record_id"] for c in batch]
                    )
            except Exception as exc:  # the run has them: only its id is missing on the rows
                self.stamp_failed += len(batch)
                log.warning("signer: flow run id not stamped on captures: %s", type(exc).__name__)
        return True

    def alive(self) -> bool:
        """The hand-off thread runs (or was never started, or was stopped)."""
        return self._stop or not self._thread.ident or self._thread.is_alive()
