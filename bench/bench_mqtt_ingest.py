"""MQTT chunk ingest (seed 002): full ingest path vs a plain subscriber, same stream.

What the baseline is the limit of: (a) is the rate at which ONE Python paho subscriber
can take the chunk stream off one Mosquitto on this machine, i.e. the ceiling for any
single-process Python ingester. The load generator must not be the limit: by default
(--baseline-publisher mosquitto_pub) (a)'s devices are compiled clients, one
`mosquitto_pub -l` per device topic fed its pre-encoded lines (metadata + 45 chunk
JSON lines per image) from a file, so (a) measures the broker and the subscriber; each
run prints the CPU of every process and names the one that was CPU-bound (or the
machine's cores). The Python simulator (--baseline-publisher python, and always for
(b), whose devices must wait for ACK_OK and answer NACKs like the firmware) runs in
--publishers separate processes; its publishers together used 2-3x the subscriber's CPU
(62-97 % of a core against 18-29 % at load 6-7, 2026-12-03), taking CPU on two shared
cores that the subscriber could use. The 100 mosquitto_pub devices used 15-26 % of a
core together (2026-12-03, load 4.5-7.4), the subscriber 50-60 %.
With the devices in one Python process the baseline measured what the devices could
send (1.9-2.6k chunks/s, where one fast publisher moves 7.5-9.5k through Mosquitto to a
counting subscriber: issue 20). On a loaded machine (other users at 100-480 % of the
two cores) the cores are the limit of (a) and (b) alike: compare ratios, not rates.

On one private Mosquitto (started here, loopback only), with --devices simulated
ESP32-CAMs sending --images 45-chunk images each at QoS 1:

 (a) baseline: a plain paho subscriber (separate process) that only counts the chunk
     messages of the stream (devices fire and forget);
 (b) full path: the real `camfleet assembler` process (assemble, store in a local
     directory, PostgreSQL rows, ACK_OK, one recording Prefect flow run per interval);
     devices wait for ACK_OK (and answer NACKs) like the firmware.
 (c) optionally the same full path with other assembler options, each beside the same
     (a): --no-prefect-too, --log-control-only-too (no chunk rows in the publish log),
     --flow-ack-path-too (--ack-path flow), --recorder-process-too (--recorder process).

(a) and (b) run side by side --repeat times (default 3) in one run; each repetition's
ratio is b/a of that repetition, and the ranges are printed. Beside each figure: the
load average and the CPU (% of one core) of broker, subscriber/assembler, publishers,
PostgreSQL and the rest of the box. Also ACK_OK latency p50/p99 after each image's last
chunk, NACKs, and the assembler's peak RSS next to the bytes of images in flight.

--profile DIR records the first (b) repetition's assembler with py-spy (if installed)
into DIR/assembler.svg and DIR/assembler.txt (collapsed stacks).

    .venv/bin/python bench/bench_mqtt_ingest.py [--devices 100] [--images 10] \
        [--publishers 3] [--repeat 3] [--baseline-publisher mosquitto_pub|python] \
        [--no-prefect-too] [--profile DIR]

Targets (issue 20): ratio >= 0.85, ACK_OK p99 <= 0.5 s at 100 devices, RSS within
150 MB + 1.2 x in flight; the ratio within 0.1 of its quiet value under `camfleet up`
load. Figures: README's benchmark table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
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
sys.path.insert(0, str(ROOT / "bench"))

from benchstat import CpuMeter, load_average, span  # noqa: E402

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
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=sys.argv[5])
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, port); c.loop_start()
    end = time.monotonic() + float(sys.argv[4])
    while not done.wait(0.05) and time.monotonic() < end:
        if last is not None and time.monotonic() - last > 10:
            break  # the stream ended short of `expected`: report what came

    c.disconnect(); c.loop_stop()
    print(f"{n} {first} {last}", flush=True)
    sys.stdin.readline()  # stay until the benchmark has read this process's CPU time
    """
)


# -- the load generator: the fleet split over several processes -------------------------
class _Broker:
    """What Esp32Fleet needs of the MQTT block, without importing Prefect per process."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def client(self, client_id: str):
        import paho.mqtt.client as mqtt

        return mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
        )


def _publisher(host, port, prefix, devices, images, wait_ack, seed, go, done, results):
    """One load-generator process: `devices` simulated ESP32-CAMs on one connection."""
    from camfleet.simulators.esp32 import Esp32Fleet, SimOptions

    opts = SimOptions(
        devices=devices,
        images=images,
        image_bytes=IMAGE_BYTES,
        wait_ack=wait_ack,
        ack_timeout=20,
        id_prefix=prefix,
        seed=seed,
    )
    fleet = Esp32Fleet(_Broker(host, port), opts)
    results.put("ready")
    go.wait()
    t0 = time.time()
    r = fleet.run()
    results.put(
        {
            "start": t0,
            "end": t0 + r.elapsed,
            "images_sent": r.images_sent,
            "images_acked": r.images_acked,
            "images_failed": r.images_failed,
            "chunks_sent": r.chunks_sent,
            "nacks": r.nacks,
            "resends": r.resends,
            "lat": r.ack_latencies,
        }
    )
    done.wait(600)  # stay until the benchmark has read this process's CPU time


class Publishers:
    """--publishers processes, started and connected-ready before the clock starts."""

    def __init__(self, broker, n: int, devices: int, images: int, prefix: str, wait_ack: bool):
        ctx = mp.get_context("spawn")  # no threads of this process carried over
        self.go, self.done = ctx.Event(), ctx.Event()
        self.results = ctx.Queue()
        n = max(1, min(n, devices))
        share = [devices // n + (k < devices % n) for k in range(n)]
        self.procs = [
            ctx.Process(
                target=_publisher,
                args=(
                    broker.host,
                    broker.port,
                    f"{prefix[:4]}{k:02X}",
                    share[k],
                    images,
                    wait_ack,
                    k,
                    self.go,
                    self.done,
                    self.results,
                ),
                daemon=True,
            )
            for k in range(n)
        ]
        for p in self.procs:
            p.start()
        for _ in self.procs:  # imported and set up: off the clock
            assert self.results.get(timeout=120) == "ready"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, timeout: float = 600) -> dict:
        self.go.set()
        got = [self.results.get(timeout=timeout) for _ in self.procs]
        lat = sorted(x for g in got for x in g["lat"])
        out = {
            k: sum(g[k] for g in got)
            for k in (
                "images_sent",
                "images_acked",
                "images_failed",
                "chunks_sent",
                "nacks",
                "resends",
            )
        }
        out["elapsed_s"] = max(g["end"] for g in got) - min(g["start"] for g in got)
        out["ack_p50_s"] = lat[len(lat) // 2] if lat else float("nan")
        out["ack_p99_s"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        return out

    def close(self) -> None:
        self.done.set()
        for p in self.procs:
            p.join(30)


# The baseline's devices as compiled clients: one `mosquitto_pub -l` per device topic,
# fed its pre-encoded stream (per image: the metadata, then the 45 chunk JSON lines the
# simulator sends) from a file. Each runs under `sh`, which waits for "go", runs it,
# then stays until the benchmark has read its CPU (the finished child's time counts).
MOSQUITTO_PUB_SH = 'read _; mosquitto_pub "$@" < "$0"; read _'


class CompiledPublishers:
    def __init__(self, broker, devices: int, images: int, prefix: str, workdir: Path):
        import base64
        import json
        import random

        from camfleet.simulators.esp32 import device_id, fake_jpeg

        self.procs, self.workdir = [], workdir
        workdir.mkdir(parents=True, exist_ok=True)
        for i in range(devices):
            dev, rnd = device_id(prefix, i), random.Random(i)
            lines = []
            for j in range(images):
                data, name = fake_jpeg(IMAGE_BYTES, rnd), f"image_{j}.jpg"
                meta = {"device_id": dev, "image_name": name, "image_size": len(data)}
                meta |= {"max_chunks_size": 1024, "total_chunk_count": CHUNKS_PER_IMAGE}
                lines.append(json.dumps(meta, separators=(",", ":")))
                for cid in range(CHUNKS_PER_IMAGE):
                    part = base64.b64encode(data[cid * 1024 : (cid + 1) * 1024]).decode()
                    chunk = {"device_id": dev, "image_name": name, "chunk_id": cid}
                    chunk |= {"max_chunk_size": 1024, "payload": part}
                    lines.append(json.dumps(chunk, separators=(",", ":")))
            path = workdir / f"{dev}.lines"
            path.write_text("\n".join(lines) + "\n")
            cmd = ["sh", "-c", MOSQUITTO_PUB_SH, str(path), "-h", broker.host]
            cmd += ["-p", str(broker.port), "-q", "1", "-i", f"pub-{dev}"]
            cmd += ["-t", f"ESP32CAM/{dev}/data", "-l"]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, timeout: float = 600) -> dict:
        t0 = time.time()
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return {"start": t0}

    def close(self) -> None:
        for p in self.procs:
            p.stdin.write("done\n")
            p.stdin.close()
        for p in self.procs:
            p.wait(30)
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- (a) the plain subscriber -------------------------------------------------------------
def bench_plain(broker, pg, devices, images, publishers, prefix, compiled=None):
    """compiled: a work directory -> the devices are `mosquitto_pub` processes."""
    expected = devices * images * CHUNKS_PER_IMAGE
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(COUNTER)
    counter = subprocess.Popen(
        [
            sys.executable,
            f.name,
            broker.host,
            str(broker.port),
            str(expected),
            "300",
            f"plain-{prefix}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert counter.stdout.readline().strip() == "ready"
    if compiled is not None:
        pubs = CompiledPublishers(broker, devices, images, prefix, compiled)
    else:
        pubs = Publishers(broker, publishers, devices, images, prefix, wait_ack=False)
    groups = {"broker": broker.pid, "subscriber": counter.pid, "publishers": pubs.pids}
    with CpuMeter(groups) as meter:
        sim = pubs.run()
        n, first, last = counter.stdout.readline().split()
    pubs.close()
    counter.communicate(timeout=30)
    os.unlink(f.name)
    n = int(n)
    span_s = float(last) - float(first)
    if n < expected:
        print(f"   warning: the plain subscriber got {n} of {expected} chunk messages")
    return {"chunks": n, "span": span_s, "chunks_s": n / span_s, "sim": sim, "meter": meter}


# -- (b) the full path --------------------------------------------------------------------
def bench_full(
    broker, pg, dsn, objects, devices, images, publishers, prefix, extra_args=(), profile=None
):
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
    cmd = [sys.executable, "-m", "camfleet.cli", "assembler", *extra_args]
    if profile is not None:
        # py-spy starts the assembler as its child (no ptrace permission needed) and
        # samples every thread, idle ones too, so GIL waits show.
        profile.mkdir(parents=True, exist_ok=True)
        cmd = [
            shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--subprocesses",
            "--idle",
            "--rate",
            "50",
            "--format",
            "raw",
            "-o",
            str(profile / "assembler.txt"),
            "--",
            *cmd,
        ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
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
    root = psutil.Process(proc.pid)
    ps = root if profile is None else root.children()[0]
    rss0 = ps.memory_info().rss
    peak = [rss0]
    stop = threading.Event()

    def watch():
        while not stop.wait(0.05):
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.Error:
                return

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    pubs = Publishers(broker, publishers, devices, images, prefix, wait_ack=True)
    groups = {
        "broker": broker.pid,
        "assembler": ps,
        "postgres": pg.pid,
        "publishers": pubs.pids,
    }
    with CpuMeter(groups) as meter:
        sim = pubs.run()
    pubs.close()
    stop.set()
    if profile is not None:
        ps.send_signal(15)
        ps.wait(60)
        proc.wait(120)
    else:
        proc.terminate()
        proc.wait(60)
    drain.join(5)
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "select count(*), count(distinct flow_run_id), count(flow_run_id) from captures"
            " where device_id like %s and ingest_status = 'stored'",
            [prefix[:4] + "%"],
        )
        stored, runs, stamped = cur.fetchone()
    return {
        "sim": sim,
        "chunks_s": sim["chunks_sent"] / sim["elapsed_s"],
        "stored": stored,
        "flow_runs": runs,
        "stamped": stamped,
        "rss0": rss0,
        "peak_rss": peak[0],
        "meter": meter,
        "summary": next((x for x in lines if "Worker stopped" in x), "").strip(),
    }


# Where the assembler's busy samples go (py-spy --idle --format raw: "stack count" lines).
# A sample whose innermost frame is one of these waits is idle, not work.
_IDLE = (
    "concurrent/futures/thread.py:81",
    "EpollSelector.select",
    "Condition.wait",
    "heartbeat_loop",
    "_wait_for_tstate_lock",
    "_read_from_self",
    "AssemblerService._db_writer (services/assembler/__init__.py:494)",  # its sleep
    "AssemblerService._worker (services/assembler/__init__.py:340)",  # inbox.get
)
_CATEGORIES = (
    ("storage fsync (file + directory)", ("local.py:120", "local.py:138")),
    (
        "storage write/rename/mkdir",
        ("_write_atomically", "LocalStore.put", "mkstemp", "fdopen", "Path.mkdir"),
    ),
    ("JSON decode", ("json/decoder", "loads (json")),
    ("base64 decode", ("b64decode", "binascii")),
    ("SHA-256", ("sha256",)),
    ("PostgreSQL row writes", ("aiosql", "psycopg2", "_copy_publish_log", "Pool.connection")),
    ("paho network thread", ("paho/mqtt",)),
    ("Prefect recorder / asyncio", ("prefect", "asyncio", "Recorder", "httpx", "ssl.py")),
)


def profile_summary(raw: Path) -> list[tuple[float, str]]:
    """(% of busy samples, category), largest first."""
    cats: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or any(w in stack.rsplit(";", 1)[-1] for w in _IDLE):
            continue
        total += int(n)
        name = next((c for c, keys in _CATEGORIES if any(k in stack for k in keys)), "other")
        cats[name] = cats.get(name, 0) + int(n)
    return sorted(((100 * v / max(1, total), k) for k, v in cats.items()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--publishers", type=int, default=3, help="load-generator processes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--baseline-publisher",
        choices=("mosquitto_pub", "python"),
        default="mosquitto_pub" if shutil.which("mosquitto_pub") else "python",
        help="(a)'s devices: one compiled mosquitto_pub per device (default when "
        "installed, so (a) measures the broker and subscriber) or the Python simulator",
    )
    variants = {  # flag -> (label, assembler options, device-id prefix)
        "no_prefect_too": ("(c) --no-prefect", ("--no-prefect",), "D1"),
        "log_control_only_too": ("(c) --log-control-only", ("--log-control-only",), "C0"),
        "flow_ack_path_too": ("(c) --ack-path flow", ("--ack-path", "flow"), "F1"),
        "recorder_process_too": ("(c) --recorder process", ("--recorder", "process"), "9E"),
    }
    for flag, (label, _, _) in variants.items():
        ap.add_argument("--" + flag.replace("_", "-"), action="store_true", help=f"also {label}")
    ap.add_argument("--profile", type=Path, help="py-spy the first (b) run into this dir")
    args = ap.parse_args()
    d, m = args.devices, args.images
    mb = 1024 * 1024
    if args.baseline_publisher == "mosquitto_pub":
        a_pub = f"{d} mosquitto_pub -l processes (one per device topic)"
    else:
        a_pub = f"{args.publishers} Python publisher processes"
    print(
        f"camfleet MQTT ingest benchmark: {d} devices x {m} images x {CHUNKS_PER_IMAGE} chunks"
        f" (1 KiB, QoS 1), (a) devices: {a_pub}, (b) devices: {args.publishers} Python"
        f" publisher processes, {os.cpu_count()} CPUs,"
        f" {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {load_average()}"
    )
    plain, full = [], []
    chosen = {label: (opts, pre) for f, (label, opts, pre) in variants.items() if getattr(args, f)}
    extra: dict[str, list] = {label: [] for label in chosen}
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
            for i in range(args.repeat):
                compiled = (
                    Path(tmp) / f"pub{i}" if args.baseline_publisher == "mosquitto_pub" else None
                )
                a = bench_plain(broker, pg, d, m, args.publishers, f"BA{i:02X}00", compiled)
                print(
                    f"[{i + 1}] (a) plain subscriber {a['chunks_s']:7,.0f} chunks/s  "
                    f"{a['meter'].line()}",
                    flush=True,
                )
                b = bench_full(
                    broker,
                    pg,
                    dsn,
                    Path(tmp) / f"objects{i}",
                    d,
                    m,
                    args.publishers,
                    f"F0{i:02X}00",
                    profile=args.profile if i == 0 else None,
                )
                print(
                    f"[{i + 1}] (b) full path        {b['chunks_s']:7,.0f} chunks/s  "
                    f"ratio {b['chunks_s'] / a['chunks_s']:.2f}  "
                    f"ACK p99 {b['sim']['ack_p99_s'] * 1000:.0f} ms  {b['meter'].line()}",
                    flush=True,
                )
                plain.append(a)
                full.append(b)
                for label, (opts, pre) in chosen.items():
                    c = bench_full(
                        broker,
                        pg,
                        dsn,
                        Path(tmp) / f"o-{pre}-{i}",
                        d,
                        m,
                        args.publishers,
                        f"{pre}{i:02X}00",
                        opts,
                    )
                    print(
                        f"[{i + 1}] {label:<20} {c['chunks_s']:7,.0f} chunks/s  "
                        f"ratio {c['chunks_s'] / a['chunks_s']:.2f}  {c['meter'].line()}",
                        flush=True,
                    )
                    extra[label].append(c)
    inflight = d * IMAGE_BYTES  # at most one image per device in flight
    print()
    print(f"summary over {args.repeat} repetitions (range, median), load now {load_average()}")
    print(f"  (a) plain paho subscriber   {span(a['chunks_s'] for a in plain)} chunks/s")
    for label, rows in (("(b) full path", full), *extra.items()):
        if not rows:
            continue
        ratios = [r["chunks_s"] / a["chunks_s"] for r, a in zip(rows, plain, strict=False)]
        print(f"  {label:<26}  {span(r['chunks_s'] for r in rows)} chunks/s")
        print(f"      ratio to (a)            {span(ratios, '{:.2f}')}   (target >= 0.85)")
        print(
            f"      ACK_OK p99              "
            f"{span((r['sim']['ack_p99_s'] * 1000 for r in rows), '{:.0f}')} ms"
            f"   p50 {span((r['sim']['ack_p50_s'] * 1000 for r in rows), '{:.0f}')} ms"
            f"   (target p99 <= 500 ms)"
        )
        print(
            f"      assembler peak RSS      {span(r['peak_rss'] / mb for r in rows)} MB "
            f"(start {span(r['rss0'] / mb for r in rows)} MB; target <= 150 + 1.2 x "
            f"{inflight / mb:.1f} = {150 + 1.2 * inflight / mb:.0f} MB)"
        )
        for r in rows:
            s = r["sim"]
            print(
                f"      acked {s['images_acked']}/{d * m}, failed {s['images_failed']}, "
                f"NACKs {s['nacks']}, resends {s['resends']}, rows stored {r['stored']}, "
                f"flow runs {r['flow_runs']} (run id on {r['stamped']} rows); {r['summary']}"
            )
    if args.profile:
        raw = args.profile / "assembler.txt"
        print(f"where the assembler's busy samples went in the first (b) run ({raw}):")
        for pct, name in profile_summary(raw):
            print(f"  {pct:5.1f}%  {name}")


if __name__ == "__main__":
    main()
