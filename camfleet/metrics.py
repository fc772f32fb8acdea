"""Prometheus metrics of camfleet's long-running services (prometheus-client).

One module declares every metric, so names and labels stay consistent across the API,
the assembler and the signer and the Grafana dashboard (docs/grafana-camfleet.json)
can rely on them. Each service exposes the default registry, which also carries the
client library's process metrics (resident memory, CPU, open files):

- the device API serves it at `GET /metrics` (services/api/routes_metrics.py);
- the assembler and the signer call `start_metrics_server(port)` once at start, which
  serves the same registry on its own loopback port in a daemon thread.

Label values are bounded sets (route templates, status codes, error codes, device
kinds), never device ids or URLs: a metric per device would grow without limit.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

# --- device API ---------------------------------------------------------------------
API_REQUESTS = Counter(
    "camfleet_api_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
API_LATENCY = Histogram(
    "camfleet_api_request_seconds",
    "HTTP request handling time",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RATE_LIMIT_REFUSALS = Counter(
    "camfleet_api_rate_limited_total", "Requests refused by a rate limit (429)", ["route"]
)
SSE_CONNECTIONS = Gauge("camfleet_api_sse_connections", "Open SSE command streams")
TRIGGER_DISPATCH_LAG = Histogram(
    "camfleet_api_trigger_dispatch_lag_seconds",
    "From a trigger's scheduled time to its hand-off to the device (SSE stream or MQTT)",
    ["transport"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 3600),
)
CONSOLE_THUMBNAILS = Counter(
    "camfleet_console_thumbnails_total", "Thumbnails made by the console", ["outcome"]
)

# --- MQTT assembler and edge signer: their own `stats`, see ServiceStatsCollector -------
ASSEMBLER_ERRORS = Counter(
    "camfleet_assembler_errors_total",
    "Errors the assembler recorded, by protocol error code (2101-2205)",
    ["code"],
)


def count_assembler_error(code: object) -> None:
    """One recorded error. Codes outside the assembler's own table (a hostile or
    device-made number) count as 'other', so the label set stays bounded."""
    from camfleet.protocol.assembler import DESCRIPTION

    ASSEMBLER_ERRORS.labels(str(code) if code in DESCRIPTION else "other").inc()


# --- fleet health (flows/fleet_health.py) ------------------------------------------------
FLEET_DEVICES = Gauge("camfleet_fleet_devices", "Devices by health", ["health"])


def route_label(scope) -> str:
    """The matched route template ('/v1/devices/{device_id}'), never the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def exposition() -> tuple[bytes, str]:
    """The default registry in the text format, with its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def start_metrics_server(port: int, host: str = "127.0.0.1"):
    """Serve /metrics for a service without an HTTP server of its own (daemon thread)."""
    server, thread = start_http_server(port, addr=host)
    return server, thread


class ServiceStatsCollector:
    """Exposes a running service's own `stats` (a dict or a dataclass of counts) as
    Prometheus counters, read at scrape time: no change to the service's hot path.

    `camfleet_<service>_<name>_total` for every numeric stat; `gauges` maps extra gauge
    names to callables (queue depths, backlog bytes); `latencies` maps a name to a
    callable returning recent durations in seconds, exposed as p50/p99 gauges.
    """

    def __init__(self, service: str, stats, gauges=None, latencies=None, helps=None) -> None:
        self.service, self.stats = service, stats
        self.gauges, self.latencies = gauges or {}, latencies or {}
        self.helps = helps or {}  # name -> help text (else "<service> <name>")

    def _help(self, name: str) -> str:
        return self.helps.get(name, f"{self.service} {name}")

    def _values(self) -> dict:
        stats = self.stats() if callable(self.stats) else self.stats
        items = stats.items() if isinstance(stats, dict) else vars(stats).items()
        return {k: v for k, v in items if isinstance(v, int | float) and not isinstance(v, bool)}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, value in sorted(self._values().items()):
            yield CounterMetricFamily(
                f"camfleet_{self.service}_{name}", self._help(name), value=value
            )
        for name, read in self.gauges.items():
            yield GaugeMetricFamily(
                f"camfleet_{self.service}_{name}", self._help(name), value=read()
            )
        for name, read in self.latencies.items():
            recent = sorted(read())
            family = GaugeMetricFamily(
                f"camfleet_{self.service}_{name}_seconds",
                f"{self.service} {name}, recent quantiles",
                labels=["quantile"],
            )
            for q in (0.5, 0.99):
                value = recent[min(len(recent) - 1, int(q * len(recent)))] if recent else 0.0
                family.add_metric([str(q)], value)
            yield family


def expose_service(
    service: str, port: int, stats, gauges=None, latencies=None, host="127.0.0.1", helps=None
):
    """Register a service's stats and serve /metrics on `port` (0 picks a free one)."""
    REGISTRY.register(ServiceStatsCollector(service, stats, gauges, latencies, helps))
    return start_metrics_server(port, host)


class PartitionCollector:
    """An assembler replica's device partitions (`--partitions P`, services/assembler/
    partitions.py), read at scrape time from its leases' and subscriptions' status:

    - `camfleet_assembler_partition_owned{partition}`: 1 for each partition this replica
      leases now, 0 for the others (P series, P bounded by the flag: 64 by default);
      summed over replicas, every partition is 1 once failover is done;
    - gauges: partitions owned, partitions in all, live replicas, device subscriptions,
      seconds left on the leases; counters: partitions gained and lost, lease rounds
      that failed (the database was unreachable).
    """

    def __init__(self, leases, subs) -> None:
        self.leases, self.subs = leases, subs

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = {**self.leases.status(), **self.subs.status()}
        owned = set(status["owned"])
        family = GaugeMetricFamily(
            "camfleet_assembler_partition_owned",
            "1 while this replica leases the device partition",
            labels=["partition"],
        )
        for partition in range(status["partitions"]):
            family.add_metric([str(partition)], 1.0 if partition in owned else 0.0)
        yield family
        for name, key, text in (
            ("partitions_owned", "owned_count", "device partitions this replica leases"),
            ("partitions", "partitions", "device partitions of the fleet (--partitions)"),
            ("live_replicas", "live_replicas", "assembler replicas alive (heartbeats)"),
            ("device_subscriptions", "device_subscriptions", "devices whose data it takes"),
            ("lease_valid_seconds", "lease_valid_s", "seconds its leases may still be used"),
        ):
            yield GaugeMetricFamily(f"camfleet_assembler_{name}", text, value=status[key])
        for name, key, text in (
            ("partitions_gained", "gained_total", "partitions leased after another's"),
            ("partitions_lost", "lost_total", "partitions given up or lapsed"),
            ("lease_rounds_failed", "failed_rounds", "lease rounds the database failed"),
        ):
            yield CounterMetricFamily(f"camfleet_assembler_{name}", text, value=status[key])


def expose_assembler(service, port: int):
    """`camfleet assembler --metrics-port`: messages, batches, ACKs, NACKs, db errors,
    inbox depth, backlog bytes and last-chunk-to-ACK latency; for a replica
    (`--partitions`), the partitions it leases (PartitionCollector)."""
    if getattr(service, "leases", None) is not None:
        REGISTRY.register(PartitionCollector(service.leases, service.subs))
    return expose_service(
        "assembler",
        port,
        lambda: dict(service.stats),
        gauges={
            "inbox_depth": service.inbox.qsize,
            "backlog_bytes": lambda: service._backlog_bytes,  # noqa: SLF001
        },
        latencies={"ack_latency": lambda: list(service._finalize_to_ack)[-1000:]},  # noqa: SLF001
    )


SIGNER_HELPS = {
    # grant leases of signer replicas (services/signer/leases.py)
    "claimed": "open grants taken over: at start, or from an instance whose lease expired",
    "lease_lost": "watched grants another instance holds now (verified there, not here)",
}


def expose_signer(signer, port: int):
    """`camfleet signer --metrics-port`: requests, refused, granted, verified, failed,
    published, handed off, grants claimed and leases lost (replicas), and its request
    queue depth."""
    return expose_service(
        "signer",
        port,
        signer.stats,
        # FairInbox (services/signer/limits.py): its length is the queued requests
        gauges={"queue_depth": lambda: len(signer._inbox)},  # noqa: SLF001
        helps=SIGNER_HELPS,
    )
