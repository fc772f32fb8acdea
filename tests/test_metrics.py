"""Prometheus metrics of the services: the assembler's counters move while a simulated
ESP32 fleet sends images (real Mosquitto and PostgreSQL, scraped over HTTP)."""

from __future__ import annotations

import re
import time
import uuid

import httpx

from camfleet import metrics
from camfleet.localsvc import free_port
from camfleet.simulators.esp32 import SimOptions, simulate
from services.assembler import AssemblerService, ServiceConfig
from tests.helpers import wait_for
from tests.test_mqtt_ingest import FAST, Device, broker_block


def value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_assembler_metrics_move_with_the_fleet(mosquitto, database_url, tmp_path):
    broker = broker_block(mosquitto)
    cfg = ServiceConfig(
        database_url=database_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        timing=FAST,
        client_id=f"asm-{uuid.uuid4().hex[:8]}",
        use_prefect=False,
    )
    svc = AssemblerService(broker, cfg)
    port = free_port()
    server, _thread = metrics.expose_assembler(svc, port)
    svc.start()
    try:
        assert svc.wait_connected(20)
        url = f"http://127.0.0.1:{port}/metrics"
        before = httpx.get(url, timeout=10).text
        assert value(before, "camfleet_assembler_acks_total") == 0
        r = simulate(broker, SimOptions(devices=2, images=2, id_prefix="0E0E00"))
        assert r.images_acked == 4
        after = httpx.get(url, timeout=10).text
        assert value(after, "camfleet_assembler_acks_total") == 4
        assert value(after, "camfleet_assembler_messages_total") > 8
        assert 'camfleet_assembler_ack_latency_seconds{quantile="0.99"}' in after
        assert "camfleet_assembler_inbox_depth" in after
        assert "process_resident_memory_bytes" in after
        # errors by code: a hostile JSON (2101) and a bad base64 chunk (2103)
        bad_json = 'camfleet_assembler_errors_total{code="2101"}'
        bad_b64 = 'camfleet_assembler_errors_total{code="2103"}'
        d = Device(broker, "0E0E00FFFFFF")
        try:
            d.pub(None, raw="{not json")
            d.meta("x.jpg", b"\xff" * 1500)
            d.chunk("x.jpg", b"\xff" * 1500, 0, payload="!!notbase64!!")

            def counted():
                text = httpx.get(url, timeout=10).text
                return text if value(text, bad_b64) > value(before, bad_b64) else None

            scraped = wait_for(counted)
            assert scraped, "the 2103 error was never counted"
        finally:
            d.close()
        assert value(scraped, bad_json) >= value(before, bad_json) + 1
        assert value(scraped, bad_b64) >= value(before, bad_b64) + 1
    finally:
        svc.stop(timeout=30)
        server.shutdown()
        for c in list(metrics.REGISTRY._collector_to_names):  # noqa: SLF001
            if isinstance(c, metrics.ServiceStatsCollector):
                metrics.REGISTRY.unregister(c)


def test_api_counts_rate_limit_refusals_by_route(database_url, tmp_path):
    from fastapi.testclient import TestClient

    from camfleet.storage.local import LocalStore
    from services.api.app import create_app
    from services.api.ratelimit import RateLimits

    app = create_app(
        database_url=database_url,
        secret_key=b"metrics-secret-0123456789abcdef0123",
        processing_runs=None,
        store=LocalStore(tmp_path),
        rate_limits=RateLimits(activate_fail="2/minute"),
    )
    name = 'camfleet_api_rate_limited_total{route="/devices/activate"}'
    with TestClient(app) as c:
        before = value(c.get("/metrics").text, name)
        codes = [
            c.post("/devices/activate", json={"pairing_code": "ZZZZZZZZ"}).status_code
            for _ in range(4)
        ]
        assert codes.count(429) == 2
        assert value(c.get("/metrics").text, name) == before + 2


def test_api_exposes_trigger_dispatch_lag_by_transport():
    """A trigger handed to a device's SSE stream 5 s after it was due shows that wait."""
    import asyncio
    import time

    from services.api.command_hub import CommandHub

    count = "camfleet_api_trigger_dispatch_lag_seconds_count"
    total = "camfleet_api_trigger_dispatch_lag_seconds_sum"

    def scrape() -> tuple[float, float]:
        text = metrics.exposition()[0].decode()  # what GET /metrics serves
        return value(text, count + '{transport="sse"}'), value(text, total + '{transport="sse"}')

    async def deliver_late() -> tuple[str, str]:
        hub = CommandHub("", None)  # no database needed: the stream is local
        stream = hub.subscribe("LAGDEVICE01")
        hub._schedule("LAGDEVICE01", "trig-1", "capture", time.time() - 5)  # noqa: SLF001
        return await asyncio.wait_for(stream.queue.get(), 10)

    n0, s0 = scrape()
    assert asyncio.run(deliver_late()) == ("trig-1", "capture")
    n1, s1 = scrape()
    assert n1 == n0 + 1
    assert s1 - s0 >= 5


def test_up_passes_free_metrics_ports_to_assembler_and_signer():
    """`camfleet up` gives the assembler and the signer a --metrics-port: the API's port
    + 1 / + 2 when free, another free port when that one is taken."""
    import socket

    from camfleet.commands.up import SERVICES, metrics_ports

    argv = {name: args for name, _module, args in SERVICES}
    assert argv["assembler"][-2:] == ["--metrics-port", "{m_assembler}"]
    assert argv["signer"][-2:] == ["--metrics-port", "{m_signer}"]
    api_port = free_port()
    with socket.socket() as held:  # another program on API port + 1
        try:
            held.bind(("127.0.0.1", api_port + 1))
            held.listen()
        except OSError:
            pass  # already taken by someone else: just as good
        ports = metrics_ports(api_port)
        assert ports["assembler"] != api_port + 1
        assert len({api_port, *ports.values()}) == 3
        for port in ports.values():
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))  # free for the service to bind


def test_signer_metrics_serve_its_counts_and_queue_depth(mosquitto, database_url, tmp_path):
    """`camfleet signer --metrics-port` (as `camfleet up` now runs it) answers a scrape;
    its queue is a FairInbox, whose depth is its length."""
    from camfleet.storage.local import LocalStore
    from services.signer import Signer

    signer = Signer(
        LocalStore(tmp_path), database_url, broker_block(mosquitto), client_id="s-metrics"
    )
    port = free_port()
    server, _thread = metrics.expose_signer(signer, port)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "camfleet_signer_requests_total 0.0" in text
        assert "camfleet_signer_queue_depth 0.0" in text
    finally:
        server.shutdown()
        for c in list(metrics.REGISTRY._collector_to_names):  # noqa: SLF001
            if isinstance(c, metrics.ServiceStatsCollector):
                metrics.REGISTRY.unregister(c)


def _unregister_collectors() -> None:
    for c in list(metrics.REGISTRY._collector_to_names):  # noqa: SLF001
        if isinstance(c, metrics.ServiceStatsCollector | metrics.PartitionCollector):
            metrics.REGISTRY.unregister(c)


def _owned(text: str, partitions: int) -> set[int]:
    return {
        p
        for p in range(partitions)
        if value(text, f'camfleet_assembler_partition_owned{{partition="{p}"}}') == 1
    }


def test_assembler_replica_metrics_show_the_partitions_it_leases(mosquitto, database_url, tmp_path):
    """An assembler replica (`--partitions 8`) alone leases all 8; a second replica
    joins (its leases driven here): /metrics shows half of them handed over."""
    from services.assembler.partitions import PartitionLeases

    cfg = ServiceConfig(
        database_url=database_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        timing=FAST,
        client_id=f"asm-{uuid.uuid4().hex[:8]}",
        use_prefect=False,
        partitions=8,
        replica_id="metrics-r1",
    )
    svc = AssemblerService(broker_block(mosquitto), cfg)
    port = free_port()
    server, _thread = metrics.expose_assembler(svc, port)
    other = PartitionLeases(database_url, "metrics-r2", 8)
    svc.start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def scrape_when(ok):
            text = httpx.get(url, timeout=10).text
            return text if ok(text) else None

        alone = wait_for(lambda: scrape_when(lambda t: _owned(t, 8) == set(range(8))), 60)
        assert alone, httpx.get(url, timeout=10).text[-2000:]
        assert value(alone, "camfleet_assembler_partitions_owned") == 8
        assert value(alone, "camfleet_assembler_partitions") == 8
        assert value(alone, "camfleet_assembler_live_replicas") == 1
        assert value(alone, "camfleet_assembler_lease_valid_seconds") > 0
        other.prepare()

        def halves(text):
            other.round()  # the second replica's lease round, as its own thread would
            mine = _owned(text, 8)
            return len(mine) == 4 and mine.isdisjoint(other.owned()) and other.owned()

        shared = wait_for(lambda: scrape_when(halves), 60)
        assert shared, (httpx.get(url, timeout=10).text[-2000:], other.owned())
        assert value(shared, "camfleet_assembler_live_replicas") == 2
        assert value(shared, "camfleet_assembler_partitions_owned") == 4
        assert value(shared, "camfleet_assembler_partitions_lost_total") >= 4
    finally:
        other.stop(release=True)
        svc.stop(timeout=30)
        server.shutdown()
        _unregister_collectors()


def test_signer_metrics_count_grants_claimed_and_leases_lost(mosquitto, database_url, tmp_path):
    """A signer replica takes over an open grant whose holder stopped renewing
    (`claimed`); another instance then holds it and the upload arrives: this one does
    not record it (`lease_lost`). Both counters as /metrics serves them."""
    import hashlib

    from camfleet import db
    from camfleet.protocol import edge_batch as eb
    from camfleet.storage.local import LocalStore
    from services.signer import Signer
    from services.signer.leases import Leases

    serial, name, data = "ENTO-MLEASE", "lease.jpg", b"\xff\xd8lease-metrics\xff\xd9"
    key = f"edge/{serial}/{name}"
    with db.transaction(database_url) as conn:
        grant = eb.Grant(
            serial=serial,
            name=name,
            key=key,
            max_bytes=len(data),
            expires_at=time.time() + 300,
            request_id="r-metrics",
            declared_size=len(data),
            declared_sha256=hashlib.sha256(data).hexdigest(),
        )
        Leases("signer-gone", lease_s=0.5).issue(conn, serial, True, [grant])  # then it died
    store = LocalStore(tmp_path / "objects")
    signer = Signer(
        store,
        database_url,
        broker_block(mosquitto),
        client_id="s-lease-metrics",
        share_group="camfleet-signer",
        lease_s=1.5,
    )
    port = free_port()
    server, _thread = metrics.expose_signer(signer, port)
    url = f"http://127.0.0.1:{port}/metrics"

    def counted(name_, at_least=1):
        text = httpx.get(url, timeout=10).text
        return text if value(text, name_) >= at_least else None

    try:
        text = httpx.get(url, timeout=10).text
        assert "# HELP camfleet_signer_claimed_total open grants taken over" in text
        assert value(text, "camfleet_signer_lease_lost_total") == 0
        signer.start()
        claimed = wait_for(lambda: counted("camfleet_signer_claimed_total"), 60)
        assert claimed, "the expired grant was never taken over"
        # Another instance holds the grant now (a device asked again, it answered).
        with db.transaction(database_url) as conn, conn.cursor() as cur:
            cur.execute(
                "update edge_upload_grants set leased_by = 'signer-other',"
                " lease_expires_at = now() + interval '1 hour'"
                " where device_id = %s and file_name = %s",
                (serial, name),
            )
        store.put(key, data)  # the device's upload arrives
        lost = wait_for(lambda: counted("camfleet_signer_lease_lost_total"), 60)
        assert lost, "the grant held elsewhere was not counted as lost"
        assert value(lost, "camfleet_signer_verified_total") == 0  # not recorded here
    finally:
        signer.stop()
        server.shutdown()
        _unregister_collectors()
