"""Several `camfleet assembler` replicas on one Mosquitto (issue 15): device partitions
leased in PostgreSQL (services/assembler/partitions.py).

Real processes on a private broker and a fresh database; simulated ESP32-CAMs
(camfleet.simulators.esp32) that resend an unACKed image like the firmware.  A replica
is SIGKILLed mid-stream: every image must still be ACKed and stored exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections import Counter

import pytest

from blocks.mqtt import MqttBroker
from camfleet import db
from camfleet.localsvc import MosquittoInstance, free_port
from camfleet.simulators.esp32 import SimOptions, device_id, simulate
from services.assembler.partitions import (
    MAX_PENDING_WILLS,
    PartitionLeases,
    fair_share,
    partition_of,
)
from tests import helpers
from tests.helpers import rows

PARTITIONS = 16
# Timing of the replicas (milliseconds, as the settings take them) and of the devices:
# a device resends an unACKed image after ACK_TIMEOUT_S, as often as it takes here.
# The seed's retransmit delay; a capture timeout well past the device's resend, as in
# the seed (60 s), so that chunks held early are completed by the resent metadata.  (With
# a 1 s delay a loaded machine NACKs chunks that are merely late, and the device's
# answers arrive after the image is done: stray chunks, then a 2201 error row.)
REPLICA_ENV = {"CAPTURE_TIMEOUT_MS": "20000", "RETRANSMIT_DELAY_MS": "3000", "RETRANSMIT_MAX": "3"}
ACK_TIMEOUT_S = 8.0


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None, {}


def wait_for(fn, timeout=90, step=0.2):
    """helpers.wait_for with the longer default of processes sharing partitions out."""
    return helpers.wait_for(fn, timeout, step)


def register(dsn, prefix, n):
    """A registered fleet (`devices` rows), as replicas subscribe to known devices."""
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "insert into devices (device_id) values (%s) on conflict do nothing",
            [(device_id(prefix, i),) for i in range(n)],
        )


class Replica:
    """One `camfleet assembler --partitions P --replica-id ID` process."""

    def __init__(self, name, broker, dsn, storage, log_dir, partitions=PARTITIONS, extra_env=None):
        self.name = name
        self.health_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            REPLICA_ENV,
            MQTT_HOST=broker.host,
            MQTT_PORT=str(broker.port),
            DATABASE_URL=dsn,
            STORAGE_URL=storage,
            MQTT_CLIENT_ID=f"asm-{uuid.uuid4().hex[:6]}",
            PYTHONUNBUFFERED="1",
            **(extra_env or {}),
        )
        self.log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "camfleet.cli", "assembler", "--no-prefect",
             "--partitions", str(partitions), "--replica-id", name,
             "--health-port", str(self.health_port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def health(self) -> dict:
        status, body = _get(f"http://127.0.0.1:{self.health_port}/healthz")
        return body if status == 200 else {}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def balanced(replicas, partitions=PARTITIONS, devices=0):
    """Health of every replica once they hold every partition between them, each at
    most its fair share, subscribed (SUBACK) to the data of `devices` registered ones
    between them; else None."""
    bodies = [r.health() for r in replicas]
    if not all(b.get("ready") for b in bodies):
        return None
    subs = [b["partitions"] for b in bodies]
    if any(s["subscribe_pending"] for s in subs):
        return None
    if sum(s["device_subscriptions"] for s in subs) < devices:
        return None
    owned = [set(b["partitions"]["owned"]) for b in bodies]
    share = fair_share(partitions, len(replicas))
    if set().union(*owned) != set(range(partitions)) or sum(map(len, owned)) != partitions:
        return None
    if any(len(o) > share or b["partitions"]["live_replicas"] != len(replicas)
           for o, b in zip(owned, bodies, strict=True)):  # fmt: skip
        return None
    return bodies


class AckMonitor:
    """Counts every ACK_OK the replicas publish, per (device, image)."""

    def __init__(self, broker: MqttBroker):
        self.acks: Counter = Counter()
        ready = threading.Event()
        self.c = broker.client(client_id=f"ackmon-{uuid.uuid4().hex[:6]}")
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe("ESP32CAM/+/ack", qos=1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert ready.wait(15)

    def _on_message(self, c, u, m):
        body = json.loads(m.payload)
        if "ACK_OK" in body:
            self.acks[(m.topic.split("/")[1], body["image_name"])] += 1

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def replica_set(database_url, tmp_path):
    started: list[Replica] = []
    with MosquittoInstance() as m:
        broker = MqttBroker(host=m.host, port=m.port)
        storage = f"file://{tmp_path / 'objects'}"

        def start(n, env=None):
            new = [
                Replica(f"r{len(started) + i + 1}", broker, database_url, storage, tmp_path,
                        extra_env=env)
                for i in range(n)
            ]  # fmt: skip
            started.extend(new)
            return new

        try:
            yield broker, start
        finally:
            for r in started:
                r.stop()


def captures(dsn):
    return rows(
        dsn,
        "select device_id, device_capture_id, ingest_status, sha256 from captures",
    )


def check_stored_once(dsn, result):
    got = captures(dsn)
    keys = [(d, c) for d, c, _, _ in got]
    assert len(keys) == len(set(keys)), "a capture row was written twice"
    stored = {(d, c): sha for d, c, status, sha in got if status == "stored"}
    import hashlib

    want = {k: hashlib.sha256(v).hexdigest() for k, v in result.sent.items()}
    assert stored == want, "every image sent is stored once with its bytes, nothing else"


# ----------------------------------------------------------------------------------------


def test_partition_of_is_stable_and_spreads_devices():
    ids = [device_id("A0B0C0", i) for i in range(1000)]
    counts = Counter(partition_of(d, 64) for d in ids)
    assert partition_of("A0B0C0000001", 64) == partition_of("A0B0C0000001", 64)
    assert set(counts) == set(range(64)) and max(counts.values()) < 3 * 1000 / 64
    assert fair_share(64, 3) == 22 and fair_share(64, 1) == 64


def test_camfleet_up_starts_n_replicas_with_partitions_and_own_metrics_ports():
    from camfleet.commands.up import SERVICES, assembler_replicas

    metrics = {"assembler": 9101}
    assert assembler_replicas(1, metrics) == [SERVICES[0]]  # today's single assembler
    three = assembler_replicas(3, metrics)
    assert [name for name, _, _ in three] == ["assembler", "assembler-2", "assembler-3"]
    for k, (_, _, args) in enumerate(three, start=1):
        assert args[args.index("--replica-id") + 1] == f"up-{k}"
        assert args[args.index("--partitions") + 1] == "64"
    fmt = {"m_assembler": "9101", "h_assembler": "9201"}  # up formats replica 1's
    argv = [[a.format(**fmt) for a in args] for _, _, args in three]
    for flag, first in (("--metrics-port", "9101"), ("--health-port", "9201")):
        ports = [a[a.index(flag) + 1] for a in argv]
        assert ports[0] == first and len(set(ports)) == 3
    assert len(metrics) == 3  # every replica's metrics port is scraped
    health: dict[str, int] = {}
    assembler_replicas(2, {}, health)
    assert list(health) == ["assembler-2"]  # `up` waits on it (replica 1: {h_assembler})


def test_leases_split_partitions_and_lapsed_ones_are_claimed(database_url):
    lost: dict[str, list] = {"a": [], "b": []}
    kw = dict(ttl_s=3.0, interval_s=0.5, margin_s=0.5)
    a = PartitionLeases(database_url, "a", 8, on_lost=lost["a"].append, **kw)
    b = PartitionLeases(database_url, "b", 8, on_lost=lost["b"].append, **kw)
    a.prepare()
    a.round()
    assert a.owned() == frozenset(range(8))  # alone: everything
    b.prepare()
    b.round()  # b is live now, but a still holds every partition
    assert b.owned() == frozenset()
    a.round()  # a sees two live replicas: releases 4 idle partitions at once
    assert len(a.owned()) == 4 and lost["a"] == [frozenset(range(8)) - a.owned()]
    b.round()
    assert b.owned() == frozenset(range(8)) - a.owned()
    assert all(b.owns(d) != a.owns(d) for d in (device_id("D", i) for i in range(50)))
    # a stops renewing (as if SIGKILLed): b claims a's partitions once they lapse
    assert wait_for(lambda: (b.round(), len(b.owned()) == 8)[1], timeout=30)
    assert not a.valid()  # a's own fence had ended its use of them first
    c = PartitionLeases(database_url, "c", 16)
    with pytest.raises(Exception, match="same number"):
        c.prepare()
    for leases in (a, b, c):
        leases.stop(release=False)


def test_a_will_frees_a_replicas_leases_once_its_database_session_is_closed(database_url):
    # a lease TTL far beyond the test's waits: only the will can move a's partitions
    kw = dict(ttl_s=300.0, interval_s=0.5, margin_s=0.5)
    a = PartitionLeases(database_url, "a", 8, **kw)
    b = PartitionLeases(database_url, "b", 8, **kw)
    for leases in (a, b, a, b):
        leases.prepare()
        leases.round()
    assert len(a.owned()) == 4 and len(b.owned()) == 4
    # a will for a replica whose lease session is open (a forged will, or a's broker
    # connection blipped): nothing moves; b's own id and junk are ignored outright
    b.reap("a")
    b.reap("b")
    b.reap("x" * 300)
    for i in range(300):  # a flood of invented ids: bounded, and gone after one round
        b.reap(f"invented-{i}")
    assert len(b._gone) == MAX_PENDING_WILLS
    b.round()
    assert len(b.owned()) == 4 and a.round() is None and len(a.owned()) == 4
    assert set(b._gone) == {"a"}  # a is live: checked again until its TTL has passed
    # a dies: its database session closes; the will (held until a's TTL) now frees a's
    # partitions and b takes all of them in its next round
    a._close()
    b.round()
    assert b.owned() == frozenset(range(8)), b.status()
    assert b.status()["reaped_total"] == 4 and b.live_replicas == 1
    # a replica whose broker connection dropped uses nothing until a round confirms it
    b.suspend()
    assert b.owned() == frozenset() and not b.owns(device_id("D", 1))
    b.round()
    assert b.owned() == frozenset(range(8))
    for leases in (a, b):
        leases.stop(release=False)


def test_a_failing_will_check_does_not_cost_the_round_that_renews_our_leases(
    database_url, monkeypatch
):
    from services.assembler import partitions

    b = PartitionLeases(database_url, "b", 8, ttl_s=300.0, interval_s=0.5, margin_s=0.5)
    b.prepare()
    b.round()
    assert b.owned() == frozenset(range(8))
    monkeypatch.setattr(partitions, "_GONE_CHECK", "SELECT no_such_column FROM pg_class")
    b.reap("a")
    b.round()  # the check fails inside its savepoint; the renewal commits all the same
    assert b.owned() == frozenset(range(8)) and b.failed_rounds == 0 and not b._reaping()
    b.stop(release=False)


def test_a_killed_replicas_devices_move_on_its_will_not_its_lease_ttl(replica_set, database_url):
    broker, start = replica_set
    devices = 8
    register(database_url, "W1LL", devices)
    # leases that would outlive every wait below: failover must come from the will
    replicas = start(2, env={"CAMFLEET_ASSEMBLER_LEASE_TTL_S": "600"})
    assert wait_for(lambda: balanced(replicas, devices=devices)), [r.health() for r in replicas]
    victim, survivor = replicas
    victim.kill()
    assert wait_for(lambda: balanced([survivor], devices=devices), timeout=60), survivor.health()
    assert survivor.health()["partitions"]["reaped_total"] == PARTITIONS // 2
    # and the survivor serves every device, the victim's included
    result = simulate(
        broker,
        SimOptions(devices=devices, images=2, id_prefix="W1LL", ack_timeout=ACK_TIMEOUT_S),
    )
    assert result.images_acked == devices * 2 and result.images_failed == 0
    check_stored_once(database_url, result)


def test_three_replicas_ack_and_store_each_image_once(replica_set, database_url):
    broker, start = replica_set
    register(database_url, "5EA1", 24)
    replicas = start(3)
    bodies = wait_for(lambda: balanced(replicas, devices=24))
    assert bodies, [r.health() for r in replicas]
    mon = AckMonitor(broker)
    opts = SimOptions(devices=24, images=3, id_prefix="5EA1", ack_timeout=60, clients=3)
    result = simulate(broker, opts)
    assert result.images_acked == 72 and result.images_failed == 0
    assert result.resends == 0  # registered devices: every image reached its owner
    assert wait_for(lambda: len(mon.acks) == 72, timeout=30)
    mon.close()
    assert set(mon.acks.values()) == {1}, "an image was ACKed by two replicas"
    check_stored_once(database_url, result)
    assert rows(database_url, "select count(*) from device_errors")[0][0] == 0
    # each replica served its own devices only: ACKs and decoded messages split
    owned = {r.name: set(b["partitions"]["owned"]) for r, b in zip(replicas, bodies, strict=True)}
    per_replica = Counter()
    for (dev, _name), _n in mon.acks.items():
        (who,) = [n for n, parts in owned.items() if partition_of(dev, PARTITIONS) in parts]
        per_replica[who] += 1
    final = {r.name: r.health()["stats"] for r in replicas}
    assert {n: s["acks"] for n, s in final.items() if s["acks"]} == dict(per_replica)
    total = sum(s["messages"] for s in final.values())
    for s in final.values():
        assert s["messages"] < total * 0.75, "a replica decoded other replicas' messages"


def test_a_new_device_is_learnt_from_its_status_and_served(replica_set, database_url):
    broker, start = replica_set
    replicas = start(3)
    assert wait_for(lambda: balanced(replicas)), [r.health() for r in replicas]
    # unregistered: no replica subscribed to their data until their status arrives; an
    # image published before the owner's SUBACK comes back with the device's resend
    opts = SimOptions(devices=4, images=2, id_prefix="0EE0", ack_timeout=3, max_resends=20)
    result = simulate(broker, opts)
    assert result.images_acked == 8 and result.images_failed == 0
    check_stored_once(database_url, result)
    subs = sum(r.health()["partitions"]["device_subscriptions"] for r in replicas)
    assert subs == 4


def test_a_status_seen_only_by_another_replica_still_reaches_the_devices_owner(
    replica_set, database_url
):
    """A new device's status reaches replicas that do not serve it (the partition's
    owner was reconnecting, or not yet started): they write its `devices` row, so the
    owner subscribes to its data from the registry and its resends are served."""
    broker, start = replica_set
    with db.connect(database_url) as conn, conn.cursor() as cur:  # held elsewhere for now
        cur.execute(
            "insert into assembler_partition_leases (partition, owner, lease_until) "
            "select p, 'elsewhere', now() + interval '1 hour' from generate_series(0, %s) p",
            (PARTITIONS - 1,),
        )
    (bystander,) = start(1)
    assert wait_for(lambda: bystander.health().get("ready")), bystander.health()
    assert bystander.health()["partitions"]["owned_count"] == 0
    dev = device_id("0B5E", 7)
    client = broker.client(client_id=f"dev-{uuid.uuid4().hex[:6]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(f"ESP32CAM/{dev}/status", json.dumps({"status": "Alive"}), qos=1)
        info.wait_for_publish(15)
    finally:
        client.disconnect()
        client.loop_stop()
    assert wait_for(lambda: rows(database_url, "select 1 from devices where device_id = %s", dev))
    # the partitions' holder goes; a replica that never saw the status takes them
    bystander.stop()
    with db.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("update assembler_partition_leases set owner = null, lease_until = '-infinity'")
    (owner,) = start(1)
    assert wait_for(lambda: balanced([owner], devices=1)), owner.health()
    opts = SimOptions(devices=8, images=1, id_prefix="0B5E", ack_timeout=3, max_resends=20)
    result = simulate(broker, opts)
    assert result.images_acked == 8 and result.images_failed == 0


def _kill_mid_stream(replica_set, database_url, devices, images):
    broker, start = replica_set
    register(database_url, "C1A5", devices)
    replicas = start(3)
    assert wait_for(lambda: balanced(replicas, devices=devices)), [r.health() for r in replicas]
    mon = AckMonitor(broker)
    opts = SimOptions(
        devices=devices, images=images, id_prefix="C1A5", ack_timeout=ACK_TIMEOUT_S,
        max_resends=20, clients=4,
    )  # fmt: skip
    out = {}
    sim = threading.Thread(target=lambda: out.setdefault("r", simulate(broker, opts)))
    sim.start()
    # SIGKILL the replica holding the first device's partition once images flow
    victim = next(
        r for r in replicas
        if partition_of(device_id("C1A5", 0), PARTITIONS) in r.health()["partitions"]["owned"]
    )  # fmt: skip
    first = devices * images // 4
    assert wait_for(lambda: len(captures(database_url)) >= first, timeout=120)
    victim.kill()
    survivors = [r for r in replicas if r is not victim]
    sim.join(600)
    assert not sim.is_alive()
    result = out["r"]
    total = devices * images
    assert result.images_acked == total and result.images_failed == 0
    # the monitor's copies of the last ACKs may still be on their way
    assert wait_for(lambda: set(mon.acks) == set(result.sent), timeout=30)
    mon.close()
    # an image is ACKed again only when its device resent it (the ACK was lost with
    # the victim or came after the device's timeout): never by two replicas at once
    assert sum(mon.acks.values()) <= total + result.resends
    check_stored_once(database_url, result)
    errs = rows(database_url, "select device_id, error_code, message, details from device_errors")
    assert errs == []
    # the survivors hold every partition between them
    assert wait_for(lambda: balanced(survivors, devices=devices)), [r.health() for r in survivors]
    return result


def test_sigkill_of_one_replica_loses_nothing_and_stores_nothing_twice(replica_set, database_url):
    result = _kill_mid_stream(replica_set, database_url, devices=12, images=6)
    assert result.resends >= 1  # the victim's devices were served from their resends


@pytest.mark.slow
def test_sigkill_with_100_devices(replica_set, database_url):
    _kill_mid_stream(replica_set, database_url, devices=100, images=3)
