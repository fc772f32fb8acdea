"""Signer replicas: 1 vs 3 `camfleet signer` instances on the same edge workload.

In one run, on private loopback services (Mosquitto, moto's S3 server, PostgreSQL),
the same edge transaction as bench/bench_edge_batch.py (batches of 5, MQTT request,
presigned POSTs, upload, the signer's read-back + SHA-256 + `captures` row, the
`{"file"}` message, delete) from several simulated devices at once, served by:

  1 signer    `camfleet signer` as today (plain subscription, in-process rate limit)
  3 signers   `camfleet signer --share-group` x 3: requests through Mosquitto's shared
              subscription, grants leased in PostgreSQL, rate limits counted in
              PostgreSQL (rate_limit_counters)

The two alternate (1, 3, 1, 3, ... for --rounds) so drift on a shared machine hits
both. On 2 cores replicas cannot speed anything up: what is measured is their cost.
Prints files/s and CPU per file of each side by side and the ratios (targets: files/s
of 3 >= 0.9x of 1, CPU per file of 3 <= 1.2x of 1), CPU per file of the signers alone
and of the whole pipeline (devices + signers + S3 server + broker + PostgreSQL).

What the 1-signer baseline is the limit of: not the signer (its read-back GET, SHA-256
and `captures` row cost ~2 ms per file) but moto's S3 server (one Python process that
takes every POST and read-back) and the devices (this process's threads, one core at
most), or the machine's cores when other users take them. A small run on 2026-12-03
(--files 60 --devices 4 --rounds 2, load average ~5): moto 52-61 % of a core, devices
51-52 %, the signer 11-15 %, PostgreSQL 7 %, the machine's cores the limit.

Each run prints the load average and the CPU of every process group beside its figures
(signers, broker, PostgreSQL, moto S3, the devices as load generator, the rest of the
box) and names the one that limited it (bench/benchstat.py); the summary prints the
range of each figure over the rounds.

    .venv/bin/python bench/bench_signer_replicas.py [--files 400] [--devices 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchstat import CpuMeter, load_average, span  # noqa: E402

from bench.bench_edge_batch import make_files  # noqa: E402
from blocks.mqtt import MqttBroker  # noqa: E402
from camfleet import db  # noqa: E402
from camfleet.edge.config import EdgeConfig  # noqa: E402
from camfleet.edge.uploader import EdgeUploader  # noqa: E402
from camfleet.localsvc import (  # noqa: E402
    MosquittoInstance,
    PostgresInstance,
    S3Instance,
    free_port,
)

# Three signers importing at once on a loaded 2-core machine take a while.
READY_WAIT_S = 180.0


def start_signers(n: int, env: dict, logs: Path) -> list[subprocess.Popen]:
    """n `camfleet signer` processes, returned once each answers GET /ready."""
    procs, ports = [], []
    for i in range(n):
        port = free_port()
        argv = [sys.executable, "-m", "camfleet.cli", "signer", "--handoff", "none"]
        argv += [
            "--health-port",
            str(port),
            "--client-id",
            f"bench-signer-{i}-{uuid.uuid4().hex[:4]}",
        ]
        if n > 1:
            argv += ["--share-group", "camfleet-signer"]
        out = open(logs / f"signer-{n}-{i}.log", "ab")  # noqa: SIM115 - the child keeps it
        procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))
        ports.append(port)
    deadline = time.monotonic() + READY_WAIT_S
    for proc, port in zip(procs, ports, strict=True):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"a signer exited ({proc.returncode}); see {logs}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"a signer was not ready within {READY_WAIT_S:.0f} s")
            time.sleep(0.1)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(30)


def one_run(n: int, args, services: dict, env: dict, work: Path, source: Path) -> dict:
    """Drain every device's copy of the files through n signers; figures of the drain."""
    broker = services["broker"]
    round_dir = work / f"run-{uuid.uuid4().hex[:6]}"
    names = sorted(os.listdir(source))
    configs = []
    for d in range(args.devices):
        cfg = EdgeConfig(
            serial=f"ENTO-BR{d:02d}{uuid.uuid4().hex[:4]}",
            buffer_dir=round_dir / f"d{d}" / "bufferStorage",
            repo_dir=round_dir / f"d{d}" / "cameraImageRepo",
            broker_host=broker.host,
            broker_port=broker.port,
            tls=False,
            batch_size=5,
        )
        cfg.repo_dir.mkdir(parents=True)
        for name in names[d :: args.devices]:  # each device its share of the files
            shutil.copy2(source / name, cfg.repo_dir / name)
        configs.append(cfg)
    signers = start_signers(n, env, work)
    try:
        # The bench process is the devices (the load generator); it also parents the
        # signers and the services, so only its own threads count for "device".
        groups = {
            "device": psutil.Process(),
            "signers": [p.pid for p in signers],
            "s3": services["s3"].pid,
            "broker": services["mqtt"].pid,
            "postgres": services["pg"].pid,
        }
        deleted = [0] * len(configs)
        reasons: list = []

        def device(i: int) -> None:
            up = EdgeUploader(configs[i], services["mqtt_block"], lanes=args.lanes, min_age_s=0)
            summaries = up.drain()
            deleted[i] = sum(s["deleted"] for s in summaries)
            reasons.extend(s["reasons"] for s in summaries if s["left_for_next_run"])

        with CpuMeter(groups, own_only=["device"]) as meter:
            t0 = time.perf_counter()
            threads = [threading.Thread(target=device, args=(i,)) for i in range(len(configs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.perf_counter() - t0
    finally:
        stop(signers)
    cpu = {name: pct / 100 * meter.wall for name, pct in meter.pct().items()}
    files = sum(deleted)
    left = sum(len(os.listdir(c.repo_dir)) + len(os.listdir(c.buffer_dir)) for c in configs)
    shutil.rmtree(round_dir, ignore_errors=True)
    if left:
        print(f"  left on devices: {reasons[:5]}; logs kept in {work}", flush=True)
    return {"files": files, "seconds": took, "cpu": cpu, "left": left, "meter": meter}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=400, help="files per run")
    ap.add_argument("--size", type=int, default=50 * 1024)
    ap.add_argument("--devices", type=int, default=8, help="devices uploading at once")
    ap.add_argument("--lanes", type=int, default=2, help="batches in flight per device")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-signers-"))
    with (
        MosquittoInstance(persistence=False) as mqtt_svc,
        S3Instance() as s3,
        PostgresInstance(fast=True) as pg,
    ):
        dsn = pg.create_database("bench_signers")
        db.migrate(dsn)
        bucket = s3.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
        source = work / "source"
        make_files(source, args.files, args.size)
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "STORAGE_URL": f"s3://{bucket}?endpoint_url={s3.endpoint_url}",
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "MQTT_HOST": mqtt_svc.host,
            "MQTT_PORT": str(mqtt_svc.port),
            "LOG_LEVEL": "INFO",
        }
        for key in ("CAMFLEET_MQTT_BLOCK", "CAMFLEET_DATABASE_BLOCK", "CAMFLEET_SIGNER_GROUP"):
            env.pop(key, None)
        services = {
            "mqtt": mqtt_svc,
            "s3": s3,
            "pg": pg,
            "broker": mqtt_svc,
            "mqtt_block": MqttBroker(host=mqtt_svc.host, port=mqtt_svc.port),
        }
        totals = {1: [], 3: []}
        print(f"load {load_average()} before the first round", flush=True)
        for i in range(args.rounds):
            for n in (1, 3):
                run = one_run(n, args, services, env, work, source)
                totals[n].append(run)
                print(
                    f"  [{i + 1}] {n} signer(s): {run['files'] / run['seconds']:7.1f} files/s, "
                    f"signers {1000 * run['cpu']['signers'] / max(1, run['files']):.1f} ms/file, "
                    f"left {run['left']}  {run['meter'].line()}",
                    flush=True,
                )
    if not any(r["left"] for runs in totals.values() for r in runs):
        shutil.rmtree(work, ignore_errors=True)

    def summary(runs: list[dict]) -> dict:
        files = sum(r["files"] for r in runs)
        cpu = {k: sum(r["cpu"][k] for r in runs) for k in runs[0]["cpu"]}
        return {
            "files": files,
            "rate": files / sum(r["seconds"] for r in runs),
            "signer_ms": 1000 * cpu["signers"] / max(1, files),
            "total_ms": 1000 * sum(cpu.values()) / max(1, files),
            "by_part": {k: 1000 * v / max(1, files) for k, v in cpu.items()},
            "left": sum(r["left"] for r in runs),
        }

    one, three = summary(totals[1]), summary(totals[3])
    print(
        f"files: {args.files} x {args.size} B per run, {args.devices} devices x "
        f"{args.lanes} lanes, batches of 5, {args.rounds} runs of each"
    )
    print(f"{'':28}{'1 signer':>12}{'3 signers':>12}{'ratio':>8}  target")
    rows = [
        ("files/s", one["rate"], three["rate"], ">= 0.9"),
        ("signer CPU per file (ms)", one["signer_ms"], three["signer_ms"], "<= 1.2"),
        ("total CPU per file (ms)", one["total_ms"], three["total_ms"], "<= 1.2"),
    ]
    for label, a, b, target in rows:
        print(f"{label:28}{a:12.2f}{b:12.2f}{b / a:8.2f}  {target}")
    for name, side in (("1 signer", one), ("3 signers", three)):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in side["by_part"].items())
        print(f"  CPU per file by process, {name}: {parts} ms")
    print(
        f"verified+deleted: 1 signer {one['files']}, 3 signers {three['files']} "
        f"(of {args.files * args.rounds} each); left on devices {one['left']} / "
        f"{three['left']}; load avg {os.getloadavg()[0]:.1f}"
    )

    # Each round's figures (1 and 3 ran back to back, so each ratio is of neighbours).
    def per_file(run: dict, part: str | None = None) -> float:
        cpu = run["cpu"][part] if part else sum(run["cpu"].values())
        return 1000 * cpu / max(1, run["files"])

    pairs = list(zip(totals[1], totals[3], strict=True))
    print(f"range over {args.rounds} rounds (median), load now {load_average()}")
    for name, runs in (("1 signer", totals[1]), ("3 signers", totals[3])):
        print(
            f"  {name:9}  {span((r['files'] / r['seconds'] for r in runs), '{:.1f}')} files/s, "
            f"signers {span((per_file(r, 'signers') for r in runs), '{:.2f}')} ms/file, "
            f"total {span((per_file(r) for r in runs), '{:.2f}')} ms/file"
        )
        limits = "; ".join(r["meter"].limit() for r in runs)
        print(f"             limited by (each round): {limits}")
    print(
        "  ratio 3/1  files/s "
        + span(
            ((b["files"] / b["seconds"]) / (a["files"] / a["seconds"]) for a, b in pairs), "{:.2f}"
        )
        + ", signer CPU/file "
        + span((per_file(b, "signers") / per_file(a, "signers") for a, b in pairs), "{:.2f}")
        + ", total CPU/file "
        + span((per_file(b) / per_file(a) for a, b in pairs), "{:.2f}")
    )


if __name__ == "__main__":
    main()
