"""`DataUploader`: seed 001's Module C, usable on its own or from Prefect.

    uploader = DataUploader(config)      # the seed's dict ({"uploader": {...}})
    uploader.run()                       # main loop: scan, process each job, sleep
    report = uploader.run_once()         # one scan-and-upload pass

Each job goes through the seed's phases one after another (`_process_job`); jobs run in
`concurrency` lanes sharing one SSH connection and one database session. Every failure
is caught per job: its files stay in `pending_upload/` and the next scan retries it.
The Prefect flow (flows/event_upload.py) runs the same phases as tasks.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from camfleet.uploader import phases
from camfleet.uploader.config import UploaderConfig
from camfleet.uploader.jobs import Job, ScanResult
from camfleet.uploader.phases import Ledger, Phase
from camfleet.uploader.scan import finish_reconcile, scan_pending
from camfleet.uploader.session import EventSession
from camfleet.uploader.sftp import REFUSALS, SftpConnection

log = logging.getLogger("camfleet.uploader")


@dataclass
class RunReport:
    """What one pass did: counts per final state, and one row per job."""

    counts: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, state: str) -> int:
        return self.counts.get(state, 0)


def scan(config: UploaderConfig, sftp_dirs: tuple[str, str], ledger: Ledger) -> ScanResult:
    """Scan, set rejected packages aside, finish interrupted moves; returns the scan."""
    for d in (config.pending_dir, config.uploaded_dir):
        d.mkdir(parents=True, exist_ok=True)
    result = scan_pending(
        config.pending_dir,
        config.uploaded_dir,
        *sftp_dirs,
        settle_seconds=config.settle_seconds,
        orphan_seconds=config.orphan_seconds,
        max_jobs=config.max_jobs_per_run,
    )
    for wait in result.waiting:
        log.info("%s: waiting (%s)", wait.json_name, wait.reason)
        ledger.finish(wait.json_name, phases.WAITING, wait.reason, wait.event_id)
    for reject in result.rejected:
        phases.set_aside(reject, config.pending_dir, config.failed_dir)
        ledger.reject(reject)
    for item in result.reconciled:
        finish_reconcile(item, config.pending_dir, config.uploaded_dir)
        ledger.finish(
            item.json_name, phases.ARCHIVED, "finished an interrupted move", item.event_id
        )
    return result


class DataUploader:
    """Upload event packages (video + JSON) over SFTP and record them in PostgreSQL."""

    def __init__(self, config: dict[str, Any] | UploaderConfig):
        self.config = (
            config if isinstance(config, UploaderConfig) else UploaderConfig.from_dict(config)
        )
        self.sftp_server = self.config.sftp_server()
        self._dsn = self.config.database_dsn()
        self._connection = SftpConnection(self.sftp_server)
        self._stop = threading.Event()

    # ---- the seed's main loop -----------------------------------------------------

    def run(self, max_runs: int | None = None) -> None:
        """Scan, process every job, sleep `scan_interval_seconds`; until stop()."""
        log.info("DataUploader started: %s", self.config.describe())
        runs = 0
        try:
            while not self._stop.is_set():
                try:
                    report = self.run_once()
                    if report.rows:
                        log.info("scan done in %.2fs: %s", report.seconds, report.counts)
                except Exception as exc:  # the loop must survive anything
                    log.error("scan failed: %s", phases.describe_error(exc))
                runs += 1
                if max_runs is not None and runs >= max_runs:
                    break
                self._stop.wait(self.config.scan_interval_seconds)
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._connection.close()

    # ---- one pass -----------------------------------------------------------------

    def run_once(self) -> RunReport:
        started = time.monotonic()
        ledger = Ledger()
        self._connection.forget_refusal()
        result = scan(self.config, self._remote_dirs(), ledger)
        session = EventSession(self._dsn)  # connects only when there is something to write
        try:
            if result.ready:
                self._process_all(result.ready, session, ledger)
            phases.record_outcomes(session, ledger)
        finally:
            session.close()
        return RunReport(ledger.counts(), ledger.rows(), time.monotonic() - started)

    def _remote_dirs(self) -> tuple[str, str]:
        return self.sftp_server.remote_video_dir, self.sftp_server.remote_json_dir

    def _process_all(self, jobs: list[Job], session: EventSession, ledger: Ledger) -> None:
        try:
            claimed = phases.claim_phase(session, jobs, self.config.pending_dir, ledger)
        except Exception as exc:
            ledger.fail_open(jobs, Phase.CLAIM, phases.describe_error(exc))
            log.error(
                "database unavailable, %d jobs left for the next scan: %s",
                len(jobs),
                phases.describe_error(exc),
            )
            return
        if claimed and self._refused_before_any_insert(claimed, ledger):
            return
        lanes = phases.split_lanes(claimed, self.config.concurrency)
        if len(lanes) <= 1:
            for lane in lanes:
                self._run_lane(lane, session, ledger)
        else:
            with ThreadPoolExecutor(len(lanes), thread_name_prefix="uploader-lane") as ex:
                list(ex.map(lambda lane: self._run_lane(lane, session, ledger), lanes))
        claimed_names = {j.json_name for j in claimed}
        for reject in ledger.rejects:
            if reject.json_name in claimed_names:  # found by a phase, not by the scan
                phases.set_aside(reject, self.config.pending_dir, self.config.failed_dir)

    def _refused_before_any_insert(self, jobs: list[Job], ledger: Ledger) -> bool:
        """Dial the SFTP server once before the first INSERT. A refusal (host key, our
        key) ends the run here: every job fails with the reason and stays for the next
        run. Any other error is left to the jobs, which retry per job as before."""
        try:
            self._connection.connect()
        except REFUSALS as exc:
            reason = phases.describe_error(exc)
            ledger.fail_open(jobs, Phase.UPLOAD, reason)
            log.error(
                "%s refused the connection; run stopped, %d events left: %s",
                self._connection.describe(),
                len(jobs),
                reason,
            )
            return True
        except Exception:  # noqa: S110 - transient: the lanes retry per job
            pass
        return False

    def _run_lane(self, jobs: list[Job], session: EventSession, ledger: Ledger) -> None:
        lane = _Lane(self._connection)
        try:
            for job in jobs:
                if self._connection.refused is not None:
                    # Refused mid-run (a reconnect met another key): stop, don't redial.
                    reason = phases.describe_error(self._connection.refused)
                    ledger.fail_open([job], Phase.UPLOAD, reason)
                    continue
                self._process_job(job, session, ledger, lane)
        finally:
            lane.close()

    def _process_job(
        self, job: Job, session: EventSession, ledger: Ledger, lane: _Lane | None = None
    ) -> None:
        """The seed's `_process_job`: INSERT, SFTP video + JSON, UPDATE, move. Never raises."""
        cfg = self.config
        lane = lane or _Lane(self._connection)
        phase = Phase.INSERT
        try:
            to_upload, done_before = phases.insert_phase(session, [job], ledger)
            phase = Phase.UPLOAD
            uploaded = []
            if to_upload:
                uploaded = phases.upload_phase(
                    self._connection,
                    to_upload,
                    cfg.pending_dir,
                    ledger,
                    client=lane.client(),
                    holds=session.holds,
                )
            phase = Phase.UPDATE
            completed = phases.update_phase(session, uploaded, ledger) + done_before
            phase = Phase.MOVE
            phases.move_phase(completed, cfg.pending_dir, cfg.uploaded_dir, ledger)
        except Exception as exc:
            if phase == Phase.UPLOAD:
                lane.close()  # the channel may be dead: the next job opens a new one
            reason = phases.describe_error(exc)
            ledger.fail_open([job], phase, reason)
            log.error(
                "event %s: %s failed, will retry on the next scan: %s",
                job.event_id,
                phase.name.lower(),
                reason,
            )


class _Lane:
    """One SFTP channel kept across a lane's jobs (reopened after a failure)."""

    def __init__(self, connection: SftpConnection):
        self._connection = connection
        self._client = None

    def client(self):
        if self._client is None or self._client.get_channel().closed:
            self._client = self._connection.channel()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: S110 - closing a dead channel
                pass
            self._client = None
