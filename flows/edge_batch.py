"""The edge batch-upload transaction as a Prefect flow, run on the device (seed 000).

Each run drains the camera's `cameraImageRepo/` through `bufferStorage/` in batches of
five (the seed's move.py): for every batch it asks the cloud for presigned POSTs over
MQTT, uploads, waits for the cloud's per-file verification and deletes exactly the
verified files. Whatever is not verified stays in `bufferStorage/` and is the first
batch of the next run. Serve it with an interval schedule on the device:

    camfleet edge serve --config /etc/entomologist/ento.conf --interval 60

Two task runs per batch of five (`send-batch`, `await-verifications`) plus one
progress artifact: a central Prefect server pays ~40 ms of CPU per task run, so a
fleet reporting to one costs it ~16 ms per image, not one task run per image.

A run that finds both directories empty (most scheduled runs of a quiet camera) ends
at once: no broker connection, no task run, no artifact, only the flow run itself
(docs/prefect.md, "Idle runs", has the measured cost).

`edge_uploads_received` is the cloud side's post-processing flow: the signer hands it
the captures it verified, in batches (never one run per file).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_table_artifact, create_progress_artifact
from prefect.cache_policies import NO_CACHE

from camfleet.edge import files as edge_files
from camfleet.edge.config import DEFAULT_CONFIG_PATH, EdgeConfig, load_ento_conf
from camfleet.edge.link import EdgeLink
from camfleet.edge.upload import http_client
from camfleet.edge.uploader import await_verifications, send
from camfleet.protocol import edge_batch as eb

# Batches per run: a run that drains a backlog of 100 images should still end, so the
# next scheduled run (and its fresh MQTT session) takes over; the schedule catches up.
MAX_BATCHES_PER_RUN = 20


@task(name="connect-to-broker", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def connect_to_broker(config: EdgeConfig, mqtt_block: str | None) -> EdgeLink:
    """Subscribe to this device's answer and verification topics before asking."""
    broker = config.broker()
    if mqtt_block:
        from blocks.mqtt import MqttBroker

        broker = MqttBroker.load(mqtt_block)
    return EdgeLink(broker, config.serial, config.topics).connect()


@task(name="send-batch", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def send_batch(
    config: EdgeConfig, link: EdgeLink, http, min_age_s: float, url_timeout_s: float
) -> eb.DeviceBatch | None:
    """Move a batch into the buffer, ask for its presigned POSTs, upload the files.

    Buffered leftovers come first, so a retry of this task takes the same files. The
    answer is awaited URL_ATTEMPTS times; a URL the store refuses (expired) sends its
    file back for a new one; each POST is tried UPLOAD_ATTEMPTS times.
    """
    files = edge_files.take_batch(
        config.repo_dir, config.buffer_dir, config.batch_size, min_age_s=min_age_s
    )
    if not files:
        return None
    batch = eb.DeviceBatch(config.serial, config.bucket_name, files)
    send(batch, link, config.buffer_dir, http, url_timeout=url_timeout_s)
    return batch


@task(name="await-verifications", cache_policy=NO_CACHE)
def await_verification_and_delete(
    batch: eb.DeviceBatch, link: EdgeLink, buffer_dir: Path, verify_timeout_s: float
) -> int:
    """Delete each file as its {"file"} verification arrives; the rest stay buffered."""
    return await_verifications(batch, link, buffer_dir, verify_timeout_s)


def has_work(config: EdgeConfig, min_age_s: float = edge_files.MIN_FILE_AGE_S) -> bool:
    """Whether a run would upload anything: a file left in the buffer, or one in the
    camera's repo at least `min_age_s` old.  Only `os.scandir` (no hashing, no moves),
    so a quiet camera's scheduled run costs a directory listing, not a broker session."""
    now = time.time()
    for directory, min_age in ((config.buffer_dir, 0.0), (config.repo_dir, min_age_s)):
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime >= min_age:
                        return True
                except FileNotFoundError:
                    continue
    return False


def _progress(batch: eb.DeviceBatch, number: int) -> None:
    summary = batch.summary()
    left = summary["reasons"]
    create_progress_artifact(
        progress=100.0 * summary["deleted"] / max(1, summary["files"]),
        key="edge-batch-" + re.sub(r"[^a-z0-9-]", "-", batch.serial.lower()),
        description=(
            f"batch {number}: {summary['deleted']}/{summary['files']} verified and deleted"
            + (f"; left for the next run: {left}" if left else "")
        ),
    )


@flow(name="edge-batch-upload")
def edge_batch_upload(
    config_path: str = DEFAULT_CONFIG_PATH,
    mqtt_block: str | None = None,
    max_batches: int = MAX_BATCHES_PER_RUN,
    url_timeout_s: float = eb.URL_TIMEOUT_S,
    verify_timeout_s: float = eb.VERIFY_TIMEOUT_S,
    min_age_s: float = edge_files.MIN_FILE_AGE_S,
) -> list[dict]:
    """Move, request, upload, verify, delete: batch after batch until the repo is empty."""
    logger = get_run_logger()
    config = load_ento_conf(config_path)
    if not has_work(config, min_age_s):
        # Checked before the broker and before any task run: an idle run costs the
        # Prefect server one flow run (its states), nothing else.
        logger.debug("nothing to upload")
        return []
    link = connect_to_broker(config, mqtt_block)
    http = http_client()  # one client per run: TLS setup once, connections reused
    summaries: list[dict] = []
    try:
        for number in range(1, max_batches + 1):
            batch = send_batch(config, link, http, min_age_s, url_timeout_s)
            if batch is None:
                break  # cameraImageRepo/ and bufferStorage/ are empty
            await_verification_and_delete(batch, link, config.buffer_dir, verify_timeout_s)
            _progress(batch, number)
            summary = batch.summary()
            summaries.append(summary)
            logger.info(
                "batch %d: %d/%d verified and deleted", number, summary["deleted"], summary["files"]
            )
            if summary["deleted"] == 0:
                logger.warning("nothing verified in this batch; leaving the rest for next run")
                break
    finally:
        http.close()
        link.close()
    return summaries


@flow(name="edge-uploads-received")
async def edge_uploads_received(captures: list[dict]) -> int:
    """Cloud side: a batch of verified edge uploads, already `captures` rows.

    Records the batch as a table artifact; the evaluation flow picks the captures up
    by their `evaluation_status = 'pending'`.
    """
    rows = [
        {
            "record_id": c.get("record_id"),
            "device": c.get("device_id"),
            "file": c.get("file"),
            "bytes": c.get("size"),
            "sha256": (c.get("sha256") or "")[:16],
        }
        for c in captures
    ]
    await acreate_table_artifact(
        table=rows,
        key="edge-uploads-received",
        description=f"{len(rows)} edge uploads verified and stored",
    )
    return len(rows)


def run_uploads_received(captures: list[dict]) -> str | None:
    """The signer's hand-off: one async flow run for the batch; its flow run id."""
    import asyncio

    state = asyncio.run(edge_uploads_received(captures, return_state=True))
    return str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
