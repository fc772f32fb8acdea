"""MQTT chunk ingest (seed 002): full ingest path vs a plain subscriber, same stream.

On one private Mosquitto (started here, loopback only), with --devices simulated
ESP32-CAMs (a separate `camfleet simulate esp32` process) sending --images 45-chunk
images each at QoS 1:

 (a) baseline: a plain paho subscriber (separate process) that only counts the chunk
     messages of the stream (devices fire and forget);
 (b) full path: the real `camfleet assembler` process (assemble, store in a local
     directory, PostgreSQL rows, ACK_OK, one recording Prefect flow run per interval);
     devices wait for ACK_OK (and answer NACKs) like the firmware.
 (b'') optionally (--flow-ack-path-too) with a Prefect flow run per batch on the ACK path;
 (c) optionally (--no-prefect-too) the same full path with --no-prefect.
 (a) runs again at the end and the ratio uses the mean: other work on the box drifts.

Prints images/s, chunks/s, the ratio b/a, ACK_OK latency p50/p99 after each image's
last chunk, NACKs, and the assembler's peak RSS next to the bytes of images in flight.

    .venv/bin/python bench/bench_mqtt_ingest.py [--devices 100] [--images 10] \
        [--flow-ack-path-too] [--no-prefect-too]

Measured 2026-12-02 (2 CPUs, quiet machine: load average 0.6-2.8), 100 devices x 10
images, recording flow runs inline (the default), three runs:

    (a) plain paho subscriber       7,263-7,872 chunks/s
    (b) full, record run            5,771-5,943 chunks/s    ratio 0.73, 0.76, 0.82
        ACK_OK after last chunk p99 452-727 ms; 0 NACKs; 4 flow runs for 1,000 captures,
        run id on every row; assembler RSS 92 -> 120-122 MB peak, one process
    (b3) --recorder process         ratio 0.73 (same run as 0.76); RSS 108 MB + a
        122 MB child (Prefect's imports): 230 MB in all, for no throughput gain

On the same machine under other test runs (load average 2-15) the ratio fell to
0.47-0.64: the baseline moves with the box's load, so compare figures within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from camfleet import db  # noqa: E402
from camfleet.localsvc import (  # noqa: E402
    MosquittoInstance,
    PostgresInstance,
    PrefectServerInstance,
)

CHUNKS_PER_IMAGE = 45
IMAGE_BYTES = CHUNKS_PER_IMAGE * 1024 - 100

COUNTER = textwrap.dedent(
    """
    import sys, time, threading, paho.mqtt.client as mqtt
    host, port, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    n, first, last = 0, None, None
    done, ready = threading.Event(), threading.Event()
    def on_connect(c, u, f, rc, p=None):
        c.subscribe("ESP32CAM/+/data", qos=1)
    def on_subscribe(*a):
        ready.set(); print("ready", flush=True)
    def on_message(c, u, m):
        global n, first, last
        if b'"chunk_id"' not in m.payload:
            return
        now = time.monotonic()
        if first is None:
            first = now
        n += 1; last = now
        if n >= expected:
            done.set()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plain-counter")
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, port); c.loop_start()
    end = time.monotonic() + float(sys.argv[4])
    while not done.wait(0.5) and time.monotonic() < end:
        if last is not None and time.monotonic() - last > 10:
            break  # the stream ended short of `expected`: report what came

    c.disconnect(); c.loop_stop()
    print(f"{n} {first} {last}", flush=True)
    """
)


def simulator(broker, devices, images, prefix, wait_ack=True, timeout=600):
    args = [
        sys.executable,
        "-m",
        "camfleet.cli",
        "simulate",
        "esp32",
        "--devices",
        str(devices),
        "--images",
        str(images),
        "--image-bytes",
        str(IMAGE_BYTES),
        "--broker",
        f"{broker.host}:{broker.port}",
        "--id-prefix",
        prefix,
        "--json",
        "--ack-timeout",
        "20",
    ]
    if not wait_ack:
        args.append("--no-wait-ack")
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode not in (0, 1):
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_plain(broker, devices, images):
    expected = devices * images * CHUNKS_PER_IMAGE
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(COUNTER)
    counter = subprocess.Popen(
        [sys.executable, f.name, broker.host, str(broker.port), str(expected), "300"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert counter.stdout.readline().strip() == "ready"
    sim = simulator(broker, devices, images, "BA5E00", wait_ack=False)
    n, first, last = counter.communicate(timeout=320)[0].split()
    os.unlink(f.name)
    n = int(n)
    span = float(last) - float(first)
    if n < expected:
        print(f"   warning: the plain subscriber got {n} of {expected} chunk messages")
    return {"chunks": n, "span": span, "chunks_s": n / span, "images_s": n / span / 45, "sim": sim}


def bench_full(broker, dsn, objects, devices, images, prefix, extra_args=()):
    env = {
        **os.environ,
        "MQTT_HOST": broker.host,
        "MQTT_PORT": str(broker.port),
        "DATABASE_URL": dsn,
        "STORAGE_URL": f"file://{objects}",
        "MQTT_CLIENT_ID": f"bench-{prefix}",
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "WARNING",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "camfleet.cli", "assembler", *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("assembler exited:\n" + "".join(lines))
        lines.append(line)
        if "Worker started" in line:
            break
    drain = threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True)
    drain.start()
    ps = psutil.Process(proc.pid)
    rss0 = ps.memory_info().rss
    peak = [rss0]
    stop = threading.Event()

    tree_peak = [rss0]

    def watch():
        while not stop.wait(0.05):
            try:
                rss = ps.memory_info().rss
                peak[0] = max(peak[0], rss)
                for child in ps.children(recursive=True):  # the recording process
                    rss += child.memory_info().rss
                tree_peak[0] = max(tree_peak[0], rss)
            except psutil.Error:
                return

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    cpu0 = ps.cpu_times()
    sim = simulator(broker, devices, images, prefix, wait_ack=True)
    cpu1 = ps.cpu_times()
    stop.set()
    proc.terminate()
    proc.wait(60)
    drain.join(5)
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "select count(*), count(distinct flow_run_id), count(flow_run_id) from captures"
            " where device_id like %s and ingest_status = 'stored'",
            [prefix + "%"],
        )
        stored, runs, stamped = cur.fetchone()
    chunks_s = sim["chunks_sent"] / sim["elapsed_s"]
    return {
        "sim": sim,
        "images_s": sim["images_acked"] / sim["elapsed_s"],
        "chunks_s": chunks_s,
        "stored": stored,
        "flow_runs": runs,
        "stamped": stamped,
        "rss0": rss0,
        "peak_rss": peak[0],
        "tree_peak_rss": tree_peak[0],
        "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        "summary": next((x for x in lines if "Worker stopped" in x), "").strip(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--no-prefect-too", action="store_true", help="also run --no-prefect")
    ap.add_argument("--flow-ack-path-too", action="store_true", help="also --ack-path flow")
    ap.add_argument(
        "--log-control-only-too",
        action="store_true",
        help="also run with CAMFLEET_MQTT_LOG_CONTROL_ONLY (no chunk rows in the publish log)",
    )
    ap.add_argument(
        "--recorder-process-too",
        action="store_true",
        help="also run with the recording flow runs in a child process (--recorder process)",
    )
    args = ap.parse_args()
    d, m = args.devices, args.images
    print(
        f"camfleet MQTT ingest benchmark: {d} devices x {m} images x {CHUNKS_PER_IMAGE} chunks"
        f" (1 KiB, QoS 1), {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    with (
        MosquittoInstance(persistence=False) as broker,
        PostgresInstance(fast=True) as pg,
        tempfile.TemporaryDirectory() as tmp,
    ):
        dsn = pg.create_database("bench_mqtt")
        db.migrate(dsn)
        prefect_db = pg.create_database("bench_prefect")
        with PrefectServerInstance(services=False, database_url=prefect_db) as prefect:
            os.environ["PREFECT_API_URL"] = prefect.api_url
            plain = bench_plain(broker, d, m)
            full = bench_full(broker, dsn, Path(tmp) / "objects", d, m, "F0110A")
            extra = []
            if args.log_control_only_too:
                r = bench_full(
                    broker, dsn, Path(tmp) / "o3", d, m, "C0C0C0", ("--log-control-only",)
                )
                extra.append(("(b') full, --log-control-only", r))
            if args.flow_ack_path_too:
                r = bench_full(
                    broker, dsn, Path(tmp) / "o4", d, m, "F10F10", ("--ack-path", "flow")
                )
                extra.append(("(b'') full, --ack-path flow", r))
            if args.recorder_process_too:
                r = bench_full(
                    broker, dsn, Path(tmp) / "o5", d, m, "9E0C09", ("--recorder", "process")
                )
                extra.append(("(b3) full, --recorder process", r))
            if args.no_prefect_too:
                r = bench_full(broker, dsn, Path(tmp) / "o2", d, m, "D12EC7", ("--no-prefect",))
                extra.append(("(c) full, --no-prefect (no flow runs)", r))
            plain2 = bench_plain(broker, d, m)  # again, the box's load drifts
    plain["chunks_s"] = (plain["chunks_s"] + plain2["chunks_s"]) / 2
    plain["images_s"] = (plain["images_s"] + plain2["images_s"]) / 2
    inflight = d * IMAGE_BYTES  # at most one image per device in flight
    mb = 1024 * 1024
    print()
    print(f"{'path':<46}{'images/s':>10}{'chunks/s':>10}{'ratio':>8}")
    print(
        f"{'(a) plain paho subscriber (count only)':<46}"
        f"{plain['images_s']:>10.1f}{plain['chunks_s']:>10.0f}{'1.00':>8}"
    )
    rows = [("(b) full: assemble+store+PG+ACK, record run", full), *extra]
    for label, r in rows:
        print(
            f"{label:<46}{r['images_s']:>10.1f}{r['chunks_s']:>10.0f}"
            f"{r['chunks_s'] / plain['chunks_s']:>8.2f}"
        )
    print()
    for label, r in rows:
        s = r["sim"]
        print(f"{label}:")
        print(
            f"   images acked {s['images_acked']}/{d * m}, failed {s['images_failed']}, "
            f"rows stored {r['stored']}, flow runs {r['flow_runs']} "
            f"(run id on {r['stamped']} rows)"
        )
        print(
            f"   ACK_OK latency after last chunk: p50 {s['ack_p50_s'] * 1000:.0f} ms, "
            f"p99 {s['ack_p99_s'] * 1000:.0f} ms; NACKs {s['nacks']}, resends {s['resends']}"
        )
        print(
            f"   assembler RSS: start {r['rss0'] / mb:.0f} MB, peak {r['peak_rss'] / mb:.0f} MB "
            f"(target <= 150 MB + 1.2 x {inflight / mb:.1f} MB in flight = "
            f"{150 + 1.2 * inflight / mb:.0f} MB); with any recording child process "
            f"{r['tree_peak_rss'] / mb:.0f} MB; CPU {r['cpu_s']:.1f} s"
        )
        print(f"   {r['summary']}")
    print(
        f"(a) stream: {plain['chunks']} chunk messages in {plain['span']:.2f} s, then "
        f"{plain2['span']:.2f} s after the full runs (ratio uses the mean rate)"
    )


if __name__ == "__main__":
    main()
