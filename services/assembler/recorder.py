"""Recording flow runs (`mqtt-ingest-record`), entirely off the ACK path.

The ACK path (store, rows, ACK_OK) never waits on Prefect: ACKed captures are handed
to this recorder, which runs one `mqtt-ingest-record` flow every RECORD_INTERVAL_S on
its OWN thread and event loop ("inline") or in a child process ("process").  A frozen
or unreachable Prefect API therefore only delays the flow_run_id stamps.

Only when a Prefect API is configured (PREFECT_API_URL): a long-running service must
never start Prefect's temporary server inside itself (it competes for the CPU, times
out on a busy machine and is orphaned when the service is SIGKILLed).  Without one the
banner says so once and nothing is recorded.

The backlog is bounded (RECORD_BACKLOG captures): past it the oldest are dropped and
counted (stats["record_dropped"], one warning per RECORD_DROP_LOG_EVERY drops); they
are stored and ACKed, only their flow_run_id stays empty.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import signal
import threading
from collections import deque

from camfleet import db
from camfleet.commands import prefect_mode

log = logging.getLogger("camfleet.assembler")

RECORD_INTERVAL_S = 2.0
RECORD_MAX = 2000
# Prefect refuses flow-run parameters over 512 KiB serialized (422): a backlog after an
# outage is recorded in runs that stay below this, never in one refused run
RECORD_MAX_BYTES = 384 * 1024
RECORD_ATTEMPTS = 5
RECORD_BACKLOG = 20_000
RECORD_DROP_LOG_EVERY = 1000


def prefect_api_configured() -> str | None:
    """The configured Prefect API URL, or None (then no flow run may be started: it
    would start a temporary server inside this process)."""
    return prefect_mode.api_url()


class Recorder:
    def __init__(self, mode: str, storage_url: str, database_url: str, stats: dict,
                 backlog: int = RECORD_BACKLOG, interval: float = RECORD_INTERVAL_S):  # fmt: skip
        self.mode = mode
        self.storage_url = storage_url
        self.database_url = database_url
        self.stats = stats
        stats.setdefault("record_dropped", 0)
        stats.setdefault("recorded", 0)
        self.backlog = backlog
        self.interval = interval
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = None
        self._conn = None

    def add(self, record: dict) -> None:
        with self._lock:
            self._queue.append((record, 0))
            if len(self._queue) > self.backlog:
                self._queue.popleft()
                self.stats["record_dropped"] += 1
                if self.stats["record_dropped"] % RECORD_DROP_LOG_EVERY == 1:
                    log.warning(
                        "recording backlog full (%d captures): %d oldest dropped so far "
                        "(stored and ACKed, only their flow_run_id stays empty)",
                        self.backlog,
                        self.stats["record_dropped"],
                    )

    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="assembler-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._stop_process()

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        if self.mode == "process":  # warm the child up now (Prefect imports take seconds)
            await asyncio.to_thread(self._ensure_process)
        while not self._stop.is_set():
            await asyncio.to_thread(self._stop.wait, self.interval)
            if self._queue and not self._stop.is_set():
                await self._record_once()
        # the last captures get their run too (bounded: one try each batch)
        for _ in range(3):
            if not self._queue or not await self._record_once():
                break

    async def _record_once(self) -> bool:
        with self._lock:
            take, size = [], 0
            while self._queue and len(take) < RECORD_MAX:
                size += len(json.dumps(self._queue[0][0])) + 2
                if take and size > RECORD_MAX_BYTES:
                    break
                take.append(self._queue.popleft())
        if not take:
            return True
        records = [r for r, _ in take]
        try:
            if self.mode == "process":
                ok = await asyncio.to_thread(self._process_call, records)
            else:
                from flows.mqtt_ingest import mqtt_ingest_record

                state = await mqtt_ingest_record(records, return_state=True)
                ok = state.is_completed()
        except Exception:
            log.exception("recording flow run crashed")
            ok = False
        if ok:
            self.stats["recorded"] += len(records)
        else:
            retry = [(r, n + 1) for r, n in take if n + 1 < RECORD_ATTEMPTS]
            with self._lock:
                self._queue.extendleft(reversed(retry))
                self.stats["record_dropped"] += len(take) - len(retry)  # out of attempts
            log.warning("recording flow run failed for %d captures", len(records))
        return ok

    # -- "process": a child with its own Prefect client -----------------------------
    def _process_call(self, records: list[dict]) -> bool:
        self._ensure_process()
        self._conn.send(records)
        return bool(self._conn.recv())

    def _ensure_process(self) -> None:
        if self._proc is None or not self._proc.is_alive():
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_recorder_main,
                args=(child, self.storage_url, self.database_url),
                name="assembler-recorder",
                daemon=True,
            )
            proc.start()
            child.close()
            self._proc, self._conn = proc, parent

    def _stop_process(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()
        self._proc = None


def _recorder_main(conn, storage_url: str, database_url: str) -> None:
    """Child process: run one `mqtt-ingest-record` flow per list of records received."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from camfleet.storage import open_store
    from flows.mqtt_ingest import mqtt_ingest_record
    from tasks import mqtt as tm

    pool = db.Pool(database_url, maxconn=2)
    tm.set_context(
        tm.IngestContext(
            store=open_store(storage_url),
            pool=pool,
            publish=lambda topic, payload: None,
            on_error=lambda *a, **k: None,
        )
    )

    async def main() -> None:
        while True:
            records = await asyncio.to_thread(conn.recv)
            if records is None:
                return
            try:
                state = await mqtt_ingest_record(records, return_state=True)
                ok = state.is_completed()
            except Exception:
                log.exception("recording flow run crashed")
                ok = False
            conn.send(ok)

    try:
        asyncio.run(main())
    finally:
        pool.close()
