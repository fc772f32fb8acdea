"""The seed's curl flow, step by step, with real `curl` against a real `camfleet api`
process, a real PostgreSQL and the S3-compatible server (moto).

moto does not verify presigned signatures or POST policies, so nothing here relies on
the store to refuse a foreign key: the API itself confines keys to the device prefix
(tests/test_devices_api.py::test_ingest_refuses_keys_outside_prefix_and_missing_objects
and the prefix check below, which must answer before any storage access).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from camfleet.localsvc import free_port, run_command
from tests.helpers import api_process

SECRET = "flow-test-server-secret-0123456789"
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40 + b"\xff\xd9"
CAMFLEET = str(Path(sys.executable).with_name("camfleet"))


@pytest.fixture(scope="module")
def flow_db(postgres, _template_db):
    name = f"devflow_{uuid.uuid4().hex[:12]}"
    dsn = postgres.create_database(name, template=_template_db)
    yield dsn
    postgres.drop_database(name)


@pytest.fixture(scope="module")
def flow_bucket(s3):
    return s3.create_bucket(f"devflow-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def env(flow_db, flow_bucket, s3, tmp_path_factory):
    e = {
        "DATABASE_URL": flow_db,
        "CAMFLEET_SECRET_KEY": SECRET,
        "STORAGE_URL": f"s3://{flow_bucket}?endpoint_url={s3.endpoint_url}",
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_DEFAULT_REGION": s3.region,
        "CAMFLEET_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        # 20 concurrent retries of one seq below must meet the idempotency check, not
        # the per-device limit (which tests/test_devices_api.py covers).
        "CAMFLEET_RATE_LIMIT_DEVICE": "200/second",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    e.pop("PREFECT_API_URL", None)
    return e


@pytest.fixture(scope="module")
def api(env, tmp_path_factory):
    """`camfleet api` as a subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    full_env = {**os.environ, **env}
    full_env.pop("PREFECT_API_URL", None)  # no processing deployment in this test
    cmd = [CAMFLEET, "api", "--host", "127.0.0.1", "--port", str(port)]
    with api_process(cmd, port, full_env, log_path) as base:
        yield base, log_path


def curl(*args: str) -> tuple[int, dict | str]:
    """Run curl; returns (HTTP status, parsed JSON body or text)."""
    result = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, _, status = result.stdout.rpartition("\n")
    try:
        return int(status), json.loads(body)
    except json.JSONDecodeError:
        return int(status), body


@pytest.fixture(scope="module")
def user_key(env, api):
    result = run_command([CAMFLEET, "users", "create-key", "alice", "--label", "curl"], env=env)
    key = result.stdout.strip()
    assert key.startswith("cfuk_")
    return key


def test_seed_curl_flow(api, env, user_key, s3, flow_bucket, tmp_path):
    base, log_path = api
    # 1) Pair (user-authenticated)
    status, paired = curl(
        "-X", "POST", f"{base}/devices/pair",
        "-H", f"Authorization: Bearer {user_key}",
        "-H", "Content-Type: application/json",
        "-d", '{"name":"esp32-proto"}',
    )  # fmt: skip
    assert status == 200, paired
    assert set(paired) == {"device_id", "pairing_code", "expires_at"}

    # 2) Activate (the device uses the pairing code to get its token)
    status, activated = curl(
        "-X", "POST", f"{base}/devices/activate",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"pairing_code": paired["pairing_code"]}),
    )  # fmt: skip
    assert status == 200, activated
    assert set(activated) == {"device_id", "device_token"}
    assert activated["device_id"] == paired["device_id"]
    token = activated["device_token"]
    assert token.startswith("devtok_")

    # 3) Get the upload target (device-auth), both of the seed's formats
    status, target = curl(
        "-X", "POST", f"{base}/devices/upload-url",
        "-H", f"X-Device-Token: {token}",
        "-H", "Content-Type: application/json",
        "-d", '{"filename":"2025-12-26T10-15-30Z_000123.jpg",'
              '"content_type":"image/jpeg","seq":123}',
    )  # fmt: skip
    assert status == 200, target
    device_id = paired["device_id"]
    key = target["object_key"]
    assert key.startswith(f"devices/{device_id}/") and key.endswith(
        "/123-2025-12-26T10-15-30Z_000123.jpg"
    )
    assert len(key.split("/")) == 6  # devices/<id>/YYYY/MM/DD/<seq>-<name>
    assert target["upload_host"] == "127.0.0.1"
    assert target["upload_port"] == s3.port
    assert target["upload_path"].startswith(f"/{flow_bucket}/{key}?")
    assert "X-Amz-Signature=" in target["upload_path"]
    assert target["upload_url"] == (
        f"http://{target['upload_host']}:{target['upload_port']}{target['upload_path']}"
    )

    # 4) Upload the bytes straight to storage (HTTP PUT to host/port/path)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(JPEG)
    status, _ = curl(
        "-X", "PUT",
        f"http://{target['upload_host']}:{target['upload_port']}{target['upload_path']}",
        "-H", "Content-Type: image/jpeg",
        "--data-binary", f"@{photo}",
    )  # fmt: skip
    assert status == 200
    stored = s3.client().get_object(Bucket=flow_bucket, Key=key)["Body"].read()
    assert stored == JPEG

    # 5) Notify ingest (device-auth, idempotent)
    ingest_body = json.dumps(
        {"object_key": key, "captured_at": "2025-12-26T10:15:30Z", "seq": 123, "ntp_synced": True}
    )
    args = (
        "-X", "POST", f"{base}/devices/ingest",
        "-H", f"X-Device-Token: {token}",
        "-H", "Content-Type: application/json",
        "-d", ingest_body,
    )  # fmt: skip
    status, first = curl(*args)
    assert status == 200, first
    assert first["status"] == "queued" and first["item_id"] and "task_id" in first
    status, again = curl(*args)
    assert status == 200
    assert again["status"] == "duplicate" and again["item_id"] == first["item_id"]

    # a reused pairing code fails; tokens never reach the access log
    status, body = curl(
        "-X", "POST", f"{base}/devices/activate",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"pairing_code": paired["pairing_code"]}),
    )  # fmt: skip
    assert status == 409 and body["detail"]["error"] == "pairing_code_used"
    log_text = log_path.read_text()
    assert "POST /devices/ingest" in log_text
    for secret in (token, paired["pairing_code"], user_key, "X-Amz-Signature"):
        assert secret not in log_text


def _activate_device(base: str, user_key: str) -> tuple[str, str]:
    paired = httpx.post(
        f"{base}/devices/pair", json={}, headers={"Authorization": f"Bearer {user_key}"}
    ).json()
    act = httpx.post(f"{base}/devices/activate", json={"pairing_code": paired["pairing_code"]})
    return act.json()["device_id"], act.json()["device_token"]


def test_twenty_concurrent_ingests_of_one_seq_yield_one_queued(api, user_key, s3, flow_bucket):
    base, _ = api
    device_id, token = _activate_device(base, user_key)
    headers = {"X-Device-Token": token}
    target = httpx.post(
        f"{base}/devices/upload-url", json={"filename": "c.jpg", "seq": 7}, headers=headers
    ).json()
    assert httpx.put(target["upload_url"], content=JPEG).status_code == 200
    body = {"object_key": target["object_key"], "seq": 7, "captured_at": "2025-12-26T10:15:30Z"}

    async def storm():
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/devices/ingest", json=body) for _ in range(20))
            )

    responses = asyncio.run(storm())
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    statuses = sorted(r.json()["status"] for r in responses)
    assert statuses == ["duplicate"] * 19 + ["queued"]
    assert len({r.json()["item_id"] for r in responses}) == 1


def test_missing_object_and_foreign_key_are_refused(api, user_key, s3, flow_bucket):
    base, _ = api
    device_a, token_a = _activate_device(base, user_key)
    device_b, token_b = _activate_device(base, user_key)
    target_b = httpx.post(
        f"{base}/devices/upload-url",
        json={"filename": "b.jpg", "seq": 1},
        headers={"X-Device-Token": token_b},
    ).json()
    assert httpx.put(target_b["upload_url"], content=JPEG).status_code == 200
    # moto would accept A's presigned PUT for any key; camfleet refuses B's key for A
    r = httpx.post(
        f"{base}/devices/ingest",
        json={"object_key": target_b["object_key"], "seq": 1},
        headers={"X-Device-Token": token_a},
    )
    assert r.status_code == 403 and r.json()["detail"]["error"] == "key_outside_prefix"
    r = httpx.post(
        f"{base}/devices/ingest",
        json={"object_key": f"devices/{device_a}/2025/01/01/2-missing.jpg", "seq": 2},
        headers={"X-Device-Token": token_a},
    )
    assert r.status_code == 404 and r.json()["detail"]["error"] == "object_not_found"


def test_cli_revoke_rotate_and_list(api, env, user_key):
    base, _ = api
    device_id, token = _activate_device(base, user_key)
    headers = {"X-Device-Token": token}
    body = {"filename": "a.jpg", "seq": 1}
    assert httpx.post(f"{base}/devices/upload-url", json=body, headers=headers).status_code == 200

    run_command([CAMFLEET, "devices", "revoke", device_id], env=env)
    r = httpx.post(f"{base}/devices/upload-url", json=body, headers=headers)
    assert r.status_code == 401
    listing = run_command([CAMFLEET, "devices", "list", "--user", "alice"], env=env).stdout
    assert f"{device_id}  lifelog  revoked" in listing

    # a revoked device gets no token until it is reinstated (issue 13, item 14)
    refused = run_command([CAMFLEET, "devices", "rotate", device_id], env=env, check=False)
    assert refused.returncode == 1 and "reinstate" in refused.stderr
    run_command([CAMFLEET, "devices", "reinstate", device_id], env=env)
    new = run_command([CAMFLEET, "devices", "rotate", device_id], env=env).stdout.strip()
    assert new.startswith("devtok_") and new != token
    assert httpx.post(f"{base}/devices/upload-url", json=body, headers=headers).status_code == 401
    r = httpx.post(f"{base}/devices/upload-url", json=body, headers={"X-Device-Token": new})
    assert r.status_code == 200


def test_simulator_pairs_uploads_streams_and_retries_ingest(
    api, env, user_key, s3, flow_bucket, flow_db, tmp_path
):
    base, _ = api
    state_dir = tmp_path / "state"
    args = [CAMFLEET, "simulate", "lifelog", "--api", base, "--devices", "2", "--photos", "3"]
    result = run_command(
        [*args, "--duplicate-rate", "1", "--state-dir", str(state_dir)],
        env={**env, "CAMFLEET_USER_KEY": user_key},
    )
    summary = json.loads(result.stdout)
    assert summary["statuses"] == {"queued": 6, "retry-duplicate": 6}
    assert set(summary["p99_ms"]) == {"activate", "upload-url", "put", "ingest"}
    # the state file keeps the token and the seq: a second run resumes at seq 4
    result = run_command(
        [*args[:-4], "--devices", "1", "--photos", "1", "--state-dir", str(state_dir)], env=env
    )
    assert json.loads(result.stdout)["statuses"] == {"queued": 1}
    device_id = json.loads((state_dir / "lifelog-0.json").read_text())["device_id"]
    import psycopg2

    conn = psycopg2.connect(flow_db)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select seq, storage_path from captures where device_id = %s order by seq",
                (device_id,),
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    assert [seq for seq, _ in rows] == [1, 2, 3, 4]
    for _, key in rows:
        head = s3.client().head_object(Bucket=flow_bucket, Key=key)
        assert head["ContentLength"] > 9000


def test_demo_mode_pairs_with_its_own_user_and_uploads_real_jpegs(api, env, flow_db, tmp_path):
    """`camfleet up --demo` runs `camfleet simulate lifelog --demo` until stopped."""
    import psycopg2

    base, _ = api
    demo_env = {**os.environ, **env, "CAMFLEET_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [CAMFLEET, "simulate", "lifelog", "--demo", "--api", base],
        env=demo_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    rows = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(rows) < 2:
            time.sleep(0.5)
            assert proc.poll() is None, proc.stderr.read().decode()
            conn = psycopg2.connect(flow_db)
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        "select c.image_bytes from captures c join devices d using (device_id)"
                        " where d.user_id = 'demo'"
                    )
                    rows = cur.fetchall()
            finally:
                conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert len(rows) == 2  # one photo from each of the two cameras, then a 30 s pause
    assert all(size > 10_000 for (size,) in rows)
    assert (tmp_path / "demo-lifelog" / "user-key").stat().st_mode & 0o077 == 0
