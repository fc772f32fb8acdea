"""The local service instances start, answer, survive kill()+restart(), and clean up."""

from __future__ import annotations

import os
import queue
import shutil
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import paramiko
import psutil
import psycopg2
import pytest
from botocore.exceptions import EndpointConnectionError

from camfleet.localsvc import (
    LocalService,
    MosquittoInstance,
    PostgresInstance,
    PrefectServerInstance,
    S3Instance,
    ServiceStartError,
    SshdInstance,
    free_port,
    port_open,
)

# ---- helpers -------------------------------------------------------------------------


def assert_gone(procs: list[psutil.Process]) -> None:
    """Every process is gone (a zombie waiting for PID 1 to reap it counts as gone)."""
    for p in procs:
        try:
            assert p.status() == psutil.STATUS_ZOMBIE, f"left behind: {p}"
        except psutil.NoSuchProcess:
            pass


def mqtt_client(broker: MosquittoInstance, client_id: str | None = None, clean=True):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
        clean_session=clean,
    )
    if broker.tls:
        c.tls_set(
            ca_certs=str(broker.ca_file),
            certfile=str(broker.client_cert),
            keyfile=str(broker.client_key),
        )
    if broker.username:
        c.username_pw_set(broker.username, broker.password)
    return c


def mqtt_connect(client: mqtt.Client, broker: MosquittoInstance) -> queue.Queue:
    """Connect and start the network loop; returns a queue of received messages."""
    received: queue.Queue = queue.Queue()
    connected: queue.Queue = queue.Queue()
    client.on_message = lambda c, u, msg: received.put((msg.topic, msg.payload))
    client.on_connect = lambda c, u, flags, rc, props: connected.put(rc)
    client.connect(broker.host, broker.port, keepalive=10)
    client.loop_start()
    rc = connected.get(timeout=10)
    assert not rc.is_failure, rc
    return received


def mqtt_subscribe(client: mqtt.Client, topic: str) -> None:
    """Subscribe at QoS 1 and wait for the broker's SUBACK."""
    acked: queue.Queue = queue.Queue()
    client.on_subscribe = lambda c, u, mid, reason_codes, props: acked.put(reason_codes)
    client.subscribe(topic, qos=1)
    codes = acked.get(timeout=10)
    assert not any(rc.is_failure for rc in codes), codes


def mqtt_round_trip(broker: MosquittoInstance) -> None:
    c = mqtt_client(broker)
    received = mqtt_connect(c, broker)
    topic = f"test/{uuid.uuid4().hex}"
    try:
        mqtt_subscribe(c, topic)
        c.publish(topic, b"ping", qos=1).wait_for_publish(5)
        assert received.get(timeout=10) == (topic, b"ping")
    finally:
        c.disconnect()
        c.loop_stop()


def pg_answers(dsn: str) -> bool:
    conn = psycopg2.connect(dsn, connect_timeout=3)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)
    finally:
        conn.close()


def sftp_connect(server: SshdInstance, key_path: Path | None = None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(server.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        server.host,
        server.port,
        username=server.username,
        key_filename=str(key_path or server.client_key_path),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return client


def sftp_round_trip(server: SshdInstance, key_path: Path | None = None) -> None:
    client = sftp_connect(server, key_path)
    try:
        hostkey = client.get_transport().get_remote_server_key()
        assert hostkey.fingerprint == server.host_key_fingerprint
        sftp = client.open_sftp()
        remote = f"{server.root}/{uuid.uuid4().hex}.bin"
        data = uuid.uuid4().bytes * 1000
        with sftp.open(remote, "wb") as f:
            f.write(data)
        with sftp.open(remote, "rb") as f:
            assert f.read() == data
        sftp.remove(remote)
    finally:
        client.close()


def s3_round_trip(server: S3Instance) -> None:
    name = server.create_bucket(f"rt-{uuid.uuid4().hex[:12]}")
    client = server.client()
    client.put_object(Bucket=name, Key="a/b.jpg", Body=b"jpeg bytes")
    assert client.get_object(Bucket=name, Key="a/b.jpg")["Body"].read() == b"jpeg bytes"


def prefect_answers(server: PrefectServerInstance) -> None:
    import httpx

    assert httpx.get(f"{server.api_url}/health", timeout=5).json() is True


def check_lifecycle(svc: LocalService, answers, while_down=None, after_restart=None) -> None:
    """start -> answers -> kill -> down -> restart on the same port -> answers -> stop."""
    svc.start()
    port = svc.port
    answers()
    procs = svc.processes()
    assert svc.pid in [p.pid for p in procs]

    svc.kill()
    assert not svc.running
    assert_gone(procs)
    assert not port_open(svc.host, port)
    if while_down:
        while_down()

    svc.restart()
    assert svc.port == port
    if after_restart:
        after_restart()
    answers()

    procs = svc.processes()
    svc.stop()
    assert_gone(procs)
    assert not port_open(svc.host, port)


# ---- helpers of the package ----------------------------------------------------------


def test_free_port_hands_out_distinct_bindable_ports():
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert not any(port_open("127.0.0.1", p, timeout=0.1) for p in ports)
    # Below the ephemeral range, where client sockets take their local ports.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(p < low for p in ports)


def test_start_failure_reports_log_tail(mosquitto):
    # The session broker holds its port: a second broker there must fail clearly.
    other = MosquittoInstance(port=mosquitto.port)
    with pytest.raises(ServiceStartError, match="already in use"):
        other.start()
    other.close()


def test_exit_during_start_shows_log(tmp_path):
    broker = MosquittoInstance()
    broker._prepare()
    broker._prepared = True
    broker.conf_path.write_text("no_such_option 1\n")
    with pytest.raises(ServiceStartError, match="no_such_option"):
        broker.start()
    broker.close()


def test_run_cli_fixture(run_cli):
    assert run_cli(["echo", "hi"]).stdout == "hi\n"
    with pytest.raises(subprocess.CalledProcessError, match="boom"):
        run_cli(["sh", "-c", "echo boom >&2; exit 3"])
    assert run_cli(["sh", "-c", "exit 3"], check=False).returncode == 3


# ---- PostgreSQL ----------------------------------------------------------------------


def test_postgres_session_instance(postgres):
    assert postgres.dsn == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    conn = psycopg2.connect(postgres.dsn)
    with conn.cursor() as cur:
        cur.execute("SHOW fsync")
        assert cur.fetchone() == ("off",)
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone() == ("127.0.0.1",)
    conn.close()


def test_postgres_create_and_drop_database(postgres):
    dsn = postgres.create_database("scratch_db")
    assert dsn.endswith("/scratch_db") and pg_answers(dsn)
    copy = postgres.create_database("scratch_copy", template="scratch_db")
    assert pg_answers(copy)
    postgres.drop_database("scratch_copy")
    postgres.drop_database("scratch_db")
    with pytest.raises(psycopg2.OperationalError):
        pg_answers(dsn)
    with pytest.raises(ValueError):
        postgres.create_database("bad; DROP")


def test_database_url_is_fresh_and_migrated(database_url, postgres):
    from camfleet import db

    assert db.pending_migrations(database_url) == []
    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE only_in_this_test (x int)")
    conn.commit()
    conn.close()


def test_database_url_is_per_test(database_url):
    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('only_in_this_test')")
        assert cur.fetchone() == (None,)
    conn.close()


def test_postgres_kill_restart_keeps_committed_data():
    # Not fast: with fsync/synchronous_commit off a killed postmaster may lose commits.
    with PostgresInstance() as pg:
        conn = psycopg2.connect(pg.dsn)
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        conn.close()
        check_lifecycle(pg, lambda: pg_answers(pg.dsn))
        pg.start()
        conn = psycopg2.connect(pg.dsn)
        with conn.cursor() as cur:
            cur.execute("SELECT x FROM t")
            assert cur.fetchall() == [(42,)]
        conn.close()


def test_postgres_reuses_given_data_dir():
    base = Path(tempfile.mkdtemp(prefix="camfleet-test-pgdata-"))
    base.chmod(0o711)  # the postgres user (when we are root) must traverse it
    data_dir = base / "pgdata"
    try:
        with PostgresInstance(data_dir=data_dir, fast=True) as pg:
            pg.create_database("kept")
        assert (data_dir / "PG_VERSION").exists()
        with PostgresInstance(data_dir=data_dir, fast=True) as pg:
            assert pg_answers(pg.dsn_for("kept"))
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to `postgres`")
def test_postgres_explains_untraversable_data_dir(tmp_path):
    # pytest's tmp_path lives under a 0700 root-owned directory.
    pg = PostgresInstance(data_dir=tmp_path / "pgdata", fast=True)
    with pytest.raises(ServiceStartError, match="postgres user cannot traverse"):
        pg.start()
    pg.close()


# ---- Mosquitto -----------------------------------------------------------------------


def test_mosquitto_round_trip(mosquitto):
    assert mosquitto.host == "127.0.0.1" and not mosquitto.tls
    mqtt_round_trip(mosquitto)


def test_mosquitto_tls_round_trip(mosquitto_tls):
    assert mosquitto_tls.url.startswith("mqtts://127.0.0.1:")
    mqtt_round_trip(mosquitto_tls)


def test_mosquitto_tls_refuses_wrong_password(mosquitto_tls):
    c = mqtt_client(mosquitto_tls)
    c.username_pw_set(mosquitto_tls.username, "wrong")
    with pytest.raises(AssertionError):
        mqtt_connect(c, mosquitto_tls)
    c.disconnect()
    c.loop_stop()


def test_mosquitto_tls_requires_client_certificate(mosquitto_tls):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.tls_set(ca_certs=str(mosquitto_tls.ca_file))
    c.username_pw_set(mosquitto_tls.username, mosquitto_tls.password)
    with pytest.raises((ssl.SSLError, OSError)):
        c.connect(mosquitto_tls.host, mosquitto_tls.port)
        # TLS 1.3: the server's rejection of the missing certificate arrives on first read
        for _ in range(20):
            if c.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                raise OSError("connection dropped")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_mosquitto_lifecycle(tls):
    with MosquittoInstance(tls=tls, password=tls) as broker:
        check_lifecycle(broker, lambda: mqtt_round_trip(broker))


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_mosquitto_restart_keeps_qos1_session(how):
    with MosquittoInstance() as broker:
        sub = mqtt_client(broker, client_id="persistent-sub", clean=False)
        mqtt_connect(sub, broker)
        mqtt_subscribe(sub, "cam/+/img")
        sub.disconnect()
        sub.loop_stop()

        pub = mqtt_client(broker)
        mqtt_connect(pub, broker)
        published_at = time.time()
        pub.publish("cam/1/img", b"queued while offline", qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()

        if how == "stop":
            broker.stop()
        else:
            # A crash keeps what the last periodic save wrote: wait for a save after the
            # publish (its timing stretches on a loaded machine), then kill.
            saved = broker.data_dir / "mosquitto.db"
            deadline = time.monotonic() + 30
            while not (saved.exists() and saved.stat().st_mtime > published_at + 0.01):
                assert time.monotonic() < deadline, "mosquitto never saved its state"
                time.sleep(0.1)
            broker.kill()
        broker.start()

        sub = mqtt_client(broker, client_id="persistent-sub", clean=False)
        received = mqtt_connect(sub, broker)
        try:
            assert received.get(timeout=10) == ("cam/1/img", b"queued while offline")
        finally:
            sub.disconnect()
            sub.loop_stop()


# ---- sshd ----------------------------------------------------------------------------


def test_sshd_sftp_round_trip(sshd, run_cli):
    sftp_round_trip(sshd)
    sftp_round_trip(sshd, sshd.client_rsa_key_path)
    out = run_cli(["ssh-keygen", "-lf", f"{sshd.host_key_path}.pub"]).stdout
    assert out.split()[1] == sshd.host_key_fingerprint
    assert sshd.known_hosts_path.read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")


def test_sshd_rejects_unknown_host_key(sshd, tmp_path):
    other = SshdInstance()  # keys only, never started: a different host key
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {other.host_public_key}\n")
    other.close()
    client = paramiko.SSHClient()
    client.load_host_keys(str(tmp_path / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(
            sshd.host,
            sshd.port,
            username=sshd.username,
            key_filename=str(sshd.client_key_path),
            look_for_keys=False,
            allow_agent=False,
        )
    client.close()


def test_sshd_lifecycle_drops_live_sessions():
    with SshdInstance() as server:
        server.start()
        client = sftp_connect(server)
        sftp = client.open_sftp()
        session_procs = server.processes()
        assert len(session_procs) >= 2  # the listener and the connection's process
        check_lifecycle(server, lambda: sftp_round_trip(server))
        assert_gone(session_procs)
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            sftp.listdir(str(server.root))
        client.close()


# ---- S3 (moto) -----------------------------------------------------------------------


def test_s3_round_trip(s3, bucket):
    client = s3.client()
    client.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["k"]


def test_s3_lifecycle_loses_state_on_restart():
    def down():
        with pytest.raises(EndpointConnectionError):
            server.client().list_buckets()

    def restarted_empty():
        # moto keeps everything in memory: a restarted server is empty (documented).
        assert server.client().list_buckets()["Buckets"] == []

    with S3Instance() as server:
        check_lifecycle(
            server, lambda: s3_round_trip(server), while_down=down, after_restart=restarted_empty
        )


# ---- Prefect -------------------------------------------------------------------------


def test_prefect_server_on_postgres_lifecycle(postgres):
    dsn = postgres.create_database(f"prefect_{uuid.uuid4().hex[:8]}")
    server = PrefectServerInstance(database_url=dsn)
    assert server.database_url.startswith("postgresql+asyncpg://")
    try:
        check_lifecycle(server, lambda: prefect_answers(server))
    finally:
        server.close()
    postgres.drop_database(dsn.rsplit("/", 1)[1])


def test_prefect_api_url_fixture(prefect_api_url):
    import httpx

    assert prefect_api_url.startswith("http://127.0.0.1:")
    assert os.environ["PREFECT_API_URL"] == prefect_api_url
    assert httpx.get(f"{prefect_api_url}/health", timeout=5).json() is True
