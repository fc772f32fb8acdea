"""Prefect task over the SFTP adapter (camfleet/uploader/sftp.py): phase 2 of a lane.

The adapter itself (host-key checks, safe writes, tuning) imports nothing of Prefect;
this module only adds retries and run logging around `phases.upload_phase`.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from camfleet.uploader import phases
from camfleet.uploader.sftp import REFUSALS, SftpConnection

__all__ = ["SftpConnection", "upload_lane"]

# ---- Prefect task (flows/event_upload.py) --------------------------------------------


# 2 s, 4 s, 8 s: an sshd restart or a network blip is over by then; the connection is
# re-established by the retry. A longer outage is the next scheduled run's business.
SFTP_RETRIES = 3
SFTP_RETRY_DELAYS = exponential_backoff(backoff_factor=2)


def retry_unless_refused(task, task_run, state) -> bool:
    """No retry after a refused host key or client key: the connection remembers the
    refusal and would only raise it again, after 14 s of backoff."""
    return not isinstance(getattr(state, "data", None), REFUSALS)


@task(
    name="upload over sftp",
    retries=SFTP_RETRIES,
    retry_delay_seconds=SFTP_RETRY_DELAYS,
    retry_condition_fn=retry_unless_refused,
    cache_policy=NO_CACHE,
)
def upload_lane(connection: SftpConnection, jobs, pending_dir, ledger, holds=None):
    """Phase 2 for one lane of jobs: video then JSON each, on one SFTP channel.

    A retry reconnects and skips what this lane already uploaded. `holds(event_id)`:
    whether the run still holds the event's lock (checked before each rename).
    """
    logger = get_run_logger()
    uploaded = phases.upload_phase(connection, jobs, pending_dir, ledger, logger, holds=holds)
    logger.info("uploaded %d of %d events to %s", len(uploaded), len(jobs), connection.describe())
    return uploaded
