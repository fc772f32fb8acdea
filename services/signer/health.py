"""A tiny HTTP health endpoint for a long-running service (`--health-port`).

`GET /live`: 200 while the service's threads are alive, else 503 (a supervisor
restarts it). `GET /ready`: 200 once it is subscribed (the broker's SUBACK arrived)
and live, else 503. The body is a short JSON object with the figures a supervisor or
an operator wants; nothing secret is in it. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("camfleet.health")


class HealthServer:
    def __init__(
        self,
        port: int,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        details: Callable[[], dict] = dict,
        host: str = "127.0.0.1",
    ) -> None:
        checks = {"/live": live, "/ready": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                check = checks.get(self.path.split("?", 1)[0])
                if check is None:
                    self._send(404, {"error": "not found"})
                    return
                try:
                    ok = bool(check())
                    body = {"ok": ok, **details()}
                except Exception as exc:  # a failing check is a failed check, not a 500
                    ok, body = False, {"ok": False, "error": type(exc).__name__}
                self._send(200 if ok else 503, body)

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # probes every few seconds: no log lines
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
