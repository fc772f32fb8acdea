"""The device-side Prefect flow, on a real Prefect server, through a mutual-TLS +
password Mosquitto, moto's S3 server and PostgreSQL; and the seed's ento.conf as is."""

from __future__ import annotations

import json
import uuid
from contextlib import closing

import psycopg2
import pytest
from prefect.client.orchestration import get_client

from camfleet.edge.config import ConfigError, load_ento_conf
from services.signer import Signer
from tests.test_edge_transaction import broker_block, make_store, write_images


def seed_conf(tmp_path, serial, broker, **extra) -> str:
    """The seed's layout: {"device": {SERIAL_ID, PROVISION_STATUS, ENDPOINT_URL, STORAGE_PATH}}."""
    device = {
        "SERIAL_ID": serial,
        "PROVISION_STATUS": "provisioned",
        "ENDPOINT_URL": broker.host,
        "STORAGE_PATH": str(tmp_path / "bufferStorage") + "/",
        **extra,
    }
    path = tmp_path / "ento.conf"
    path.write_text(json.dumps({"device": device}))
    return str(path)


def seed_device(tmp_path, mosquitto, images: int) -> tuple[str, str, dict]:
    """A seed-configured device on the test broker (plain MQTT) with `images` images
    waiting: (serial, its ento.conf path, {file name: sha256})."""
    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    conf = seed_conf(tmp_path, serial, mosquitto, PORT=mosquitto.port, TLS=False)
    return serial, conf, write_images(tmp_path / "cameraImageRepo", images)


def test_seed_ento_conf_is_read_as_is(tmp_path):
    path = tmp_path / "ento.conf"
    path.write_text(
        json.dumps(
            {
                "device": {
                    "SERIAL_ID": "ENTO-0042",
                    "PROVISION_STATUS": "provisioned",
                    "ENDPOINT_URL": "broker.example",
                    "STORAGE_PATH": "/media/mmcblk1p1/bufferStorage/",
                }
            }
        )
    )
    cfg = load_ento_conf(path)
    assert cfg.serial == "ENTO-0042"
    assert str(cfg.buffer_dir) == "/media/mmcblk1p1/bufferStorage"
    assert str(cfg.repo_dir) == "/media/mmcblk1p1/cameraImageRepo"
    # The seed's defaults: AWS-IoT style TLS on 8883 with the certificates it names.
    assert (cfg.broker_port, cfg.tls) == (8883, True)
    assert cfg.ca_certs == "/etc/entomologist/cert/AmazonRootCA1.pem"
    assert cfg.certfile == "/etc/entomologist/cert/certificate.pem.crt"
    assert cfg.keyfile == "/etc/entomologist/cert/private.pem.key"
    assert cfg.batch_size == 5
    assert cfg.topics.for_device(cfg.serial) == (
        "cameraDevice/generateURL/ENTO-0042",
        "cameraDevice/getURL/ENTO-0042",
        "cameraDevice/fileUploaded/ENTO-0042",
    )


@pytest.mark.parametrize(
    "body",
    ["not json", json.dumps({"nodevice": {}}), json.dumps({"device": {"SERIAL_ID": "../x"}})],
)
def test_bad_ento_conf_is_a_clear_error(tmp_path, body):
    path = tmp_path / "ento.conf"
    path.write_text(body)
    with pytest.raises(ConfigError):
        load_ento_conf(path)


def test_flow_over_tls_and_password_uploads_verifies_and_reports(
    tmp_path, prefect_api_url, mosquitto_tls, s3, bucket, database_url
):
    from flows.edge_batch import edge_batch_upload, run_uploads_received

    broker = broker_block(mosquitto_tls)
    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    conf = seed_conf(
        tmp_path,
        serial,
        broker,
        PORT=mosquitto_tls.port,
        ROOT_CA=str(mosquitto_tls.ca_file),
        CERT=str(mosquitto_tls.client_cert),
        PRIVATE_KEY=str(mosquitto_tls.client_key),
        MQTT_USERNAME=mosquitto_tls.username,
        MQTT_PASSWORD=mosquitto_tls.password,
    )
    shas = write_images(tmp_path / "cameraImageRepo", 7)
    signer = Signer(
        make_store(s3, bucket),
        database_url,
        broker,
        client_id=f"signer-{uuid.uuid4().hex[:6]}",
        handoff=run_uploads_received,
    )
    with signer:
        assert signer.wait_connected(5)
        state = edge_batch_upload(conf, min_age_s=0, return_state=True)
    summaries = state.result()
    assert [s["deleted"] for s in summaries] == [5, 2]
    assert list((tmp_path / "bufferStorage").iterdir()) == []
    assert list((tmp_path / "cameraImageRepo").iterdir()) == []

    # The signer handed the 7 new captures to one post-processing flow run (not 7).
    with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select device_capture_id, flow_run_id from captures where device_id = %s",
            (serial,),
        )
        rows = dict(cur.fetchall())
    assert set(rows) == set(shas)
    assert len(set(rows.values())) == 1 and None not in rows.values()

    # A progress artifact per batch, and no secret anywhere in the run's artifacts.
    import asyncio

    async def artifacts():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
                )
            )

    async def task_runs():
        async with get_client() as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                )
            )

    # One connect, two task runs per batch of five (never one per image), and the
    # send-batch that found nothing left.
    names = sorted(t.name.rsplit("-", 1)[0] for t in asyncio.run(task_runs()))
    assert names == ["await-verifications"] * 2 + ["connect-to-broker"] + ["send-batch"] * 3

    arts = asyncio.run(artifacts())
    progress = [a for a in arts if a.type == "progress"]
    assert len(progress) == 2 and {a.data for a in progress} == {100.0}
    assert not any(mosquitto_tls.password in str(a.data) + str(a.description) for a in arts)


def test_flow_takes_its_tls_broker_from_a_saved_block(
    tmp_path, prefect_api_url, mosquitto_tls, s3, bucket, database_url
):
    """ento.conf exactly as the seed writes it; TLS + login come from a camfleet block."""
    from flows.edge_batch import edge_batch_upload

    broker = broker_block(mosquitto_tls)
    name = f"edge-broker-{uuid.uuid4().hex[:6]}"
    broker.save(name)
    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    conf = seed_conf(tmp_path, serial, broker)  # ENDPOINT_URL only, port 8883 default
    shas = write_images(tmp_path / "cameraImageRepo", 3)
    with Signer(make_store(s3, bucket), database_url, broker, client_id=f"s-{serial}") as s:
        assert s.wait_connected(5)
        summaries = edge_batch_upload(conf, mqtt_block=name, min_age_s=0)
    assert [x["deleted"] for x in summaries] == [3]
    with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute("select count(*) from captures where device_id = %s", (serial,))
        assert cur.fetchone()[0] == len(shas)
