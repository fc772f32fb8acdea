"""prune-device-logs on the publish log: N old rows among N newer ones, deleted in
committed batches (flows/maintenance.py prune_rows, the deployment's code path),
beside one unbatched DELETE of the same rows in the same run.

On a private PostgreSQL with fsync on (each batch's commit is flushed, as in
production), device_publish_log is filled with N rows 10 days old and N rows 1 day
old (chunk-log payloads like the assembler's), analysed, then:

  batched     prune_rows(cutoff = 7 days ago): PRUNE_BATCH rows per DELETE + COMMIT
  baseline    DELETE FROM device_publish_log WHERE received_at < cutoff (one statement)

The baseline is what a naive retention job would do: its statement holds the row
locks of all N rows and one transaction open until it ends, and leaves N dead tuples
at once. Printed per round: wall time, rows/s, the longest batch (how long one batch
held its locks), the CPU of this process and PostgreSQL, and the VACUUM that then
removes the dead rows (autovacuum's work, the same for both). Each round refills the
table (TRUNCATE + INSERT), so both start from the same state.

    .venv/bin/python bench/bench_prune.py [--rows 200000] [--rounds 3] [--batch 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from benchstat import CpuMeter, load_average, span  # noqa: E402

from camfleet import db  # noqa: E402
from camfleet.localsvc import PostgresInstance  # noqa: E402
from flows import maintenance  # noqa: E402

FILL = """
TRUNCATE device_publish_log;
INSERT INTO device_publish_log (device_id, topic, direction, payload, received_at)
SELECT d, 'ESP32CAM/' || d || '/data', 'in',
       jsonb_build_object('image_name', 'img_' || (i / 45) || '.jpg', 'chunk_id', mod(i, 45),
                          'total_chunks', 45, 'size', 1024),
       now() - %(age)s - make_interval(secs => (%(n)s - i) * 0.5)
FROM generate_series(1, %(n)s) AS i,
     LATERAL (SELECT 'AABBCC' || lpad(to_hex(mod(i, 4096)), 6, '0') AS d) AS dev;
"""


def fill(dsn: str, rows: int) -> None:
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        cur.execute(FILL, {"n": rows, "age": timedelta(days=10)})
        cur.execute(FILL.split(";", 1)[1], {"n": rows, "age": timedelta(days=1)})
    conn = db.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE device_publish_log")
    conn.close()


def count(dsn: str, cutoff: datetime) -> tuple[int, int]:
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FILTER (WHERE received_at < %(c)s),"
            " count(*) FILTER (WHERE received_at >= %(c)s) FROM device_publish_log",
            {"c": cutoff},
        )
        return cur.fetchone()


def batched(dsn: str, cutoff: datetime, batch: int) -> tuple[int, list[float]]:
    times: list[float] = []

    def timed(conn, **params):
        t0 = time.perf_counter()
        n = db.queries.prune_publish_log_batch(conn, **params)
        conn.commit()  # inside prune_rows' `with conn`: timed with the commit it pays
        times.append(time.perf_counter() - t0)
        return n

    deleted = maintenance.prune_rows(dsn, timed, cutoff, max_deletes=10**9, batch=batch)
    return deleted, times


def vacuum(dsn: str) -> float:
    """What autovacuum then spends removing the dead rows and their index entries."""
    conn = db.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            t0 = time.perf_counter()
            cur.execute("VACUUM device_publish_log")
            return time.perf_counter() - t0
    finally:
        conn.close()


def unbatched(dsn: str, cutoff: datetime) -> int:
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM device_publish_log WHERE received_at < %s", (cutoff,))
        return cur.rowcount


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000, help="old rows (and as many newer)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=maintenance.PRUNE_BATCH)
    args = ap.parse_args()
    with PostgresInstance() as pg:  # fsync on: commits cost what they cost in production
        dsn = pg.create_database("bench_prune")
        db.migrate(dsn)
        cutoff = datetime.now(UTC) - timedelta(days=7)
        fill(dsn, args.rows)
        with db.transaction(dsn) as conn, conn.cursor() as cur:
            sql = db.queries.prune_publish_log_batch.sql
            cur.execute("EXPLAIN " + sql, {"cutoff": cutoff, "batch": args.batch})
            plan = "\n    ".join(r[0] for r in cur.fetchall())
            cur.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('device_publish_log')),"
                " current_setting('shared_buffers'), current_setting('fsync')"
            )
            size, buffers, fsync = cur.fetchone()
        print(
            f"old rows {args.rows:,} among {args.rows:,} newer, batch {args.batch:,}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {load_average()}\n"
            f"table with indexes {size}, shared_buffers {buffers}, fsync {fsync}\n"
            f"plan of one batch:\n    {plan}"
        )
        groups = {"bench": psutil.Process(), "postgres": pg.pid}
        results: dict[str, list[float]] = {"batched": [], "baseline": [], "vacuum": []}
        for r in range(args.rounds):
            fill(dsn, args.rows)
            with CpuMeter(groups, own_only=["bench"]) as meter:
                t0 = time.perf_counter()
                deleted, times = batched(dsn, cutoff, args.batch)
                wall = time.perf_counter() - t0
            assert deleted == args.rows and count(dsn, cutoff) == (0, args.rows)
            results["batched"].append(wall)
            print(
                f"  round {r + 1} batched   {wall:6.2f} s  {deleted / wall:9,.0f} rows/s  "
                f"{len(times)} batches, median {statistics.median(times) * 1000:5.0f} ms, "
                f"longest {max(times) * 1000:5.0f} ms | {meter.line()}"
            )
            results["vacuum"].append(vacuum(dsn))
            fill(dsn, args.rows)
            with CpuMeter(groups, own_only=["bench"]) as meter:
                t0 = time.perf_counter()
                deleted = unbatched(dsn, cutoff)
                wall = time.perf_counter() - t0
            assert deleted == args.rows and count(dsn, cutoff) == (0, args.rows)
            results["baseline"].append(wall)
            print(
                f"  round {r + 1} baseline  {wall:6.2f} s  {deleted / wall:9,.0f} rows/s  "
                f"1 statement holding all {deleted:,} row locks for {wall * 1000:,.0f} ms"
                f" | {meter.line()}"
            )
        ratio = statistics.median(results["batched"]) / statistics.median(results["baseline"])
        print(
            f"batched  {span(results['batched'], '{:.2f}')} s; "
            f"baseline {span(results['baseline'], '{:.2f}')} s; ratio {ratio:.2f}x;"
            f" VACUUM after the batched prune {span(results['vacuum'], '{:.2f}')} s"
        )


if __name__ == "__main__":
    main()
