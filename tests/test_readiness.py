"""`camfleet up` prints "camfleet is up" only once a device sending then is served
(camfleet/readiness.py): every readiness URL answers 200 and leasing assembler replicas
hold every partition between them."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from camfleet.readiness import partitions_settled, wait_ready


def _replica(owned: int, pending: int = 0, total: int = 64) -> dict:
    return {
        "ready": True,
        "partitions": {"partitions": total, "owned_count": owned, "subscribe_pending": pending},
    }


def test_partitions_are_settled_when_every_one_is_held_and_shared_out():
    assert partitions_settled([{"ready": True}])  # one assembler, no leases
    assert not partitions_settled([_replica(64), _replica(0)])  # the second has nothing yet
    assert not partitions_settled([_replica(32), _replica(0)])  # 32 held by nobody
    assert not partitions_settled([_replica(32), _replica(32, pending=1)])  # SUBACK awaited
    assert partitions_settled([_replica(32), _replica(32)])
    assert partitions_settled([_replica(22), _replica(21), _replica(21)])


class _Service:
    """A readiness endpoint that answers 503 until `ready` is set, then 200 + body."""

    def __init__(self, body: dict):
        self.ready = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                ok = service.ready.is_set()
                data = json.dumps(body if ok else {"ready": False}).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/readyz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_wait_ready_waits_for_every_service_and_names_the_late_ones():
    api, first, second = _Service({}), _Service(_replica(32)), _Service(_replica(32))
    urls = {"api": api.url, "assembler": first.url, "assembler-2": second.url}
    try:
        api.ready.set()
        first.ready.set()
        assert wait_ready(urls, timeout=0.5) == ["assembler-2"]
        ticks = []

        def tick():  # the supervisor's turn; the late replica comes up meanwhile
            ticks.append(1)
            if len(ticks) == 3:
                second.ready.set()

        assert wait_ready(urls, tick=tick, timeout=30) == []
        assert len(ticks) == 3
    finally:
        for s in (api, first, second):
            s.close()


def test_wait_ready_waits_for_the_partitions_to_be_shared_out():
    first, second = _Service(_replica(64)), _Service(_replica(0))
    try:
        first.ready.set()
        second.ready.set()
        urls = {"assembler": first.url, "assembler-2": second.url}
        assert wait_ready(urls, timeout=0.5) == ["assembler partitions"]
    finally:
        first.close()
        second.close()
