"""One batch transaction, phase by phase, and a driver that drains the image repo.

The phases (`request_urls`, `upload_files`, `await_verifications`) are what the
Prefect flow's tasks call; `EdgeUploader.drain` runs them back to back for the CLI's
`--no-prefect` mode and the benchmark, optionally several batches in parallel
("lanes", each with its own MQTT session, so answers need no dispatcher: every lane
ignores what is not its own request).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from camfleet.edge import files as edge_files
from camfleet.edge.link import EdgeLink, LinkError
from camfleet.edge.upload import UploadExpired, http_client, post_file
from camfleet.protocol import edge_batch as eb

log = logging.getLogger("camfleet.edge")

# Parallel POSTs within one batch: the seed's batch of 5 goes up at once; more would
# only queue on a device's single uplink.
UPLOAD_WORKERS = 5

# POST attempts per file with the same URL before the batch leaves it for the next run,
# one second apart (then two): long enough for a dropped Wi-Fi/cellular link to come
# back, short enough to stay well inside the URL's lifetime.
UPLOAD_ATTEMPTS = 3
UPLOAD_RETRY_DELAY_S = 1.0


class BatchFailed(RuntimeError):
    """A phase could not finish (no answer, broker gone); the files stay buffered."""


def _dispatch(batch: eb.DeviceBatch, link: EdgeLink, message, buffer_dir: Path) -> list:
    topic, payload = message
    if topic == link.urls_topic:
        return batch.on_answer(payload) or []
    if topic == link.verified_topic:
        for action in batch.on_verification(payload):
            edge_files.delete_verified(buffer_dir, action.name)
            batch.on_deleted(action.name)
    return []


def request_urls(
    batch: eb.DeviceBatch,
    link: EdgeLink,
    buffer_dir: Path,
    url_timeout: float = eb.URL_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Ask for URLs for every file still without one; wait for the answer.

    Returns how many files got a URL; raises BatchFailed when none came in time (the
    caller retries, which asks again with the same request-id).
    """
    if not batch.needs_urls():
        return 0
    link.publish_request(batch.request(clock(), url_timeout))
    got = 0
    while batch.waiting_for_urls():
        remaining = batch.url_deadline - clock()
        if remaining <= 0:
            break
        message = link.next(remaining)
        if message is not None:
            got += len(_dispatch(batch, link, message, buffer_dir))
    if batch.waiting_for_urls():
        raise BatchFailed(f"no answer to request {batch.request_id} within {url_timeout:g} s")
    return got


def upload_files(
    batch: eb.DeviceBatch, buffer_dir: Path, http=None, pool: ThreadPoolExecutor | None = None
) -> int:
    """POST every file that has a URL; returns how many were uploaded.

    A 4xx (expired URL) puts the file back to be requested again; other failures are
    retried UPLOAD_ATTEMPTS times with the same URL. `http` and `pool` are reused
    across batches when given (a client loads the CA bundle once, ~50 ms of CPU).
    """
    own_client = http is None
    http = http or http_client()
    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="edge-upload")
    urls: dict[str, eb.Upload] = batch.uploads
    done = 0
    try:
        for attempt in range(UPLOAD_ATTEMPTS):
            todo = [urls[n] for n in batch.to_upload() if n in urls]
            if not todo:
                break
            if attempt:
                time.sleep(UPLOAD_RETRY_DELAY_S * attempt)

            def one(upload: eb.Upload):
                try:
                    post_file(http, upload, buffer_dir)
                    return upload.name, "ok", ""
                except UploadExpired as exc:
                    return upload.name, "expired", str(exc)
                except Exception as exc:  # network: retry with the same URL
                    return upload.name, "error", type(exc).__name__

            results = list(pool.map(one, todo))
            for name, outcome, reason in results:
                if outcome == "ok":
                    batch.on_uploaded(name, True)
                    done += 1
                elif outcome == "expired":
                    batch.on_url_refused(name, reason)
                else:
                    batch.on_uploaded(name, False, reason)
    finally:
        if own_client:
            http.close()
        if own_pool:
            pool.shutdown()
    return done


def await_verifications(
    batch: eb.DeviceBatch,
    link: EdgeLink,
    buffer_dir: Path,
    verify_timeout: float = eb.VERIFY_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Collect {"file"} messages, deleting each verified file; returns how many."""
    batch.start_verify_clock(clock(), verify_timeout)
    while batch.waiting_for_verification():
        remaining = batch.verify_deadline - clock()
        if remaining <= 0:
            break
        message = link.next(remaining)
        if message is not None:
            _dispatch(batch, link, message, buffer_dir)
    # Drain anything already delivered without waiting.
    while (message := link.next(0)) is not None:
        _dispatch(batch, link, message, buffer_dir)
    batch.give_up_verification()
    return batch.count(eb.FileState.DELETED)


def send(
    batch: eb.DeviceBatch,
    link: EdgeLink,
    buffer_dir: Path,
    http=None,
    pool: ThreadPoolExecutor | None = None,
    url_timeout: float = eb.URL_TIMEOUT_S,
    attempts: int = eb.URL_ATTEMPTS,
) -> None:
    """Ask for URLs (up to `attempts` times) and upload, until every file has gone up
    or is given up for this run; files whose URL the store refused are asked for again."""
    for _ in range(attempts):
        if not batch.needs_urls():
            break
        try:
            request_urls(batch, link, buffer_dir, url_timeout)
        except (BatchFailed, LinkError) as exc:
            log.info("edge: %s", exc)
            continue
        upload_files(batch, buffer_dir, http, pool)
    batch.give_up_urls()
    batch.give_up_uploads()


def run_batch(
    batch: eb.DeviceBatch,
    link: EdgeLink,
    buffer_dir: Path,
    http=None,
    pool: ThreadPoolExecutor | None = None,
    url_timeout: float = eb.URL_TIMEOUT_S,
    verify_timeout: float = eb.VERIFY_TIMEOUT_S,
) -> dict:
    """The whole transaction for one batch; its summary. Never raises for the files."""
    send(batch, link, buffer_dir, http, pool, url_timeout)
    await_verifications(batch, link, buffer_dir, verify_timeout)
    return batch.summary()


class EdgeUploader:
    """Drains the repo through the buffer, batch after batch, without Prefect
    (`camfleet edge run --no-prefect`, `camfleet simulate edge`, the benchmark)."""

    def __init__(self, config, broker=None, lanes: int = 1, min_age_s: float | None = None):
        self.config = config
        self.broker = broker or config.broker()
        self.lanes = lanes
        self.min_age_s = edge_files.MIN_FILE_AGE_S if min_age_s is None else min_age_s
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

    def next_batch(self) -> eb.DeviceBatch | None:
        with self._lock:
            files = edge_files.take_batch(
                self.config.repo_dir,
                self.config.buffer_dir,
                self.config.batch_size,
                exclude=self._claimed,
                min_age_s=self.min_age_s,
            )
            if not files:
                return None
            self._claimed.update(f.name for f in files)
        return eb.DeviceBatch(self.config.serial, self.config.bucket_name, files)

    def _release(self, batch: eb.DeviceBatch) -> None:
        with self._lock:
            self._claimed.difference_update(f.name for f in batch.files)

    def _lane(self, max_batches: int | None, summaries: list, stop: threading.Event) -> None:
        try:
            link = EdgeLink(self.broker, self.config.serial, self.config.topics).connect()
        except LinkError as exc:
            log.warning("edge: %s; files stay buffered for the next run", exc)
            stop.set()
            return
        http = http_client()
        pool = ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="edge-upload")
        try:
            while not stop.is_set():
                if max_batches is not None and len(summaries) >= max_batches:
                    return
                batch = self.next_batch()
                if batch is None:
                    return
                try:
                    summary = run_batch(batch, link, self.config.buffer_dir, http, pool)
                finally:
                    self._release(batch)
                summaries.append(summary)
                if summary["deleted"] == 0:
                    # Nothing got through: the cloud or the store is down. Stop this run;
                    # the files stay buffered for the next one.
                    stop.set()
        finally:
            pool.shutdown()
            http.close()
            link.close()

    def drain(self, max_batches: int | None = None) -> list[dict]:
        """Run batches until the repo and buffer are empty (or nothing gets through)."""
        summaries: list[dict] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._lane, args=(max_batches, summaries, stop))
            for _ in range(self.lanes)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return summaries
