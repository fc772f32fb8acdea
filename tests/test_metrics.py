"""Prometheus metrics of the services: the assembler's counters move while a simulated
ESP32 fleet sends images (real Mosquitto and PostgreSQL, scraped over HTTP)."""

from __future__ import annotations

import re
import uuid

import httpx

from camfleet import metrics
from camfleet.localsvc import free_port
from camfleet.simulators.esp32 import SimOptions, simulate
from services.assembler import AssemblerService, ServiceConfig
from tests.test_mqtt_ingest import FAST, broker_block


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
