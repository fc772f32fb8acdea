"""`camfleet assembler --health-port`: GET /healthz (and /readyz) for a supervisor.

200 with a JSON body when the service is ready: subscribed (the broker's SUBACK came
back) and every worker thread alive; 503 otherwise.  A worker thread that dies makes
the process exit non-zero (services/assembler/__init__.py, EXIT_CRASHED), so this
endpoint never reports a half-dead process as healthy for long.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("camfleet.assembler")


class HealthServer:
    def __init__(self, host: str, port: int, status: Callable[[], dict]):
        self._status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/healthz", "/readyz"):
                    self.send_error(404)
                    return
                try:
                    body = outer._status()
                except Exception:  # a probe must never take the service down
                    log.exception("health status failed")
                    body = {"ready": False}
                data = json.dumps(body).encode()
                self.send_response(200 if body.get("ready") else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt, *args):  # probes every few seconds: not logged
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="assembler-health", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
