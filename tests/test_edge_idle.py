"""A scheduled edge-batch-upload run with nothing to upload costs one flow run, no more.

Against a real Prefect server: the camera's directories are empty and ento.conf names
a broker port nothing listens on, so a run that connected (or ran any task) would
fail after connect-to-broker's retries. It completes at once with no task run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from camfleet.localsvc import free_port
from flows.edge_batch import edge_batch_upload, has_work


def _conf(tmp_path) -> str:
    path = tmp_path / "ento.conf"
    path.write_text(
        json.dumps(
            {
                "device": {
                    "SERIAL_ID": "ENTO-IDLE",
                    "PROVISION_STATUS": "provisioned",
                    "ENDPOINT_URL": "127.0.0.1",
                    "PORT": free_port(),  # nothing listens: connecting would fail
                    "TLS": False,
                    "STORAGE_PATH": str(tmp_path / "bufferStorage") + "/",
                }
            }
        )
    )
    return str(path)


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    return asyncio.run(read())


def test_idle_run_touches_no_broker_and_runs_no_task(prefect_api_url, tmp_path):
    state = edge_batch_upload(_conf(tmp_path), return_state=True)
    assert state.is_completed(), state
    assert state.result() == []
    assert _task_runs(state.state_details.flow_run_id) == []


def test_what_counts_as_work(tmp_path):
    from camfleet.edge.config import load_ento_conf

    config = load_ento_conf(_conf(tmp_path))
    assert not has_work(config)  # neither directory exists yet
    config.repo_dir.mkdir(parents=True)
    config.buffer_dir.mkdir(parents=True)
    (config.repo_dir / ".hidden.jpg").write_bytes(b"x")
    (config.repo_dir / "sub").mkdir()
    assert not has_work(config)
    fresh = config.repo_dir / "fresh.jpg"
    fresh.write_bytes(b"x")  # the camera may still be writing it
    assert not has_work(config, min_age_s=60)
    assert has_work(config, min_age_s=0)
    old = time.time() - 120
    os.utime(fresh, (old, old))
    assert has_work(config, min_age_s=60)
    fresh.unlink()
    (config.buffer_dir / "left.jpg").write_bytes(b"x")  # a leftover is due at once
    assert has_work(config, min_age_s=60)
