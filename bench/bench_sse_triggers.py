"""SSE command delivery: N devices holding streams on one `camfleet api` process.

What the baseline is the limit of: (baseline) is the dispatch lag of the API's
NOTIFY -> hub -> stream path with only 10 streams open at the same trigger rate, i.e.
the latency floor of one API process and PostgreSQL on this machine; the fleet figure is
that path with N streams. The load generators must not be the limit: triggers are
inserted by --inserters separate processes (default 2; in this process a psycopg2
thread shared the GIL with the asyncio client reading 10,000+ streams, so at higher
rates the client's read delay counted as dispatch lag), and every phase prints the
CPU of the API, PostgreSQL, the device client (this process) and the inserters, and
names the CPU-bound one. When the device client is at a full core, lags are an upper
bound of what the API does.

In one run, on a private PostgreSQL and one API process started as `camfleet api`
(access log off, pings every 30 s as in production):

  baseline   10 devices streaming, triggers at --rate/s for --seconds: dispatch lag
             (trigger row created -> command line read by the device) p50/p99
  fleet      N devices streaming (default 25,000), the same trigger rate: lag p50/p99,
             the API process's memory per connection, and executed/created when every
             device that gets a command uploads a capture (POST /v1/captures)

Each phase runs --repeat times (default 3) and the range is printed. Triggers are manual
rows inserted one per transaction at the fixed rate; the database announces each with
NOTIFY and the API's hub writes it to the stream. The devices are one asyncio client
process using raw asyncio streams (not an HTTP library per connection); uploads go
through a pool of 16 keep-alive connections. Everything shares the box's two cores:
the figures are a floor.

Targets (issue 20): 25,000 concurrent streams at <= 32 KiB each, dispatch lag p99
<= 1 s at 500 triggers/s, executed/created = 1.0.

    .venv/bin/python bench/bench_sse_triggers.py [--devices 25000] [--rate 500] \
        [--seconds 20] [--repeat 3] [--inserters 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchstat import CpuMeter, load_average, span  # noqa: E402

from camfleet import db  # noqa: E402
from camfleet.localsvc import PostgresInstance, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789abcdefghijklmnop"
BASELINE_DEVICES = 10
CONNECT_CONCURRENCY = 100  # connects in flight at once (the listen backlog is 2048)
UPLOAD_CONNECTIONS = 16


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def tiny_jpeg() -> bytes:
    out = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(out, "JPEG", quality=80)
    return out.getvalue()


class Fleet:
    """Device streams as raw asyncio connections; records when each command arrives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connected: set[str] = set()
        self.received: dict[str, float] = {}  # trigger_id -> monotonic-free wall time
        self.pings = 0
        self.errors = 0
        self.tasks: list[asyncio.Task] = []
        self.upload_queue: asyncio.Queue = asyncio.Queue()
        self.upload = False

    async def connect(self, device_id: str, ready: asyncio.Event | None = None) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(
                f"GET /v1/devices/{device_id}/commands HTTP/1.1\r\nHost: bench\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            await writer.drain()
            status = await reader.readline()
            if b" 200 " not in status:
                self.errors += 1
                writer.close()
                return
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            while True:
                line = await reader.readline()
                if not line:
                    break
                if not line.startswith(b"data: "):
                    continue  # chunk sizes, blank lines
                event = json.loads(line[6:])
                if event.get("event") == "connected":
                    self.connected.add(device_id)
                    if ready is not None:
                        ready.set()
                elif event.get("event") == "ping":
                    self.pings += 1
                elif event.get("cmd") == "capture":
                    self.received[event["trigger_id"]] = time.time()
                    if self.upload:
                        self.upload_queue.put_nowait((device_id, event["trigger_id"]))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.errors += 1
        finally:
            self.connected.discard(device_id)

    async def connect_many(self, device_ids: list[str]) -> float:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        t0 = time.perf_counter()

        async def one(dev: str) -> None:
            async with sem:
                ready = asyncio.Event()
                self.tasks.append(asyncio.create_task(self.connect(dev, ready)))
                try:
                    await asyncio.wait_for(ready.wait(), 60)
                except TimeoutError:
                    self.errors += 1

        await asyncio.gather(*(one(d) for d in device_ids))
        return time.perf_counter() - t0

    async def uploader(self, image_b64: str) -> None:
        """One keep-alive upload connection; reopened when the server closed it (the
        API drops connections idle for 60 s, e.g. during a long connect phase)."""
        reader = writer = None
        while True:
            device_id, trigger_id = await self.upload_queue.get()
            body = json.dumps(
                {
                    "device_id": device_id,
                    "trigger_id": trigger_id,
                    "image_base64": image_b64,
                    "trigger_label": "manual",
                    "metadata": {"bench": True},
                }
            ).encode()
            request = (
                b"POST /v1/captures HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            for attempt in range(3):
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.write(request)
                    await writer.drain()
                    status = await reader.readline()
                    if not status:
                        raise ConnectionResetError("closed by server")
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    await reader.readexactly(length)
                    if b" 201 " not in status:
                        self.errors += 1
                    break
                except (OSError, asyncio.IncompleteReadError):
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    if attempt == 2:
                        self.errors += 1
            self.upload_queue.task_done()


def insert_triggers(
    dsn: str, devices: list[str], rate: float, seconds: float, start_at: float | None = None
) -> dict:
    """Manual trigger rows at a fixed rate, one per transaction; returns id -> created.

    Runs in an inserter process; start_at (time.time()) lines several of them up.
    """
    created: dict[str, float] = {}
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    conn = db.connect(dsn)
    conn.autocommit = True
    interval = 1.0 / rate
    start = time.perf_counter()
    n = int(rate * seconds)
    with conn.cursor() as cur:
        for i in range(n):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            device = random.choice(devices)
            trigger_id = f"bench_{device}_{i}_{random.getrandbits(24):06x}"
            cur.execute(
                "INSERT INTO scheduled_triggers (trigger_id, device_id, trigger_type, expires_at)"
                " VALUES (%s, %s, 'manual', now() + interval '5 minutes')"
                " RETURNING extract(epoch FROM created_at)",
                (trigger_id, device),
            )
            created[trigger_id] = float(cur.fetchone()[0])
    achieved = n / (time.perf_counter() - start)
    conn.close()
    return {"created": created, "achieved_rate": achieved}


async def run_phase(fleet: Fleet, dsn: str, devices: list[str], rate: float, seconds: float):
    """Triggers from the inserter processes at `rate` in all; lag from each row's creation."""
    fleet.received.clear()
    n = len(INSERTERS["procs"])
    start_at = time.time() + 0.5
    jobs = [
        INSERTERS["pool"].apply_async(
            insert_triggers, (dsn, devices, rate / n, seconds, start_at + k / rate)
        )
        for k in range(n)
    ]
    results = [await asyncio.to_thread(j.get, seconds + 120) for j in jobs]
    created = {k: v for r in results for k, v in r["created"].items()}
    result = {"achieved_rate": sum(r["achieved_rate"] for r in results)}
    deadline = time.time() + 10
    while time.time() < deadline and not all(t in fleet.received for t in created):
        await asyncio.sleep(0.1)
    lags = [fleet.received[t] - c for t, c in created.items() if t in fleet.received]
    t0 = min(created.values())
    slices: dict[int, list[float]] = {}
    for t, c in created.items():
        if t in fleet.received:
            slices.setdefault(int((c - t0) // 5), []).append(fleet.received[t] - c)
    return {
        "slice_p99_ms": [round(percentile(v, 99) * 1000) for _, v in sorted(slices.items())],
        "created": len(created),
        "delivered": len(lags),
        "achieved_rate": result["achieved_rate"],
        "p50_ms": percentile(lags, 50) * 1000,
        "p99_ms": percentile(lags, 99) * 1000,
        "max_ms": max(lags) * 1000 if lags else float("nan"),
        "ids": list(created),
    }


INSERTERS: dict = {}  # "pool": the inserter processes, "procs": their psutil.Process


async def snapshot(trace_dir: Path, name: str):
    """Ask traced_api.py for a tracemalloc snapshot of the API process and load it."""
    import tracemalloc

    (trace_dir / f"{name}.req").touch()
    out = trace_dir / f"{name}.snap"
    for _ in range(1200):
        if out.exists():
            return tracemalloc.Snapshot.load(str(out))
        await asyncio.sleep(0.1)
    raise RuntimeError("the traced API wrote no snapshot in 120 s")


def print_memory_per_stream(idle, full, streams: int, top: int = 15) -> None:
    """Python heap the added streams hold, per stream, by allocating line and file."""
    diff = full.compare_to(idle, "lineno")
    traced = sum(d.size_diff for d in diff)
    print(
        f"tracemalloc: {traced / 2**20:.1f} MiB more Python heap for {streams} more streams: "
        f"{traced / max(streams, 1) / 1024:.1f} KiB per stream (RSS also holds C buffers)"
    )
    for d in diff[:top]:
        frame, n = d.traceback[0], max(streams, 1)
        print(
            f"  {d.size_diff / n:7.0f} B/stream  {d.count_diff / n:5.1f} blocks  "
            f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
        )
    by_file: dict[str, int] = {}
    for d in full.compare_to(idle, "filename"):
        name = d.traceback[0].filename.split("site-packages/")[-1]
        by_file[name] = by_file.get(name, 0) + d.size_diff
    biggest = sorted(by_file.items(), key=lambda x: -x[1])[:8]
    print("  by file: " + ", ".join(f"{n} {b / max(streams, 1):.0f} B" for n, b in biggest))


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def main_async(args) -> None:
    limit = raise_nofile()
    if args.devices + 200 > limit:
        print(f"open-file limit {limit} < devices; lowering --devices")
        args.devices = limit - 200
    with PostgresInstance(fast=True) as pg:
        dsn = pg.create_database("bench")
        db.migrate(dsn)
        with db.transaction(dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO devices (device_id, kind) SELECT 'B' || lpad(g::text, 5, '0'),"
                " 'visant' FROM generate_series(1, %s) g",
                (args.devices,),
            )
        # PostgreSQL's default 100 connections is plenty: the API uses a pool of 20.
        port = free_port()
        storage = Path(tempfile.mkdtemp(prefix="bench-sse-"))
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "CAMFLEET_SECRET_KEY": SECRET,
            "CAMFLEET_ALLOW_DEVICE_ID_ONLY": "true",
            "STORAGE_URL": storage.as_uri(),
            "PYTHONPATH": str(ROOT),
        }
        launcher = [sys.executable, "-m", "camfleet.cli"]
        if args.tracemalloc:  # where the memory per stream goes (slower: use fewer devices)
            trace_dir = Path(tempfile.mkdtemp(prefix="bench-sse-trace-"))
            env["CAMFLEET_TRACE_DIR"] = str(trace_dir)
            launcher = [sys.executable, str(ROOT / "bench" / "traced_api.py")]
        api = subprocess.Popen(
            [*launcher, "api", "--port", str(port)] + ["--log-level", "warning", "--no-access-log"],
            cwd=ROOT,
            env=env,
        )
        try:
            for _ in range(300):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5)
                    break
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
            devices = [f"B{i:05d}" for i in range(1, args.devices + 1)]
            fleet = Fleet(port)
            fleet.upload = True
            image_b64 = base64.b64encode(tiny_jpeg()).decode()
            uploaders = [
                asyncio.create_task(fleet.uploader(image_b64)) for _ in range(UPLOAD_CONNECTIONS)
            ]
            await asyncio.sleep(0.5)
            rss_idle = rss(api.pid)
            if args.tracemalloc:
                idle_snapshot = await snapshot(trace_dir, "idle")

            ctx = mp.get_context("spawn")
            INSERTERS["pool"] = pool = ctx.Pool(args.inserters)
            INSERTERS["procs"] = [psutil.Process(p.pid) for p in pool._pool]  # noqa: SLF001
            groups = {
                "api": api.pid,
                "postgres": pg.pid,
                "client": psutil.Process(),
                "inserters": INSERTERS["procs"],
            }

            async def phase(label, devs, i):
                with CpuMeter(groups, own_only=["client"]) as meter:
                    r = await run_phase(fleet, dsn, devs, args.rate, args.seconds)
                r["meter"] = meter
                print(
                    f"[{i + 1}] {label} {len(devs)} streams: lag p50 {r['p50_ms']:.0f} ms, "
                    f"p99 {r['p99_ms']:.0f} ms, {r['delivered']}/{r['created']} delivered, "
                    f"{r['achieved_rate']:.0f} triggers/s  {meter.line()}",
                    flush=True,
                )
                return r

            base_devices = devices[:BASELINE_DEVICES]
            await fleet.connect_many(base_devices)
            await run_phase(fleet, dsn, base_devices, args.rate, 2)  # warm-up, not counted
            bases = [await phase("baseline", base_devices, i) for i in range(args.repeat)]
            base = bases[-1]

            cpu_c0 = psutil.Process(api.pid).cpu_times()
            connect_s = await fleet.connect_many(devices[BASELINE_DEVICES:])
            cpu_c1 = psutil.Process(api.pid).cpu_times()
            connect_cpu = (cpu_c1.user + cpu_c1.system) - (cpu_c0.user + cpu_c0.system)
            await asyncio.sleep(2)
            rss_full = rss(api.pid)
            n_connected = len(fleet.connected)
            if args.tracemalloc:
                added = n_connected - len(base_devices)
                print_memory_per_stream(idle_snapshot, await snapshot(trace_dir, "full"), added)
            api_cpu0 = psutil.Process(api.pid).cpu_times()
            fulls = [await phase("fleet", devices, i) for i in range(args.repeat)]
            full = fulls[-1]
            api_cpu1 = psutil.Process(api.pid).cpu_times()
            pool.terminate()
            # let the last uploads land, then count executed among this phase's triggers
            try:
                await asyncio.wait_for(fleet.upload_queue.join(), 120)
            except TimeoutError:
                print("uploads did not drain within 120 s")
            await asyncio.sleep(0.5)
            with db.transaction(dsn) as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FILTER (WHERE status = 'executed'),"
                    " count(*) FILTER (WHERE capture_id IS NOT NULL)"
                    " FROM scheduled_triggers WHERE trigger_id = ANY(%s)",
                    ([t for f in fulls for t in f["ids"]],),
                )
                executed, linked = cur.fetchone()
                cur.execute("SELECT count(*) FROM device_connections")
                presence = cur.fetchone()[0]
            for t in uploaders:
                t.cancel()
            for t in fleet.tasks:
                t.cancel()
        finally:
            api.terminate()
            try:
                api.wait(15)
            except subprocess.TimeoutExpired:
                api.kill()

    per_conn = (rss_full - rss_idle) / max(n_connected, 1)
    cpu = (api_cpu1.user + api_cpu1.system) - (api_cpu0.user + api_cpu0.system)
    print()
    print(f"SSE command delivery, one API process, {os.cpu_count()} cores (shared with clients)")
    print(f"{'':34}{'baseline':>14}{'fleet':>14}{'ratio':>10}")
    print(f"{'devices streaming':34}{BASELINE_DEVICES:>14}{n_connected:>14}")
    print(f"{'triggers created':34}{base['created']:>14}{full['created']:>14}")
    print(
        f"{'trigger rate achieved (/s)':34}{base['achieved_rate']:>14.1f}"
        f"{full['achieved_rate']:>14.1f}"
    )
    print(f"{'delivered':34}{base['delivered']:>14}{full['delivered']:>14}")
    for key, label in (("p50_ms", "dispatch lag p50 (ms)"), ("p99_ms", "dispatch lag p99 (ms)")):
        ratio = full[key] / base[key] if base[key] else float("nan")
        print(f"{label:34}{base[key]:>14.1f}{full[key]:>14.1f}{ratio:>9.2f}x")
    print(f"{'dispatch lag max (ms)':34}{base['max_ms']:>14.1f}{full['max_ms']:>14.1f}")
    print(f"fleet lag p99 per 5 s slice (ms), last run: {full['slice_p99_ms']}")
    print(f"range (median) over {args.repeat} runs of each phase, load now {load_average()}:")
    for label, runs in (("baseline", bases), ("fleet", fulls)):
        print(
            f"  {label:<9} lag p50 {span((r['p50_ms'] for r in runs), '{:.0f}')} ms, "
            f"p99 {span((r['p99_ms'] for r in runs), '{:.0f}')} ms, "
            f"triggers/s {span((r['achieved_rate'] for r in runs), '{:.0f}')}"
        )
    print()
    print(
        f"connect {len(devices) - BASELINE_DEVICES} streams: {connect_s:.1f} s "
        f"({(len(devices) - BASELINE_DEVICES) / connect_s:.0f}/s), API CPU {connect_cpu:.1f} s "
        f"({1000 * connect_cpu / max(len(devices) - BASELINE_DEVICES, 1):.1f} ms per connect)"
    )
    print(
        f"API RSS idle {rss_idle / 2**20:.0f} MiB, with {n_connected} streams "
        f"{rss_full / 2**20:.0f} MiB: {per_conn / 1024:.1f} KiB per connection"
    )
    print(f"presence rows (device_connections): {presence}")
    fleet_s = args.repeat * args.seconds
    created = sum(f["created"] for f in fulls)
    print(
        f"API CPU during the fleet phases: {cpu:.1f} s over {fleet_s:.0f} s of triggers "
        f"({100 * cpu / fleet_s:.0f}% of one core)"
    )
    print(
        f"executed/created (fleet phases): {executed}/{created} = "
        f"{executed / max(created, 1):.3f}; captures linked: {linked}"
    )
    print(f"pings received: {fleet.pings}; client-side errors: {fleet.errors}")
    worst = max(f["p99_ms"] for f in fulls)
    ok = worst <= 1000 and n_connected >= 25_000 and per_conn <= 32 * 1024 and args.rate >= 500
    print(f"target (25,000 streams <= 32 KiB, p99 <= 1 s at 500/s): {'met' if ok else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=25_000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--inserters", type=int, default=2, help="trigger-inserting processes")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also print where the API's memory per stream goes (tracemalloc; slower)",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
