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
