"""Lifelog device API throughput: upload-url + ingest pairs/s on one `camfleet api` process.

In one run, on private loopback services (PostgreSQL, moto's S3 server) and one API
process started as `camfleet api` (access log off):

  baseline     GET /health pairs/s: the same client, connections and concurrency against
               the same process; the HTTP floor of this box (two requests per "pair")
  api pairs    POST /devices/upload-url + POST /devices/ingest per photo, objects
               already in storage (so the object PUT, which goes straight to storage,
               is not in the API's figure); ingest HEADs the object in S3 (boto3 in a
               thread pool) as in production
  no HEAD      the same with the existence check off: what the HEAD costs
  local store  the same against the local store (`camfleet up`'s default storage),
               whose existence check is a stat(): the API's own rate, check on
  HEAD alone   boto3 head_object to moto: sequential and with 8 threads
  end to end   the simulator's full path (upload-url, streamed PUT to S3, ingest) with
               10% of ingests re-sent as lost-answer retries: photos/s, per-endpoint
               p99, duplicates answered, mismatches, 5xx count

What the baseline is the limit of: /health pairs are what one API process can answer
on this machine when it does nothing per request, i.e. the HTTP floor of uvicorn +
the app's middleware; the api phases' ratio to it is what the endpoints' own work
costs. The load generator must not be the limit: the client is a minimal keep-alive
HTTP/1.1 client on asyncio, run in --clients processes (default 2, each with a slice
of the devices and concurrency/clients connections), and each phase prints the CPU of
the API, the clients, PostgreSQL and moto and names the CPU-bound one (the API
process at a full core is what a throughput figure should be the limit of). API CPU
per pair (the target) is read from the API process alone, so it holds on a busy box.

Targets: >= 500 api pairs/s; issue 20: <= 1 ms of API CPU per checked pair
(upload-url + ingest with the object check). The health and checked-pair phases run
--repeat times (default 3) side by side and print the range. Everything shares the
box's cores, as a device fleet would not: throughput figures are a floor.

    .venv/bin/python bench/bench_lifelog_ingest.py [--devices 200] [--seconds 10] \
        [--concurrency 64] [--clients 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import psutil  # noqa: E402
from benchstat import CpuMeter, load_average, span  # noqa: E402

from camfleet import db, tokens  # noqa: E402
from camfleet.localsvc import PostgresInstance, S3Instance, free_port  # noqa: E402
from camfleet.simulators.lifelog import LifelogDevice, Timings, percentile  # noqa: E402

SECRET = "bench-secret-0123456789abcdefghijklmnop"
CAMFLEET = str(Path(sys.executable).with_name("camfleet"))
JPEG = b"\xff\xd8\xff\xe0" + os.urandom(1024) + b"\xff\xd9"
USERS = 20  # devices spread over users so the per-user limit is not what is measured


class KeepAlive:
    """One HTTP/1.1 keep-alive connection: request -> (status, body). Bench use only."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, headers: dict, body: bytes = b""):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        data = await self.reader.readexactly(length) if length else b""
        return status, data

    def close(self):
        if self.writer is not None:
            self.writer.close()


class ApiProcess:
    def __init__(self, env: dict, log_dir: Path, check_object: bool = True):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full = {
            **os.environ,
            **env,
            "CAMFLEET_INGEST_CHECK_OBJECT": "on" if check_object else "off",
        }
        full.pop("PREFECT_API_URL", None)  # the ingest path without Prefect run assignment
        self.log = open(log_dir / f"api-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                CAMFLEET,
                "api",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=full,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("camfleet api did not start")
            time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _client(kind: str, args: tuple, start_at: float) -> dict:
    """One load-client process: health_pairs or api_pairs from start_at (time.time())."""
    time.sleep(max(0.0, start_at - time.time()))
    return {"health": health_pairs, "api": api_pairs}[kind](*args)


class Clients:
    """The load client in several processes (spawned once: imports off the clock)."""

    def __init__(self, n: int):
        self.n = n
        self.pool = mp.get_context("spawn").Pool(n)
        self.procs = [psutil.Process(p.pid) for p in self.pool._pool]  # noqa: SLF001

    def run(self, kind, port, concurrency, seconds, devices=None, first_seq=0, max_seqs=0):
        per = max(1, concurrency // self.n)
        jobs = []
        start_at = time.time() + 0.5
        for k in range(self.n):
            if kind == "health":
                args = (port, per, seconds)
            else:
                args = (port, devices[k :: self.n], per, seconds, first_seq, max_seqs)
            jobs.append(self.pool.apply_async(_client, (kind, args, start_at)))
        parts = [j.get(seconds + 300) for j in jobs]
        out = {"count": sum(p["count"] for p in parts), "latencies": {}, "statuses": {}}
        out["rate"] = sum(p["rate"] for p in parts)
        for p in parts:
            for name, v in p["latencies"].items():
                out["latencies"].setdefault(name, []).extend(v)
            for st, c in p["statuses"].items():
                out["statuses"][st] = out["statuses"].get(st, 0) + c
        return out


def with_cpu(label, api, groups, clients, kind, *args, **kw):
    """One phase; API CPU per pair from the API process alone, and the meter's line."""
    with CpuMeter({"api": api.proc.pid, **groups, "clients": clients.procs}) as meter:
        result = clients.run(kind, *args, **kw)
    api_s = meter.pct()["api"] * meter.wall / 100
    result["cpu_ms_per_pair"] = api_s * 1000 / max(1, result["count"])
    result["meter"] = meter
    print(
        f"  {label:34} {result['rate']:7.0f} pairs/s  API {result['cpu_ms_per_pair']:.2f} "
        f"ms CPU/pair  {meter.line()}",
        flush=True,
    )
    return result


def make_devices(base: str, dsn: str, count: int) -> list[tuple[str, str]]:
    keys = []
    with db.transaction(dsn) as conn:
        for u in range(USERS):
            key = tokens.new_user_key()
            db.queries.devices_create_user(conn, user_id=f"bench-{u}", name=None)
            db.queries.devices_create_user_key(
                conn,
                user_id=f"bench-{u}",
                key_hash=tokens.hash_user_key(SECRET.encode(), key),
                label="bench",
            )
            keys.append(key)
    devices = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(count):
            r = client.post(
                "/devices/pair", json={}, headers={"Authorization": f"Bearer {keys[i % USERS]}"}
            )
            code = r.json()["pairing_code"]
            act = client.post("/devices/activate", json={"pairing_code": code}).json()
            devices.append((act["device_id"], act["device_token"]))
    return devices


def preupload(s3, bucket: str, devices, seqs: range, first_seq: int) -> None:
    """Put the objects the API phase will ingest, at the keys the API will hand out."""
    client = s3.client()
    day = datetime.now(UTC).strftime("%Y/%m/%d")

    def put(job):
        device_id, seq = job
        key = f"devices/{device_id}/{day}/{seq}-photo_{seq:06d}.jpg"
        client.put_object(Bucket=bucket, Key=key, Body=JPEG, ContentType="image/jpeg")

    jobs = [(d, first_seq + s) for d, _ in devices for s in seqs]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, jobs))


async def drive(port: int, concurrency: int, seconds: float, make_requests) -> dict:
    """`concurrency` workers loop over make_requests(conn, worker) until time is up."""
    stop_at = time.perf_counter() + seconds
    latencies: dict[str, list[float]] = {}
    statuses: dict[int, int] = {}
    done = 0

    async def worker(w: int):
        nonlocal done
        conn = KeepAlive("127.0.0.1", port)
        try:
            while time.perf_counter() < stop_at:
                ok = await make_requests(conn, w, latencies, statuses)
                if ok is None:
                    return
                done += 1
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"rate": done / elapsed, "count": done, "latencies": latencies, "statuses": statuses}


async def timed(conn, name, method, path, headers, body, latencies, statuses):
    t = time.perf_counter()
    status, data = await conn.request(method, path, headers, body)
    latencies.setdefault(name, []).append(time.perf_counter() - t)
    statuses[status] = statuses.get(status, 0) + 1
    return status, data


def preupload_local(root: Path, devices, seqs: range, first_seq: int) -> None:
    """The same objects in a local store (camfleet up's default storage)."""
    from camfleet.storage.local import LocalStore

    store = LocalStore(root, public_url="http://127.0.0.1", secret=SECRET)
    day = datetime.now(UTC).strftime("%Y/%m/%d")
    for device_id, _ in devices:
        for s in seqs:
            seq = first_seq + s
            store.put(f"devices/{device_id}/{day}/{seq}-photo_{seq:06d}.jpg", JPEG, "image/jpeg")


def health_pairs(port, concurrency, seconds):
    async def pair(conn, w, lat, st):
        for _ in range(2):
            await timed(conn, "health", "GET", "/health", {}, b"", lat, st)
        return True

    return asyncio.run(drive(port, concurrency, seconds, pair))


def api_pairs(port, devices, concurrency, seconds, first_seq, max_seqs):
    """Workers own devices round-robin; each device walks its pre-uploaded seqs."""
    next_seq = {d: first_seq for d, _ in devices}
    tokens_by_id = dict(devices)
    per_worker = [devices[w::concurrency] for w in range(concurrency)]
    turn = [0] * concurrency

    async def pair(conn, w, lat, st):
        mine = per_worker[w]
        if not mine:
            return None
        device_id, _ = mine[turn[w] % len(mine)]
        turn[w] += 1
        seq = next_seq[device_id]
        if seq >= first_seq + max_seqs:
            return None
        next_seq[device_id] = seq + 1
        headers = {"X-Device-Token": tokens_by_id[device_id], "Content-Type": "application/json"}
        body = json.dumps(
            {"filename": f"photo_{seq:06d}.jpg", "content_type": "image/jpeg", "seq": seq}
        ).encode()
        status, data = await timed(
            conn, "upload-url", "POST", "/devices/upload-url", headers, body, lat, st
        )
        if status != 200:
            return False
        key = json.loads(data)["object_key"]
        body = json.dumps(
            {
                "object_key": key,
                "seq": seq,
                "captured_at": "2025-12-26T10:15:30Z",
                "ntp_synced": True,
            }
        ).encode()
        status, data = await timed(
            conn, "ingest", "POST", "/devices/ingest", headers, body, lat, st
        )
        return status == 200 and json.loads(data)["status"] == "queued"

    return asyncio.run(drive(port, concurrency, seconds, pair))


def head_cost(s3, bucket, key, n=300):
    client = s3.client()
    client.head_object(Bucket=bucket, Key=key)
    t = time.perf_counter()
    for _ in range(n):
        client.head_object(Bucket=bucket, Key=key)
    sequential = n / (time.perf_counter() - t)
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client.head_object(Bucket=bucket, Key=key), range(n)))
    threaded = n / (time.perf_counter() - t)
    return sequential, threaded


async def end_to_end(base, devices, concurrency, seconds, duplicate_rate):
    timings = Timings()
    limits = httpx.Limits(
        max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2
    )
    client = httpx.AsyncClient(timeout=30, limits=limits)
    sims = [
        LifelogDevice(
            base,
            token=t,
            device_id=d,
            client=client,
            timings=timings,
            duplicate_rate=duplicate_rate,
        )
        for d, t in devices
    ]
    for sim in sims:
        sim.seq = 10_000_000  # clear of the API phase's seqs
    stop_at = time.perf_counter() + seconds
    done = 0
    errors = []

    async def worker(w):
        nonlocal done
        mine = sims[w::concurrency]
        i = 0
        while mine and time.perf_counter() < stop_at:
            try:
                await mine[i % len(mine)].upload_photo(JPEG)
                done += 1
            except Exception as exc:  # counted, reported
                errors.append(repr(exc)[:200])
            i += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t
    await client.aclose()
    return done / elapsed, timings, errors


def ms(values, pct):
    return f"{percentile(values, pct) * 1000:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--e2e-concurrency", type=int, default=16)
    ap.add_argument("--duplicate-rate", type=float, default=0.1)
    ap.add_argument("--clients", type=int, default=2, help="load-client processes")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    clients = Clients(args.clients)

    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-lifelog-"))
    with PostgresInstance(fast=True) as pg, S3Instance() as s3:
        dsn = pg.create_database("bench")
        db.migrate(dsn)
        bucket = s3.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
        env = {
            "DATABASE_URL": dsn,
            "CAMFLEET_SECRET_KEY": SECRET,
            "STORAGE_URL": f"s3://{bucket}?endpoint_url={s3.endpoint_url}",
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": s3.region,
            "CAMFLEET_DATA_DIR": str(work / "data"),
            "NO_PROXY": "127.0.0.1,localhost",
            # Setup activates every simulated camera from one address; the per-address
            # activation limit is for guessing codes, not for a fleet's set-up.
            "CAMFLEET_RATE_LIMIT_ACTIVATE": "100000/minute",
        }
        try:
            import uvloop  # noqa: F401

            loop = "uvloop"
        except ImportError:
            loop = "asyncio"
        try:
            import httptools  # noqa: F401

            http = "httptools"
        except ImportError:
            http = "h11"
        print(f"server: one `camfleet api` process, loop={loop}, http={http}, access log off")
        print(
            f"load: {args.concurrency} keep-alive connections, {args.devices} devices, "
            f"{args.seconds:.0f} s per phase, cores={os.cpu_count()}, "
            f"{args.clients} client processes, load average {load_average()}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
        )
        groups = {"postgres": pg.pid, "s3": s3.pid}

        # Enough pre-uploaded seqs per device for a generous rate during each phase.
        max_seqs = int(args.seconds * 500 / args.devices) + 5
        api = ApiProcess(env, work)
        try:
            devices = make_devices(api.base, dsn, args.devices)
            n_objects = args.devices * max_seqs * (args.repeat + 1)
            print(f"pre-uploading {n_objects} objects to moto ...", flush=True)
            preupload(s3, bucket, devices, range(max_seqs * args.repeat), 1)
            preupload(s3, bucket, devices, range(max_seqs), 1_000_000)
            bases, heads = [], []
            for i in range(args.repeat):
                bases.append(
                    with_cpu(
                        f"[{i + 1}] baseline: GET /health x2", api, groups, clients, "health",
                        api.port, args.concurrency, args.seconds,
                    )
                )  # fmt: skip
                heads.append(
                    with_cpu(
                        f"[{i + 1}] upload-url + ingest (HEAD)", api, groups, clients, "api",
                        api.port, args.concurrency, args.seconds, devices,
                        1 + i * max_seqs, max_seqs,
                    )
                )  # fmt: skip
            base = sorted(bases, key=lambda r: r["rate"])[len(bases) // 2]
            with_head = sorted(heads, key=lambda r: r["rate"])[len(heads) // 2]
        finally:
            api.stop()
        api = ApiProcess(env, work, check_object=False)
        try:
            no_head = with_cpu(
                "object check off", api, groups, clients, "api", api.port, args.concurrency,
                args.seconds, devices, 1_000_000, max_seqs,
            )  # fmt: skip
        finally:
            api.stop()
        # The same ingest path against the local store (`camfleet up`'s default): the
        # existence check is a stat(), so this is the API's own rate with the check on.
        local_env = {**env, "STORAGE_URL": (work / "objects").as_uri()}
        preupload_local(work / "objects", devices, range(max_seqs), 2_000_000)
        api = ApiProcess(local_env, work)
        try:
            local = with_cpu(
                "local store (stat check)", api, groups, clients, "api", api.port,
                args.concurrency, args.seconds, devices, 2_000_000, max_seqs,
            )  # fmt: skip
        finally:
            api.stop()
        head_seq, head_threaded = head_cost(
            s3, bucket, next(iter(s3.client().list_objects_v2(Bucket=bucket)["Contents"]))["Key"]
        )

        api = ApiProcess(env, work)
        try:
            e2e_rate, timings, errors = asyncio.run(
                end_to_end(
                    api.base, devices, args.e2e_concurrency, args.seconds, args.duplicate_rate
                )
            )
        finally:
            api.stop()

    clients.pool.terminate()
    print()
    print(f"range (median) over {args.repeat} runs, load now {load_average()}:")
    for label, runs in (("baseline GET /health x2", bases), ("upload-url + ingest", heads)):
        print(
            f"  {label:24} {span(r['rate'] for r in runs)} pairs/s, API CPU "
            f"{span((r['cpu_ms_per_pair'] for r in runs), '{:.2f}')} ms/pair"
        )
    print("  target: <= 1 ms of API CPU per checked pair (issue 20); table: the median run")
    print()
    print(f"{'phase':34} {'pairs/s':>8} {'CPU ms/pair':>12} {'p50 ms':>7} {'p99 ms':>7}  statuses")
    rows = (
        ("baseline: GET /health x2", base, {"health": base["latencies"]["health"]}),
        ("api: upload-url + ingest (HEAD)", with_head, with_head["latencies"]),
        ("api: same, object check off", no_head, no_head["latencies"]),
        ("api: local store (stat check)", local, local["latencies"]),
    )
    for label, res, lat in rows:
        print(
            f"{label:34} {res['rate']:8.0f} {res['cpu_ms_per_pair']:12.2f} {'':7} {'':7}  "
            f"{res['statuses']}"
        )
        for name, values in lat.items():
            print(f"  {name:32} {'':8} {'':12} {ms(values, 50):>7} {ms(values, 99):>7}")
    print()
    rate = with_head["rate"]
    print(
        f"api pairs/s {rate:.0f} vs baseline {base['rate']:.0f} health pairs/s: ratio "
        f"{rate / base['rate']:.2f}; target 500 pairs/s: {'met' if rate >= 500 else 'NOT met'} "
        f"({rate / 500:.2f}x)"
    )
    print(
        f"API process CPU per pair: {with_head['cpu_ms_per_pair']:.2f} ms with the HEAD, "
        f"{no_head['cpu_ms_per_pair']:.2f} ms without, {base['cpu_ms_per_pair']:.2f} ms for "
        f"2x /health -> one free core would carry ~{1000 / with_head['cpu_ms_per_pair']:.0f} "
        f"pairs/s with the HEAD, ~{1000 / no_head['cpu_ms_per_pair']:.0f} without"
    )
    print(
        f"object check: {no_head['rate']:.0f} pairs/s without vs {rate:.0f} with; "
        f"boto3 HEAD to moto alone: {head_seq:.0f}/s sequential, {head_threaded:.0f}/s with 8 "
        f"threads (moto's HEAD rate caps the checked ingest here)"
    )
    print(
        f"local store (camfleet up's default), object check on: {local['rate']:.0f} pairs/s, "
        f"{local['cpu_ms_per_pair']:.2f} ms CPU/pair; target 500: "
        f"{'met' if local['rate'] >= 500 else 'NOT met'} ({local['rate'] / 500:.2f}x)"
    )
    print()
    queued = timings.statuses.get("queued", 0)
    injected = sum(v for k, v in timings.statuses.items() if k.startswith("retry-"))
    print(
        f"end to end (upload-url + streamed PUT to moto + ingest, {args.e2e_concurrency} in "
        f"flight): {e2e_rate:.0f} photos/s, {queued} queued"
    )
    for name in ("upload-url", "put", "ingest"):
        values = timings.latencies.get(name, [])
        print(f"  {name:12} p50 {ms(values, 50)} ms  p99 {ms(values, 99)} ms")
    print(
        f"  injected ingest retries: {injected} -> {timings.statuses}; client retries after "
        f"5xx/429/network: {timings.retries}; errors: {len(errors)} {errors[:3]}"
    )


if __name__ == "__main__":
    main()
