"""Who may reach which device over the device API (issue 13, items 11-14; issue 19, 7).

Real API processes (`camfleet api`) on a real PostgreSQL, device-id-only mode off
unless a test says otherwise; streams closed across instances are proven with two API
processes sharing the database.
"""

from __future__ import annotations

import queue
import sys
import time

import httpx
import pytest

from camfleet import db, tokens
from tests.faults_api_support import make_user_key
from tests.test_api_commands_helpers import (
    SECRET,
    ApiProcess,
    SseReader,
    add_device,
    fetch,
    jpeg_bytes,
    wait_for,
)

SECURE = {"CAMFLEET_ALLOW_DEVICE_ID_ONLY": "false"}


@pytest.fixture
def storage_dir(tmp_path):
    d = tmp_path / "objects"
    d.mkdir()
    return d


def give_token(dsn: str, device_id: str, owner: str | None = None) -> str:
    token = tokens.new_device_token()
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE devices SET device_token_hash = %s, user_id = %s WHERE device_id = %s",
            (tokens.hash_device_token(SECRET.encode(), token), owner, device_id),
        )
    return token


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def cli_env(dsn: str) -> dict:
    return {"DATABASE_URL": dsn, "CAMFLEET_SECRET_KEY": SECRET}


# --- item 11: weak secrets ---------------------------------------------------------------


WEAK = {"empty": "", "one-char": "x", "19-bytes": "short-but-varied-123", "2-chars": "ab" * 40}


def test_weak_secrets_are_refused_strong_ones_kept():
    from services.api.secret_policy import WeakSecret, require_strong_secret

    for name, secret in WEAK.items():
        with pytest.raises(WeakSecret) as refused:
            require_strong_secret(secret)
        assert secret not in str(refused.value) or not secret, name
    strong = "k3Yq-8vPz_T1wLmN0sRbXe5uJ7hCgD2a"  # 32 bytes, what `camfleet up` makes is 43
    assert require_strong_secret(strong) == strong.encode()


def test_api_exits_2_with_a_weak_secret(run_cli, database_url):
    env = {**cli_env(database_url), "CAMFLEET_SECRET_KEY": WEAK["19-bytes"]}
    result = run_cli(
        [sys.executable, "-m", "camfleet.cli", "api", "--port", "1"], env=env, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "server secret" in result.stderr and "Traceback" not in result.stderr
    assert WEAK["19-bytes"] not in result.stderr  # never echoed


# --- item 12 and 14: authenticate first, 404 for what is not yours -----------------------


def test_no_credentials_answer_alike_for_known_and_unknown_devices(database_url, storage_dir):
    add_device(database_url, "KNOWN1")
    give_token(database_url, "KNOWN1", owner=None)
    with ApiProcess(database_url, storage_dir, **SECURE) as api:
        answers = []
        for device_id in ("KNOWN1", "NOSUCH1"):
            stream = httpx.get(f"{api.url}/v1/devices/{device_id}/commands", timeout=5)
            trigger = httpx.post(f"{api.url}/v1/devices/{device_id}/trigger", timeout=5)
            capture = httpx.post(
                f"{api.url}/v1/captures",
                json={"device_id": device_id, "image_base64": "AAAA"},
                timeout=5,
            )
            answers.append(
                [(r.status_code, r.json()["detail"]["reason"]) for r in (stream, trigger, capture)]
            )
        assert answers[0] == answers[1]  # nothing tells an outsider KNOWN1 exists
        assert {status for status, _ in answers[0]} == {401}
        connected = httpx.get(f"{api.url}/v1/devices/connected", timeout=5)
        assert connected.status_code == 401


def test_owners_see_and_trigger_only_their_own_devices(database_url, storage_dir, run_cli):
    alice, bob = make_user_key(database_url, "alice"), make_user_key(database_url, "bob")
    for device_id in ("ALICE1", "BOB1", "ORPHAN1"):  # ORPHAN1: made by MQTT/edge/CLI
        add_device(database_url, device_id)
    alice_token = give_token(database_url, "ALICE1", "alice")
    bob_token = give_token(database_url, "BOB1", "bob")
    with ApiProcess(database_url, storage_dir, **SECURE) as api:
        streams = [
            SseReader(api.url, "ALICE1", {"X-Device-Token": alice_token}),
            SseReader(api.url, "BOB1", {"X-Device-Token": bob_token}),
        ]
        try:
            for sse in streams:
                assert sse.next()["event"] == "connected"

            def listed(key):
                r = httpx.get(f"{api.url}/v1/devices/connected", headers=bearer(key), timeout=5)
                return r.json()["connected_devices"]

            wait_for(lambda: listed(bob) == ["BOB1"])
            assert listed(alice) == ["ALICE1"]  # bob's stream is not alice's business

            def trigger(device_id, key):
                return httpx.post(
                    f"{api.url}/v1/devices/{device_id}/trigger", headers=bearer(key), timeout=10
                )

            assert trigger("ALICE1", alice).status_code == 200
            refused = [trigger(d, alice) for d in ("BOB1", "ORPHAN1", "NOSUCH1")]
            assert [r.status_code for r in refused] == [404, 404, 404]
            assert len({r.json()["detail"]["error"] for r in refused}) == 1
            # a device token names one device: any other id is "not found", not "forbidden"
            r = httpx.get(
                f"{api.url}/v1/devices/BOB1/commands",
                headers={"X-Device-Token": alice_token},
                timeout=5,
            )
            assert r.status_code == 404
            # user routes of /devices follow the same rule
            r = httpx.post(f"{api.url}/devices/BOB1/revoke", headers=bearer(alice), timeout=5)
            assert r.status_code == 404
            r = httpx.post(f"{api.url}/devices/ORPHAN1/rotate", headers=bearer(alice), timeout=5)
            assert r.status_code == 404

            # an ownerless device is reached once an operator assigns it
            run_cli(
                [sys.executable, "-m", "camfleet.cli", "devices", "assign", "ORPHAN1", "alice"],
                env=cli_env(database_url),
            )
            assert trigger("ORPHAN1", alice).status_code == 200
            assert trigger("ORPHAN1", bob).status_code == 404
            bad = run_cli(
                [sys.executable, "-m", "camfleet.cli", "devices", "assign", "BOB1", "nobody"],
                env=cli_env(database_url),
                check=False,
            )
            assert bad.returncode == 1 and "no user nobody" in bad.stderr
        finally:
            for sse in streams:
                sse.close()


def test_rotation_never_lifts_a_revocation(database_url, storage_dir, run_cli):
    alice = make_user_key(database_url, "alice")
    add_device(database_url, "REV1")
    old = give_token(database_url, "REV1", "alice")
    cli = [sys.executable, "-m", "camfleet.cli", "devices"]
    env = cli_env(database_url)
    with ApiProcess(database_url, storage_dir, **SECURE) as api:
        assert httpx.post(f"{api.url}/devices/REV1/revoke", headers=bearer(alice)).is_success
        r = httpx.post(f"{api.url}/devices/REV1/rotate", headers=bearer(alice))
        assert r.status_code == 409 and r.json()["detail"]["error"] == "device_revoked"
        refused = run_cli([*cli, "rotate", "REV1"], env=env, check=False)
        assert refused.returncode == 1 and "reinstate" in refused.stderr
        assert fetch(database_url, "SELECT revoked_at IS NOT NULL FROM devices")[0][0]

        run_cli([*cli, "reinstate", "REV1"], env=env)
        headers = {"X-Device-Token": old}
        r = httpx.get(f"{api.url}/v1/devices/REV1/commands", headers=headers, timeout=5)
        assert r.status_code == 401  # the token from before the revocation stays dead
        new = run_cli([*cli, "rotate", "REV1"], env=env).stdout.strip()
        sse = SseReader(api.url, "REV1", {"X-Device-Token": new})
        try:
            assert sse.next()["event"] == "connected"
        finally:
            sse.close()


# --- item 13: streams die with their token, on every instance ----------------------------


def _closed(sse: SseReader, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = sse.events.get(timeout=0.2)
        except queue.Empty:
            continue
        assert "cmd" not in event, f"a dead token's stream received {event}"
        if event.get("event") == "_closed":
            return True
    return False


def test_rotated_or_revoked_token_closes_streams_on_every_instance(
    database_url, storage_dir, run_cli
):
    alice = make_user_key(database_url, "alice")
    add_device(database_url, "CAM1")
    token = give_token(database_url, "CAM1", "alice")
    with (
        ApiProcess(database_url, storage_dir, **SECURE) as a,
        ApiProcess(database_url, storage_dir, **SECURE) as b,
    ):
        stolen = SseReader(a.url, "CAM1", {"X-Device-Token": token})
        assert stolen.next()["event"] == "connected"
        # the owner rotates through the OTHER instance: the stream on `a` ends
        r = httpx.post(f"{b.url}/devices/CAM1/rotate", headers=bearer(alice), timeout=5)
        new = r.json()["device_token"]
        assert _closed(stolen)
        # a trigger made now is not taken by the dead token: the real device gets it
        r = httpx.post(f"{b.url}/v1/devices/CAM1/trigger", headers=bearer(alice), timeout=10)
        assert r.json()["status"] == "pending"
        real = SseReader(a.url, "CAM1", {"X-Device-Token": new})
        try:
            assert real.next()["event"] == "connected"
            assert real.next_command()["trigger_id"] == r.json()["trigger_id"]
            # revocation from the CLI (no API involved) closes it too
            run_cli(
                [sys.executable, "-m", "camfleet.cli", "devices", "revoke", "CAM1"],
                env=cli_env(database_url),
            )
            assert _closed(real)
        finally:
            real.close()
            stolen.close()


def test_id_only_stream_closes_when_the_device_gets_a_token(database_url, storage_dir):
    add_device(database_url, "SEED1")
    with ApiProcess(database_url, storage_dir) as api:  # device-id-only mode
        sse = SseReader(api.url, "SEED1")
        try:
            assert sse.next()["event"] == "connected"
            give_token(database_url, "SEED1")
            assert _closed(sse)
        finally:
            sse.close()


# --- issue 19, item 7: the one setting a Visant device needs for a token ------------------


def test_devices_cli_tells_the_token_setting_and_the_agent_uses_it(
    database_url, storage_dir, run_cli, tmp_path
):
    alice = make_user_key(database_url, "alice")
    add_device(database_url, "VIS1")
    cli = [sys.executable, "-m", "camfleet.cli", "devices"]
    env = cli_env(database_url)
    listing = run_cli([*cli, "list"], env=env)
    assert "CAMFLEET_DEVICE_TOKEN" in listing.stderr and "camfleet devices rotate" in listing.stderr
    run_cli([*cli, "assign", "VIS1", "alice"], env=env)
    rotated = run_cli([*cli, "rotate", "VIS1"], env=env)
    token = rotated.stdout.strip()
    assert "CAMFLEET_DEVICE_TOKEN" in rotated.stderr
    image = tmp_path / "frame.jpg"
    image.write_bytes(jpeg_bytes())
    with ApiProcess(database_url, storage_dir, **SECURE) as api:
        import subprocess

        agent = subprocess.Popen(
            [sys.executable, "-m", "camfleet.cli", "agent", "--api-url", api.url,
             "--device-id", "VIS1", "--camera-source", str(image), "--camera-warmup", "0",
             "--max-captures", "1"],
            env={**api.env, "CAMFLEET_DEVICE_TOKEN": token},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(
                lambda: (
                    httpx.get(f"{api.url}/v1/devices/connected", headers=bearer(alice)).json()[
                        "connected_devices"
                    ]
                    == ["VIS1"]
                ),
                timeout=30,
            )
            r = httpx.post(f"{api.url}/v1/devices/VIS1/trigger", headers=bearer(alice), timeout=10)
            assert r.json()["status"] == "sent", r.text
            assert agent.wait(60) == 0, agent.stdout.read().decode()[-2000:]
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(5)
    rows = fetch(database_url, "SELECT device_id FROM captures WHERE trigger_id IS NOT NULL")
    assert rows == [("VIS1",)]
