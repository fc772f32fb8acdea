"""The device paths never wait on Prefect (issue 12, item 5): the Prefect server is
frozen (SIGSTOP on its whole process tree, as a stuck VM or a GC pause would) while
devices work; they are still answered, and the recording catches up after SIGCONT.

The server is a private `camfleet.localsvc.PrefectServerInstance` (state in the
session PostgreSQL): the session's shared Prefect harness is never frozen.  The
services run as their real commands, `camfleet assembler` and `camfleet signer`,
with PREFECT_API_URL pointing at it.

* test_signer_answers_and_verifies_while_prefect_is_frozen: a seed device and
  camfleet's device upload during the freeze; every file is answered, verified and
  deleted; after SIGCONT the hand-off stamps a flow run on every capture.
* test_acks_flow_while_prefect_is_frozen: 20 simulated ESP32 devices send an image
  each while frozen; test_hundred_devices_keep_their_acks_while_prefect_is_frozen_60s
  (slow): 100 devices keep sending for FREEZE_S.  Every image is ACKed with no resend
  (the device's ACK timeout is the bound, never a timing assertion: the ACK p50/p99
  frozen vs. before the freeze are printed); after SIGCONT every capture gets its
  recording run's id, none dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager

import pytest

from camfleet.edge.seed_device import run_seed_batch
from camfleet.edge.uploader import EdgeUploader
from camfleet.localsvc import PrefectServerInstance, free_port
from camfleet.simulators.esp32 import SimOptions, SimResult, simulate
from tests.faults_common import wait_until
from tests.test_edge_signer_isolation import signer_env
from tests.test_edge_transaction import broker_block, device, write_images
from tests.test_mqtt_ingest import rows

FREEZE_S = 60.0
# How long the recording / hand-off may take to catch up after SIGCONT on a loaded box.
CATCH_UP_S = 300.0


@pytest.fixture(scope="module")
def prefect(postgres):
    """A Prefect server of this module's own: these tests SIGSTOP it."""
    dsn = postgres.create_database(f"prefect_frozen_{uuid.uuid4().hex[:8]}")
    with PrefectServerInstance(database_url=dsn, services=False) as server:
        yield server


@contextmanager
def frozen(server: PrefectServerInstance):
    """SIGSTOP the server's whole process tree; SIGCONT on the way out."""
    procs = server.processes()
    assert procs
    for p in procs:
        p.suspend()
    try:
        yield
    finally:
        for p in procs:
            p.resume()


def prefect_env(base: dict, server: PrefectServerInstance, tmp_path) -> dict:
    env = {k: v for k, v in base.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=server.api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PYTHONUNBUFFERED="1",
    )
    return env


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError:
        return 0, {}


@contextmanager
def service(cmd: list[str], env: dict, ready_url: str, log_path):
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ok = wait_until(lambda: health(ready_url)[0] == 200 or proc.poll() is not None, 120)
        assert ok and proc.poll() is None, log_path.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def unstamped(dsn: str, device_prefix: str) -> int:
    return rows(
        dsn,
        "select count(*) from captures where device_id like %s and flow_run_id is null",
        device_prefix + "%",
    )[0][0]


# -- the edge signer --------------------------------------------------------------------------


def test_signer_answers_and_verifies_while_prefect_is_frozen(
    prefect, s3, bucket, mosquitto, database_url, tmp_path
):
    port = free_port()
    env = prefect_env(signer_env(database_url, s3, bucket, mosquitto, tmp_path), prefect, tmp_path)
    cmd = [sys.executable, "-m", "camfleet.cli", "signer", "--health-port", str(port)]
    cmd += ["--client-id", f"frz-{uuid.uuid4().hex[:8]}"]
    log = tmp_path / "signer.log"
    broker = broker_block(mosquitto)
    prefix = f"FRZ{uuid.uuid4().hex[:6]}"
    with service(cmd, env, f"http://127.0.0.1:{port}/ready", log) as proc:
        with frozen(prefect):
            # a seed device, twice (the second batch finds the first's hand-off stuck)
            for n in range(2):
                buffer = tmp_path / f"seed{n}"
                names = sorted(write_images(buffer, 3, prefix=f"s{n}"))
                got = run_seed_batch(broker, f"{prefix}-SEED", buffer, names, tmp_path)
                assert sorted(got) == names, log.read_text()
            # camfleet's device
            cfg = device(tmp_path, broker, serial=f"{prefix}-CF")
            write_images(cfg.repo_dir, 4)
            summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
            assert sum(s["deleted"] for s in summaries) == 4, log.read_text()
            assert proc.poll() is None
            # still ready; its hand-off has taken a batch to the frozen API (one at a
            # time: the rest wait behind it)
            ready = f"http://127.0.0.1:{port}/ready"
            assert wait_until(lambda: health(ready)[1].get("handoff_backlog", 10) < 10, 60)
            assert health(ready)[0] == 200
        assert rows(
            database_url, "select count(*) from captures where device_id like %s", prefix + "%"
        ) == [(10,)]
        caught_up = wait_until(lambda: unstamped(database_url, prefix) == 0, CATCH_UP_S, 1.0)
        assert caught_up, (
            f"{unstamped(database_url, prefix)} captures never handed off\n"
            + (log.read_text()[-3000:])
        )
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.timeout(900)
def test_signer_hand_off_failed_on_a_frozen_prefect_is_retried(
    prefect, s3, bucket, mosquitto, database_url, tmp_path
):
    """Frozen longer than the Prefect client waits: the hand-off fails (a timeout, as
    with Prefect down).  The captures are stored and the device answered regardless;
    once Prefect is back the same captures are handed off (before: dropped for good)."""
    port = free_port()
    env = prefect_env(signer_env(database_url, s3, bucket, mosquitto, tmp_path), prefect, tmp_path)
    env.update(PREFECT_API_REQUEST_TIMEOUT="2", PREFECT_CLIENT_MAX_RETRIES="0")
    cmd = [sys.executable, "-m", "camfleet.cli", "signer", "--health-port", str(port)]
    cmd += ["--client-id", f"frz-{uuid.uuid4().hex[:8]}"]
    log = tmp_path / "signer.log"
    prefix = f"FRT{uuid.uuid4().hex[:6]}"
    with service(cmd, env, f"http://127.0.0.1:{port}/ready", log) as proc:
        with frozen(prefect):
            buffer = tmp_path / "seed"
            names = sorted(write_images(buffer, 3))
            got = run_seed_batch(broker_block(mosquitto), prefix, buffer, names, tmp_path)
            assert sorted(got) == names, log.read_text()
            failed = wait_until(lambda: "hand-off failed" in log.read_text(), 120, 0.5)
            assert failed, log.read_text()[-3000:]
        caught_up = wait_until(lambda: unstamped(database_url, prefix) == 0, CATCH_UP_S, 1.0)
        assert caught_up, (
            f"{unstamped(database_url, prefix)} captures never handed off\n"
            + (log.read_text()[-3000:])
        )
    assert proc.returncode == 0, log.read_text()[-3000:]


# -- the assembler, 100 devices ----------------------------------------------------------------


def _pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))] * 1000 if v else float("nan")


def fleet_under_frozen_prefect(prefect, mosquitto, database_url, tmp_path, devices, freeze_s):
    """`devices` simulated ESP32s send one image per wake-up, in waves, before and while
    the Prefect server is frozen (at least one wave, as many as fit in `freeze_s`)."""
    port = free_port()
    env = prefect_env(dict(os.environ), prefect, tmp_path)
    env.update(
        MQTT_HOST=mosquitto.host,
        MQTT_PORT=str(mosquitto.port),
        DATABASE_URL=database_url,
        STORAGE_URL=f"file://{tmp_path / 'objects'}",
        MQTT_CLIENT_ID=f"frz-{uuid.uuid4().hex[:8]}",
    )
    cmd = [sys.executable, "-m", "camfleet.cli", "assembler", "--health-port", str(port)]
    url = f"http://127.0.0.1:{port}/healthz"
    log = tmp_path / "assembler.log"
    prefix = f"F{devices:03d}"
    broker = broker_block(mosquitto)
    # small real JPEGs under names unique per wave (a device numbers its images anew
    # after each wake-up); the device's own ACK timeout is 10 s
    opts = SimOptions(devices=devices, images=1, pictures=True, id_prefix=prefix, ack_timeout=10)
    with service(cmd, env, url, log) as proc:
        before = simulate(broker, opts)
        assert before.images_acked == devices, log.read_text()[-3000:]
        # the recording runs while Prefect is up: the baseline is stamped
        assert wait_until(lambda: unstamped(database_url, prefix) == 0, CATCH_UP_S, 1.0)

        waves: list[SimResult] = []
        with frozen(prefect):
            end = time.monotonic() + freeze_s
            while not waves or time.monotonic() < end:  # the fleet keeps waking up
                waves.append(simulate(broker, opts))
                assert proc.poll() is None, log.read_text()[-3000:]
            status, during = health(url)
        sent = sum(w.images_sent for w in waves)
        acked = sum(w.images_acked for w in waves)
        lat = [x for w in waves for x in w.ack_latencies]
        print(
            f"\nPrefect frozen: {len(waves)} waves, {sent} images from {devices} devices; "
            f"ACK p50 {_pct(lat, 0.5):.0f} ms p99 {_pct(lat, 0.99):.0f} ms (before the "
            f"freeze: p50 {_pct(before.ack_latencies, 0.5):.0f} ms p99 "
            f"{_pct(before.ack_latencies, 0.99):.0f} ms); recording backlog at SIGCONT "
            f"{during.get('record_pending')}"
        )
        assert status == 200 and during["ready"]  # still ready: Prefect is not its health
        assert acked == sent and sum(w.images_failed for w in waves) == 0
        assert sum(w.resends for w in waves) == 0  # no ACK waited past the device's timeout

        total = devices + sent
        assert rows(
            database_url,
            "select count(*) from captures where device_id like %s and ingest_status = 'stored'",
            prefix + "%",
        ) == [(total,)]
        caught_up = wait_until(lambda: unstamped(database_url, prefix) == 0, CATCH_UP_S, 1.0)
        _, after = health(url)
        assert caught_up, f"{unstamped(database_url, prefix)} captures never recorded: {after}"
        assert after["stats"]["record_dropped"] == 0
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_acks_flow_while_prefect_is_frozen(prefect, mosquitto, database_url, tmp_path):
    fleet_under_frozen_prefect(prefect, mosquitto, database_url, tmp_path, 20, freeze_s=0)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_hundred_devices_keep_their_acks_while_prefect_is_frozen_60s(
    prefect, mosquitto, database_url, tmp_path
):
    """The backlog built in 60 s (thousands of captures) is recorded in runs Prefect
    accepts (it refuses parameters over 512 KiB: recorder.RECORD_MAX_BYTES)."""
    fleet_under_frozen_prefect(prefect, mosquitto, database_url, tmp_path, 100, FREEZE_S)
