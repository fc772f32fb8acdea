"""Edge batch-upload transaction throughput beside a plain boto3 put_object loop.

In one run, on private loopback services (Mosquitto, moto's S3 server, PostgreSQL):

  baseline     boto3 `put_object` of N files, one after another (no checks, no DB)
  transaction  the same N files through the full seed-000 transaction: move into the
               buffer in batches of 5, MQTT request, presigned POSTs, upload, the
               signer's read-back + SHA-256 verification + `captures` row, the
               `{"file"}` message, delete; every file verified before deletion.

Prints files/s for both and the ratio (target: >= 0.5), CPU per file (in total and by
process: device, signer, S3 server, broker, PostgreSQL including its short-lived
backends) and the S3 requests per verified file (the POST, the signer's read-back,
and probes that found nothing yet).

    .venv/bin/python bench/bench_edge_batch.py [--files 500] [--size 51200] [--lanes 4]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--size", type=int, default=50 * 1024)
    ap.add_argument("--batch", type=int, default=5, help="files per transaction (seed: 5)")
    ap.add_argument("--lanes", type=int, default=4, help="batches in flight at once")
    ap.add_argument("--handoff", default="none", help="signer post-processing: none | flow")
    ap.add_argument(
        "--prefect",
        action="store_true",
        help="also time the same files through the Prefect flow (one lane, local server)",
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
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

        # Baseline: a plain put_object loop over the same files, measured before and
        # after the transaction (the machine is shared: the mean evens out drift).
        client = s3.client()
        names = sorted(os.listdir(source))

        me = psutil.Process()
        moto = [psutil.Process(s3.pid)]
        cpu: dict[str, float] = {}

        def baseline() -> float:
            bucket = s3.create_bucket(f"base-{uuid.uuid4().hex[:8]}")
            c0 = own_cpu([me]) + cpu_seconds(moto)
            t0 = time.perf_counter()
            for name in names:
                with open(source / name, "rb") as f:
                    client.put_object(Bucket=bucket, Key=f"devices/bench/{name}", Body=f)
            took = time.perf_counter() - t0
            c1 = own_cpu([me]) + cpu_seconds(moto)
            cpu["baseline"] = cpu.get("baseline", 0.0) + c1 - c0
            return took

        baseline_runs = [baseline()]

        # The full transaction.
        broker = MqttBroker(host=broker_svc.host, port=broker_svc.port)
        cfg = EdgeConfig(
            serial="ENTO-BENCH",
            buffer_dir=work / "bufferStorage",
            repo_dir=work / "cameraImageRepo",
            broker_host=broker.host,
            broker_port=broker.port,
            tls=False,
            batch_size=args.batch,
        )
        shutil.copytree(source, cfg.repo_dir, copy_function=shutil.copy2)
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
            # The bench process is the device (it also parents the signer: count only
            # its own threads for the device).
            parts = {
                "device": [me],
                "signer": [psutil.Process(signer.pid)],
                "s3": moto,
                "broker": [psutil.Process(broker_svc.pid)],
                "postgres": [psutil.Process(pg.pid)],
            }
            used = {
                name: own_cpu(procs) if name == "device" else cpu_seconds(procs)
                for name, procs in parts.items()
            }
            log_offset = s3.log_path.stat().st_size
            t0 = time.perf_counter()
            summaries = EdgeUploader(cfg, broker, lanes=args.lanes, min_age_s=0).drain()
            txn_s = time.perf_counter() - t0
            for name, procs in parts.items():
                now_used = own_cpu(procs) if name == "device" else cpu_seconds(procs)
                cpu[name] = now_used - used[name]
            cpu["transaction"] = sum(cpu[name] for name in parts)
            requests = s3_requests(s3.log_path, log_offset)
            flow_s = run_flow(work, source, broker, args) if args.prefect else None
        finally:
            signer.send_signal(signal.SIGTERM)
            signer.wait(30)
        baseline_runs.append(baseline())
        deleted = sum(s["deleted"] for s in summaries)
        with db.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("select count(*) from captures where device_id = 'ENTO-BENCH'")
            rows = cur.fetchone()[0]
        leftover = len(os.listdir(cfg.buffer_dir)) + len(os.listdir(cfg.repo_dir))

    shutil.rmtree(work, ignore_errors=True)
    baseline_s = sum(baseline_runs) / len(baseline_runs)
    base_rate = args.files / baseline_s
    txn_rate = deleted / txn_s
    print(f"files: {args.files} x {args.size} B, batch {args.batch}, lanes {args.lanes}")
    before, after = (args.files / t for t in baseline_runs)
    print(
        f"baseline put_object loop : {base_rate:8.1f} files/s ({baseline_s:.2f} s; "
        f"before {before:.1f}, after {after:.1f} files/s)"
    )
    print(f"edge transaction         : {txn_rate:8.1f} files/s ({txn_s:.2f} s)")
    print(f"ratio transaction/baseline: {txn_rate / base_rate:.2f}  (target >= 0.5)")
    # CPU per file is what a shared machine's load does not distort.
    print(
        f"CPU per file: baseline {1000 * cpu['baseline'] / (2 * args.files):.1f} ms "
        f"(client + S3 server), transaction {1000 * cpu['transaction'] / max(1, deleted):.1f} ms "
        f"(device + signer + S3 server + broker + PostgreSQL); load avg {os.getloadavg()[0]:.1f}"
    )
    print(
        "  transaction CPU per file by process: "
        + ", ".join(
            f"{name} {1000 * cpu[name] / max(1, deleted):.1f}"
            for name in ("device", "signer", "s3", "broker", "postgres")
        )
        + " ms"
    )
    # What the store served per verified file: the POST, the read-back, and the probes
    # that found nothing yet (404).
    per_file = ", ".join(
        f"{method} {status} {n / max(1, deleted):.2f}"
        for (method, status), n in sorted(requests.items())
    )
    print(f"S3 requests per file during the transaction: {per_file}")
    if flow_s is not None:
        flow_rate = args.files / flow_s
        print(
            f"Prefect flow (1 lane)    : {flow_rate:8.1f} files/s ({flow_s:.2f} s; "
            f"ratio to baseline {flow_rate / base_rate:.2f})"
        )
    print(
        f"verified+deleted {deleted}/{args.files}, captures rows {rows}, "
        f"left on device {leftover}, batches {len(summaries)}"
    )


if __name__ == "__main__":
    main()
