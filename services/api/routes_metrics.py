"""`GET /metrics` (Prometheus text format) and the middleware that counts requests.

The metrics live in camfleet/metrics.py. The endpoint is unauthenticated like
`/health`: it carries counts and timings, no device ids, keys or paths; put it behind
the proxy's allow-list when the API is exposed beyond the host.

The middleware is plain ASGI, not `@app.middleware("http")`: Starlette's
BaseHTTPMiddleware re-wraps every response body, which costs the ingest hot path time
and holds SSE streams in an extra task.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Response

from camfleet import metrics

router = APIRouter(tags=["meta"])


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


class RequestMetrics:
    """Counts requests by route template and status, times them, tracks SSE streams."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before the response started is a 500
        sse = False

        async def send_counted(message) -> None:
            nonlocal status, sse
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        sse = True
                        metrics.SSE_CONNECTIONS.inc()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if sse:
                metrics.SSE_CONNECTIONS.dec()
            route = metrics.route_label(scope)
            if route != "/metrics":
                method = scope["method"]
                metrics.API_LATENCY.labels(method, route).observe(time.perf_counter() - start)
                metrics.API_REQUESTS.labels(method, route, str(status)).inc()
                if status == 429:
                    metrics.RATE_LIMIT_REFUSALS.labels(route).inc()


def setup(app: FastAPI) -> None:
    app.add_middleware(RequestMetrics)
