"""`mqtt-ingest-record` as a deployment: runs outside the assembler, retried from the UI.

The assembler (with Prefect off) stores and ACKs real images over a real Mosquitto; then
the prefect.yaml deployment's flow runs in a process that never saw the assembler (no
ingest context: the store and database come from the settings), against a real Prefect
server. One object is missing, so the verifying run fails; the object comes back and
the UI's Retry of that same run stamps every capture with its id, once.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from camfleet.simulators.esp32 import SimOptions, simulate
from tests.helpers import rows
from tests.test_mqtt_ingest import (  # noqa: F401 - fixture
    broker_block,
    make_service,
)
from tests.test_serve import _client_call
from tests.test_ui_retry import _retry_from_ui

ROOT = Path(__file__).resolve().parent.parent


def _ingest(mosquitto, make_service, database_url, objects: Path) -> list[dict]:  # noqa: F811
    """Three images stored and ACKed by the assembler with Prefect off: the records a
    recording run gets, and no capture stamped yet."""
    b = broker_block(mosquitto)
    svc = make_service(b, storage=objects.as_uri(), use_prefect=False)
    assert simulate(b, SimOptions(devices=3, images=1, id_prefix="DE9100")).images_acked == 3
    svc.stop(timeout=30)
    captured = rows(
        database_url, "select record_id::text, storage_path, image_bytes, flow_run_id from captures"
    )
    assert len(captured) == 3 and all(r[3] is None for r in captured)
    return [{"record_id": r[0], "storage_path": r[1], "bytes": r[2]} for r in captured]


@contextlib.contextmanager
def _as_a_worker_process(monkeypatch, database_url: str, objects: Path):
    """What a Prefect worker's process has: no assembler context, the store and the
    database from the settings (cleared again on the way out)."""
    from camfleet.settings import get_settings
    from tasks import mqtt as tm

    tm.set_context(None)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STORAGE_URL", objects.as_uri())
    get_settings.cache_clear()
    try:
        yield
    finally:
        tm.set_context(None)
        get_settings.cache_clear()


def test_record_deployment_runs_without_the_assembler_and_a_ui_retry_finishes_it(
    mosquitto,
    make_service,  # noqa: F811
    database_url,
    prefect_api_url,
    monkeypatch,
    tmp_path,
):
    import asyncio

    import yaml
    from prefect.flow_engine import run_flow  # an async flow: a coroutine to run

    from flows.mqtt_ingest import mqtt_ingest_record

    names = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert "mqtt-ingest-record" in names

    objects = tmp_path / "objects"
    records = _ingest(mosquitto, make_service, database_url, objects)

    missing = next(p for p in objects.rglob("*") if p.is_file())
    shutil.move(missing, tmp_path / "aside")

    # No flow-level retries here: the UI's Retry is what is under test.
    flow = mqtt_ingest_record.with_options(retries=0)
    deployment_id = flow.to_deployment(name="mqtt-ingest-record").apply()

    async def create(client):
        return await client.create_flow_run_from_deployment(
            deployment_id, parameters={"records": records, "verify": True}
        )

    with _as_a_worker_process(monkeypatch, database_url, objects):
        run = _client_call(create)

        async def read(client):
            return await client.read_flow_run(run.id)

        state = asyncio.run(
            run_flow(
                flow, flow_run=_client_call(read), parameters=run.parameters, return_type="state"
            )
        )
        assert state.is_failed()
        assert rows(database_url, "select count(flow_run_id) from captures") == [(0,)]

        shutil.move(tmp_path / "aside", missing)
        _retry_from_ui(run.id)
        retried = _client_call(read)
        state = asyncio.run(
            run_flow(flow, flow_run=retried, parameters=retried.parameters, return_type="state")
        )
        assert state.is_completed(), state
        assert state.result() == {"captures": 3, "verified": 3, "stamped": 3}
    stamped = rows(database_url, "select distinct flow_run_id::text from captures")
    assert stamped == [(str(run.id),)]


def test_the_assembler_recording_run_does_not_read_objects_back(
    mosquitto,
    make_service,  # noqa: F811
    database_url,
    prefect_api_url,
    monkeypatch,
    tmp_path,
):
    """Default `verify=False`: the assembler already checked every put's answer before
    its ACK_OK, so the recording run only stamps; with every object gone it still
    completes (a run that HEADs them would fail)."""
    import asyncio

    from flows.mqtt_ingest import mqtt_ingest_record

    records = _ingest(mosquitto, make_service, database_url, tmp_path / "objects")
    shutil.rmtree(tmp_path / "objects")
    with _as_a_worker_process(monkeypatch, database_url, tmp_path / "objects"):
        state = asyncio.run(mqtt_ingest_record(records, return_state=True))
    assert state.is_completed(), state
    assert state.result() == {"captures": 3, "verified": 0, "stamped": 3}
    assert rows(database_url, "select count(flow_run_id) from captures") == [(3,)]


def test_a_run_without_records_adopts_the_captures_no_run_stamped(
    mosquitto,
    make_service,  # noqa: F811
    database_url,
    prefect_api_url,
    monkeypatch,
    tmp_path,
):
    """What the hourly run does after the assembler's recorder gave up (Prefect down):
    every unstamped capture old enough gets this run's id, once; fresh ones are left to
    the live recorder."""
    import asyncio

    from flows.mqtt_ingest import mqtt_ingest_record

    _ingest(mosquitto, make_service, database_url, tmp_path / "objects")
    with _as_a_worker_process(monkeypatch, database_url, tmp_path / "objects"):
        fresh = asyncio.run(mqtt_ingest_record(return_state=True))  # default: 10 min old
        adopted = asyncio.run(mqtt_ingest_record(min_age_s=0, return_state=True))
        again = asyncio.run(mqtt_ingest_record(min_age_s=0, return_state=True))
    assert fresh.result()["captures"] == 0
    assert adopted.result() == {"captures": 3, "verified": 0, "stamped": 3}
    assert again.result()["captures"] == 0
    run_id = str(adopted.state_details.flow_run_id)
    assert rows(database_url, "select distinct flow_run_id::text from captures") == [(run_id,)]
