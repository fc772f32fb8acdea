"""Fleet report: devices, captures, triggers and errors, summarised with polars.

The story: read the window's raw rows from PostgreSQL, aggregate per device and per
day, find devices silent for longer than their schedule, then publish the tables as
Prefect artifacts and write them as Parquet and CSV (plus a captures-per-hour chart).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from camfleet import db, resolve

# A device is "silent" when it missed this many of its own expected intervals: one
# missed wake-up is jitter, two in a row is worth a look.
SILENT_AFTER_INTERVALS = 2
# Devices with no schedule are expected at least daily.
DEFAULT_EXPECTED_INTERVAL_S = 24 * 3600
LATENCY_PERCENTILES = (0.5, 0.95, 0.99)


def _frame(rows: list[tuple], schema: dict) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema, orient="row")


def read_rows(dsn: str, since: datetime) -> dict[str, pl.DataFrame]:
    """The report window's raw rows, one DataFrame per source table."""
    with db.transaction(dsn) as conn:
        q = db.queries
        return {
            "captures": _frame(
                list(q.report_captures(conn, since=since)),
                {
                    "device_id": pl.Utf8,
                    "source": pl.Utf8,
                    "ingest_status": pl.Utf8,
                    "evaluation_status": pl.Utf8,
                    "captured_at": pl.Datetime("us", "UTC"),
                    "created_at": pl.Datetime("us", "UTC"),
                    "image_bytes": pl.Int64,
                },
            ),
            "errors": _frame(
                list(q.report_errors(conn, since=since)),
                {
                    "device_id": pl.Utf8,
                    "error_code": pl.Int64,
                    "severity": pl.Utf8,
                    "occurred_at": pl.Datetime("us", "UTC"),
                },
            ),
            "nacks": _frame(
                list(q.report_nacks(conn, since=since)),
                {
                    "device_id": pl.Utf8,
                    "received_at": pl.Datetime("us", "UTC"),
                    "missing": pl.Int64,
                },
            ),
            "triggers": _frame(
                list(q.report_triggers(conn, since=since)),
                {
                    "device_id": pl.Utf8,
                    "trigger_type": pl.Utf8,
                    "status": pl.Utf8,
                    "created_at": pl.Datetime("us", "UTC"),
                    "sent_at": pl.Datetime("us", "UTC"),
                    "executed_at": pl.Datetime("us", "UTC"),
                },
            ),
            "devices": _frame(
                list(q.report_devices(conn)),
                {
                    "device_id": pl.Utf8,
                    "kind": pl.Utf8,
                    "status": pl.Utf8,
                    "last_seen_at": pl.Datetime("us", "UTC"),
                    "interval_seconds": pl.Int64,
                },
            ),
        }


# NO_CACHE on every task here: the rows change between calls, and the others write files
# and artifacts that a retried run must write again.
load_rows = task(
    read_rows,
    name="load-rows",
    retries=3,
    retry_delay_seconds=[1, 5, 15],
    cache_policy=NO_CACHE,
    persist_result=False,  # raw rows of a week: the report's files keep what matters
)


def summarise_captures(captures: pl.DataFrame) -> pl.DataFrame:
    """Per device and day: received, stored, failed, and ingest latency percentiles."""
    latency = (pl.col("created_at") - pl.col("captured_at")).dt.total_milliseconds() / 1000
    return (
        captures.with_columns(day=pl.col("created_at").dt.date(), latency_s=latency)
        .group_by("device_id", "day")
        .agg(
            received=pl.len(),
            stored=(pl.col("ingest_status") == "stored").sum(),
            failed=(pl.col("ingest_status") == "failed").sum(),
            evaluated=(pl.col("evaluation_status") == "completed").sum(),
            bytes=pl.col("image_bytes").sum(),
            **{
                f"latency_p{int(p * 100)}_s": pl.col("latency_s").quantile(p)
                for p in LATENCY_PERCENTILES
            },
        )
        .sort("day", "device_id")
    )


def summarise_errors(errors: pl.DataFrame, nacks: pl.DataFrame) -> pl.DataFrame:
    """Per device and day: NACK rounds and the count of each error code."""
    nack_counts = (
        nacks.with_columns(day=pl.col("received_at").dt.date())
        .group_by("device_id", "day")
        .agg(nack_rounds=pl.len(), chunks_requested=pl.col("missing").sum())
    )
    codes = (
        errors.with_columns(day=pl.col("occurred_at").dt.date(), code=pl.col("error_code"))
        .group_by("device_id", "day", "code")
        .agg(count=pl.len())
        .with_columns(codes=pl.format("{}×{}", "code", "count"))
        .group_by("device_id", "day")
        .agg(errors=pl.col("count").sum(), error_codes=pl.col("codes").sort().str.join(", "))
    )
    return (
        nack_counts.join(codes, on=["device_id", "day"], how="full", coalesce=True)
        .with_columns(
            pl.col("nack_rounds", "chunks_requested", "errors").fill_null(0),
            pl.col("error_codes").fill_null(""),
        )
        .sort("day", "device_id")
    )


def summarise_triggers(triggers: pl.DataFrame) -> pl.DataFrame:
    """Per device and day: triggers created and how each ended."""
    states = ["pending", "sent", "executed", "failed", "expired"]
    return (
        triggers.with_columns(day=pl.col("created_at").dt.date())
        .group_by("device_id", "day")
        .agg(created=pl.len(), **{s: (pl.col("status") == s).sum() for s in states})
        .sort("day", "device_id")
    )


def silent_devices(devices: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """Devices whose last contact is older than SILENT_AFTER_INTERVALS of their schedule."""
    expected = pl.col("interval_seconds").fill_null(DEFAULT_EXPECTED_INTERVAL_S)
    silent_for = (pl.lit(now) - pl.col("last_seen_at")).dt.total_seconds()
    return (
        devices.filter(pl.col("status") == "active")
        .with_columns(expected_interval_s=expected, silent_for_s=silent_for)
        .filter(
            pl.col("last_seen_at").is_null()
            | (pl.col("silent_for_s") > pl.col("expected_interval_s") * SILENT_AFTER_INTERVALS)
        )
        .select("device_id", "kind", "last_seen_at", "expected_interval_s", "silent_for_s")
        .sort("device_id")
    )


@task(cache_policy=NO_CACHE)
def captures_per_hour_chart(captures: pl.DataFrame, path: Path) -> Path | None:
    """A PNG line chart of captures per hour, one line per device (busiest 12)."""
    if captures.is_empty():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hourly = (
        captures.with_columns(hour=pl.col("created_at").dt.truncate("1h"))
        .group_by("device_id", "hour")
        .agg(n=pl.len())
        .sort("hour")
    )
    busiest = (
        hourly.group_by("device_id").agg(pl.col("n").sum()).sort("n", descending=True).head(12)
    )
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    for device in busiest["device_id"]:
        rows = hourly.filter(pl.col("device_id") == device)
        ax.plot(rows["hour"].to_list(), rows["n"].to_list(), marker="o", label=device)
    ax.set_title("Captures per hour per device")
    ax.set_ylabel("captures")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@task(cache_policy=NO_CACHE)
def write_files(tables: dict[str, pl.DataFrame], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in tables.items():
        for suffix, write in ((".parquet", frame.write_parquet), (".csv", frame.write_csv)):
            path = out_dir / f"{name}{suffix}"
            write(path)
            written.append(path)
    return written


@task(cache_policy=NO_CACHE)
def publish_artifacts(tables: dict[str, pl.DataFrame], out_dir: Path, chart: Path | None) -> None:
    for name, frame in tables.items():
        rows = frame.head(500).with_columns(pl.all().cast(pl.Utf8)).to_dicts()
        create_table_artifact(
            key=f"fleet-report-{name.replace('_', '-')}",
            table=rows,
            description=f"camfleet fleet report: {name.replace('_', ' ')}",
        )
    totals = tables["captures"].select(
        pl.col("received").sum(), pl.col("stored").sum(), pl.col("failed").sum()
    )
    received, stored, failed = totals.row(0) if totals.height else (0, 0, 0)
    silent = tables["silent_devices"].height
    lines = [
        "# camfleet fleet report",
        "",
        f"- captures received: **{received or 0}**, stored: **{stored or 0}**, "
        f"failed: **{failed or 0}**",
        f"- triggers created: **{tables['triggers']['created'].sum()}**, executed: "
        f"**{tables['triggers']['executed'].sum()}**",
        f"- errors: **{tables['errors']['errors'].sum()}**, NACK rounds: "
        f"**{tables['errors']['nack_rounds'].sum()}**",
        f"- silent devices: **{silent}**",
        "",
        f"Files: `{out_dir}` (Parquet and CSV)" + (f", chart: `{chart}`" if chart else ""),
    ]
    create_markdown_artifact(key="fleet-report", markdown="\n".join(lines))


def build_report(raw: dict[str, pl.DataFrame], now: datetime) -> dict[str, pl.DataFrame]:
    return {
        "captures": summarise_captures(raw["captures"]),
        "errors": summarise_errors(raw["errors"], raw["nacks"]),
        "triggers": summarise_triggers(raw["triggers"]),
        "silent_devices": silent_devices(raw["devices"], now),
    }


# Safe to re-run: it reads the database and rewrites its files and artifacts.
@flow(name="fleet-report", log_prints=True, retries=1, retry_delay_seconds=10, timeout_seconds=1800)
def fleet_report(
    days: int = 7, out_dir: str | None = None, database_block: str | None = None
) -> dict[str, int]:
    """Summarise the last `days` days of the fleet as artifacts, Parquet, CSV and a chart."""
    logger = get_run_logger()
    now = datetime.now(UTC)
    dsn = resolve.database_url(database_block)
    raw = load_rows(dsn, now - timedelta(days=days))
    tables = build_report(raw, now)
    _emit_silent_devices(tables["silent_devices"])
    target = Path(out_dir) if out_dir else _default_out_dir(now)
    write_files(tables, target)
    chart = captures_per_hour_chart(raw["captures"], target / "captures_per_hour.png")
    publish_artifacts(tables, target, chart)
    logger.info("fleet report written to %s", target)
    return {name: frame.height for name, frame in tables.items()}


def _emit_silent_devices(silent: pl.DataFrame) -> None:
    from tasks.events import emit_per_device

    pairs = [(d, d) for d in silent["device_id"].to_list()]
    emit_per_device("camfleet.device.silent", pairs, {"source": "fleet-report"})


def _default_out_dir(now: datetime) -> Path:
    from camfleet.settings import get_settings

    return get_settings().data_dir.resolve() / "reports" / now.strftime("%Y%m%dT%H%M%SZ")


if __name__ == "__main__":
    fleet_report()
