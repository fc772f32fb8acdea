"""Edge batch-upload transaction throughput beside a plain boto3 put_object loop.

What the baseline is the limit of: how fast moto's S3 server (one Python process) on
this machine takes in the files when --clients processes (default: as many as the
transaction's --lanes) each run a plain `put_object` loop over a slice of them. One
loop in the benchmark process waited on each request's round trip in turn while the
transaction keeps 4 lanes in flight; with several processes the S3 server is the
busiest process (each run prints the CPU of every process and names the CPU-bound one,
or the machine's cores when other users take them). Measured 2026-12-03 (load average
10-13): moto 22-33 % of a core, the 4 clients 15-23 % together, the machine's cores
(other users 150-166 %) the limit. CPU per file by process is printed because it does
not move with the load: the transaction costs moto ~3 ms more per file than a put (the
signer's read-back GET).

In one run, on private loopback services (Mosquitto, moto's S3 server, PostgreSQL):

  baseline     boto3 `put_object` of N files from --clients processes (no checks, no DB)
  transaction  the same N files through the full seed-000 transaction: move into the
               buffer in batches of 5, MQTT request, presigned POSTs, upload, the
               signer's read-back + SHA-256 verification + `captures` row, the
               `{"file"}` message, delete; every file verified before deletion.

Both run side by side --repeat times (default 3); prints files/s for both and each
repetition's ratio with the range (target, issue 20: >= 1.0), the load average and the
CPU of every process beside each figure, CPU per file by process, and the S3 requests
per verified file (the POST, the signer's read-back, and probes that found nothing).

    .venv/bin/python bench/bench_edge_batch.py [--files 500] [--size 51200] [--lanes 4] \
        [--clients 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchstat import CpuMeter, load_average, span  # noqa: E402

from blocks.mqtt import MqttBroker  # noqa: E402
from camfleet import db  # noqa: E402
from camfleet.edge.config import EdgeConfig  # noqa: E402
from camfleet.edge.uploader import EdgeUploader  # noqa: E402
from camfleet.localsvc import MosquittoInstance, PostgresInstance, S3Instance  # noqa: E402
from camfleet.storage.s3 import S3Store  # noqa: E402


def cpu_seconds(roots) -> float:
    """User+system CPU seconds used so far by these processes and their descendants.

    Short-lived children count too: PostgreSQL forks a backend per connection, and
    a backend that is gone by the end is in its parent's reaped-children times.
    (Gone roots count 0.)
    """
    total = 0.0
    for root in roots:
        try:
            procs = [root, *root.children(recursive=True)]
            t = root.cpu_times()
            total += t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def own_cpu(procs) -> float:
    """User+system CPU seconds of these processes alone (not their children)."""
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


# moto logs one werkzeug access line per request: "METHOD /path HTTP/1.1" STATUS.
_ACCESS_LINE = re.compile(rb'"([A-Z]+) \S+ HTTP/[0-9.]+" ([0-9]{3}) ')


def s3_requests(log_path: Path, offset: int) -> collections.Counter:
    """Requests the S3 server logged after byte `offset`, counted by (method, status)."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        return collections.Counter(
            (m.group(1).decode(), int(m.group(2))) for m in _ACCESS_LINE.finditer(f.read())
        )


def make_files(directory: Path, count: int, size: int) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    old = time.time() - 600
    shas = {}
    for i in range(count):
        name = f"trap_{i:05d}.jpg"
        data = os.urandom(size)
        (directory / name).write_bytes(data)
        os.utime(directory / name, (old + i, old + i))
        shas[name] = hashlib.sha256(data).hexdigest()
    return shas


def run_flow(work: Path, source: Path, broker, args) -> float:
    """The same files through `edge-batch-upload` on a private Prefect server."""
    import json

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from camfleet.localsvc import PrefectServerInstance
    from flows.edge_batch import edge_batch_upload

    device = work / "flow-device"
    shutil.copytree(source, device / "cameraImageRepo", copy_function=shutil.copy2)
    conf = device / "ento.conf"
    conf.write_text(
        json.dumps(
            {
                "device": {
                    "SERIAL_ID": "ENTO-BENCH-FLOW",
                    "ENDPOINT_URL": broker.host,
                    "PORT": broker.port,
                    "TLS": False,
                    "STORAGE_PATH": str(device / "bufferStorage"),
                    "BATCH_SIZE": args.batch,
                }
            }
        )
    )
    with PrefectServerInstance() as server, temporary_settings({PREFECT_API_URL: server.api_url}):
        t0 = time.perf_counter()
        summaries = edge_batch_upload(str(conf), max_batches=10_000, min_age_s=0)
        took = time.perf_counter() - t0
        from prefect.logging.handlers import APILogHandler

        # Before the server goes away. (An instance: flush is no longer a classmethod
        # in Prefect 3.x; calling it on an instance works in both.)
        APILogHandler().flush()
    assert sum(s["deleted"] for s in summaries) == args.files, "flow left files behind"
    return took


def _put_loop(conf: dict, bucket: str, paths: list[str], go, done, results) -> None:
    """One baseline client process: a plain put_object loop over its slice of files."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=conf["endpoint_url"],
        aws_access_key_id=conf["access_key"],
        aws_secret_access_key=conf["secret_key"],
        region_name=conf["region"],
        config=Config(
            signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1}
        ),
    )
    client.head_bucket(Bucket=bucket)  # imports, credentials, connection: off the clock
    results.put("ready")
    go.wait()
    t0 = time.time()
    for path in paths:
        with open(path, "rb") as f:
            client.put_object(Bucket=bucket, Key=f"devices/bench/{Path(path).name}", Body=f)
    results.put((t0, time.time()))
    done.wait(600)  # stay until the benchmark has read this process's CPU time


def baseline(s3, source: Path, clients: int) -> dict:
    """The files put by `clients` processes at once; files/s over the whole span."""
    bucket = s3.create_bucket(f"base-{uuid.uuid4().hex[:8]}")
    conf = {k: getattr(s3, k) for k in ("endpoint_url", "access_key", "secret_key", "region")}
    paths = sorted(str(p) for p in source.iterdir())
    ctx = mp.get_context("spawn")
    go, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_put_loop, args=(conf, bucket, paths[k::clients], go, done, results))
        for k in range(clients)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert results.get(timeout=120) == "ready"
    with CpuMeter({"clients": [p.pid for p in procs], "s3": s3.pid}) as meter:
        go.set()
        spans = [results.get(timeout=600) for _ in procs]
    done.set()
    for p in procs:
        p.join(30)
    took = max(e for _, e in spans) - min(t for t, _ in spans)
    return {"files_s": len(paths) / took, "s": took, "meter": meter}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--size", type=int, default=50 * 1024)
    ap.add_argument("--batch", type=int, default=5, help="files per transaction (seed: 5)")
    ap.add_argument("--lanes", type=int, default=4, help="batches in flight at once")
    ap.add_argument("--clients", type=int, help="baseline put_object processes (def: lanes)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--handoff", default="none", help="signer post-processing: none | flow")
    ap.add_argument(
        "--prefect",
        action="store_true",
        help="also time the same files through the Prefect flow (one lane, local server)",
    )
    args = ap.parse_args()
    clients = args.clients or args.lanes
    print(
        f"edge batch benchmark: {args.files} x {args.size} B, batch {args.batch}, lanes "
        f"{args.lanes}, baseline {clients} client processes, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {load_average()}",
        flush=True,
    )

    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    bases, txns = [], []
    with (
        MosquittoInstance(persistence=False) as broker_svc,
        S3Instance() as s3,
        PostgresInstance(fast=True) as pg,
    ):
        dsn = pg.create_database("bench_edge")
        db.migrate(dsn)
        store = S3Store(
            s3.create_bucket(f"bench-{uuid.uuid4().hex[:8]}"),
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            access_key_id=s3.access_key,
            secret_access_key=s3.secret_key,
        )
        source = work / "source"
        make_files(source, args.files, args.size)
        me = psutil.Process()
        broker = MqttBroker(host=broker_svc.host, port=broker_svc.port)
        # The signer runs as its own process, as in production (`camfleet signer`).
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "STORAGE_URL": f"s3://{store.bucket}?endpoint_url={s3.endpoint_url}",
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "MQTT_HOST": broker.host,
            "MQTT_PORT": str(broker.port),
            "LOG_LEVEL": "WARNING",
        }
        signer = subprocess.Popen(
            [sys.executable, "-m", "camfleet.cli", "signer", "--handoff", args.handoff],
            env=env,
            stdout=subprocess.PIPE,
        )
        try:
            signer.stdout.readline()  # "signer: storage ..., broker ..."
            time.sleep(1.0)  # connected and subscribed
            for i in range(args.repeat):
                b = baseline(s3, source, clients)
                print(
                    f"[{i + 1}] baseline    {b['files_s']:7.1f} files/s  {b['meter'].line()}",
                    flush=True,
                )
                bases.append(b)
                serial = f"ENTO-BENCH-{i}"
                cfg = EdgeConfig(
                    serial=serial,
                    buffer_dir=work / f"bufferStorage{i}",
                    repo_dir=work / f"cameraImageRepo{i}",
                    broker_host=broker.host,
                    broker_port=broker.port,
                    tls=False,
                    batch_size=args.batch,
                )
                shutil.copytree(source, cfg.repo_dir, copy_function=shutil.copy2)
                # The bench process is the device (it also parents the signer and the
                # services: count only its own threads for the device).
                groups = {
                    "device": me,
                    "signer": signer.pid,
                    "s3": s3.pid,
                    "broker": broker_svc.pid,
                    "postgres": pg.pid,
                }
                log_offset = s3.log_path.stat().st_size
                with CpuMeter(groups, own_only=["device"]) as meter:
                    t0 = time.perf_counter()
                    summaries = EdgeUploader(cfg, broker, lanes=args.lanes, min_age_s=0).drain()
                    txn_s = time.perf_counter() - t0
                deleted = sum(s["deleted"] for s in summaries)
                with db.connect(dsn) as conn, conn.cursor() as cur:
                    cur.execute("select count(*) from captures where device_id = %s", [serial])
                    rows = cur.fetchone()[0]
                leftover = len(os.listdir(cfg.buffer_dir)) + len(os.listdir(cfg.repo_dir))
                t = {
                    "files_s": deleted / txn_s,
                    "deleted": deleted,
                    "rows": rows,
                    "leftover": leftover,
                    "batches": len(summaries),
                    "meter": meter,
                    "requests": s3_requests(s3.log_path, log_offset),
                }
                txns.append(t)
                print(
                    f"[{i + 1}] transaction {t['files_s']:7.1f} files/s  ratio "
                    f"{t['files_s'] / b['files_s']:.2f}  {meter.line()}",
                    flush=True,
                )
            flow_s = run_flow(work, source, broker, args) if args.prefect else None
        finally:
            signer.send_signal(signal.SIGTERM)
            signer.wait(30)

    shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"summary over {args.repeat} repetitions (range, median), load now {load_average()}")
    print(f"  baseline put_object ({clients} procs)  {span(b['files_s'] for b in bases)} files/s")
    print(f"  edge transaction ({args.lanes} lanes)     {span(t['files_s'] for t in txns)} files/s")
    ratios = [t["files_s"] / b["files_s"] for t, b in zip(txns, bases, strict=False)]
    print(f"  ratio transaction/baseline     {span(ratios, '{:.2f}')}  (target >= 1.0)")
    # CPU per file is what a shared machine's load distorts least.
    for label, rows in (("baseline", bases), ("transaction", txns)):
        per = {}
        for r in rows:
            for name, pct in r["meter"].pct().items():
                per.setdefault(name, []).append(10 * pct * r["meter"].wall / args.files)
        print(
            f"  CPU ms per file, {label}: "
            + ", ".join(f"{name} {span(v, '{:.1f}')}" for name, v in per.items())
        )
    requests = sum((t["requests"] for t in txns), collections.Counter())
    deleted = sum(t["deleted"] for t in txns)
    # What the store served per verified file: the POST, the read-back, and the probes
    # that found nothing yet (404).
    per_file = ", ".join(
        f"{method} {status} {n / max(1, deleted):.2f}"
        for (method, status), n in sorted(requests.items())
    )
    print(f"  S3 requests per file during the transactions: {per_file}")
    if flow_s is not None:
        flow_rate = args.files / flow_s
        base_rate = sum(b["files_s"] for b in bases) / len(bases)
        print(
            f"  Prefect flow (1 lane)    : {flow_rate:8.1f} files/s ({flow_s:.2f} s; "
            f"ratio to baseline {flow_rate / base_rate:.2f})"
        )
    for t in txns:
        print(
            f"  verified+deleted {t['deleted']}/{args.files}, captures rows {t['rows']}, "
            f"left on device {t['leftover']}, batches {t['batches']}"
        )


if __name__ == "__main__":
    main()
