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

--under-stack: after those rounds ("quiet": nothing of ours but the benchmark; other
users of the machine as they are, their load printed beside each figure), start a real
`camfleet up --demo` (fresh data directory, free loopback ports, its own PostgreSQL,
Mosquitto and Prefect server, two assemblers, two signers, the API, the served
deployments and simulated devices of every kind), wait for its "camfleet is up", run
the same rounds again beside it, then stop it with Ctrl-C (SIGINT to its process group).
The benchmark's broker, PostgreSQL and Prefect server stay its own, so the stack only
competes for the machine (CPU, disk, memory), the way the other services of a one-box
install compete with the assembler. The loaded figure is the (b)/(a) ratio measured
that way: both (a) and (b) run beside the stack, so it says how much more the full
path loses to a busy machine than a bare subscriber does. Printed: both ratios' ranges,
loaded minus quiet (medians; issue 20 wants it within 0.1), the load average and the
stack's CPU (with all its processes) and the rest of the box's during the loaded rounds.
Measured 2026-12-03 (three runs, defaults, no quiet machine: other users at 72-131 % of
a core in the rounds without the stack): (b)/(a) without / beside the stack (medians)
0.30 / 0.34 (+0.04, 10:35), 0.29 / 0.41 (+0.11, 10:42), 0.37 / 0.32 (-0.04, 10:47);
rounds spread 0.20-0.45. The stack used 36-70 % of a core beside them, load 8.4-26.7;
ACK_OK p99 2.2-7.1 s beside it (1.1-3.6 s without). Within 0.1 in two runs of three:
the tolerance is narrower than a run's own spread on this shared box.

    .venv/bin/python bench/bench_mqtt_ingest.py [--devices 100] [--images 10] \
        [--publishers 3] [--repeat 3] [--baseline-publisher mosquitto_pub|python] \
        [--no-prefect-too] [--profile DIR] [--under-stack]

Targets (issue 20): ratio >= 0.85, ACK_OK p99 <= 0.5 s at 100 devices, RSS within
150 MB + 1.2 x in flight; the ratio within 0.1 of its quiet value under `camfleet up`
load. Figures: README's benchmark table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import statistics
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
    free_port,
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
def bench_plain(broker, pg, devices, images, publishers, prefix, compiled=None, more=None):
    """compiled: a work directory -> the devices are `mosquitto_pub` processes;
    more: CpuMeter groups of load beside it (the `camfleet up` of --under-stack)."""
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
    with CpuMeter({**groups, **(more or {})}, background=more or ()) as meter:
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
    broker,
    pg,
    dsn,
    objects,
    devices,
    images,
    publishers,
    prefix,
    extra_args=(),
    profile=None,
    more=None,
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
        **(more or {}),
    }
    with CpuMeter(groups, background=more or ()) as meter:
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


# -- --under-stack: the other services of `camfleet up` as the machine's load -------------
UP_READY = "camfleet is up"
UP_READY_TIMEOUT_S = 420  # a fresh data dir: initdb, migrations, Prefect server, deployments
UP_STOP_GRACE_S = 120  # up stops its services (each with its own grace) then PostgreSQL


class CamfleetUp:
    """A real `camfleet up --demo` in a fresh data directory, on free loopback ports.

    Its PostgreSQL, Mosquitto and Prefect server are its own, not the benchmark's: the
    environment it gets has none of our PREFECT_*, MQTT_*, CAMFLEET_*, DATABASE_URL or
    STORAGE_URL. It runs in a process group of its own, so SIGINT to the group is a
    Ctrl-C in its terminal (click flushes each line, so its stdout is read line by line).
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="camfleet-bench-up-"))
        self.dir.chmod(0o755)  # as root, its PostgreSQL runs as `postgres` and must get in
        # What a fresh shell would have: none of our services (PREFECT_API_URL is the
        # benchmark's server by now), nor a user's stack settings or storage.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "MQTT_", "CAMFLEET_"))
            and k not in ("DATABASE_URL", "STORAGE_URL")
        }
        env |= {
            "CAMFLEET_DATA_DIR": str(self.dir / "data"),
            "PREFECT_HOME": str(self.dir / "prefect-home"),  # up activates a profile there
            "CAMFLEET_MQTT_PORT": str(free_port()),
            "CAMFLEET_PREFECT_PORT": str(free_port()),
            "CAMFLEET_API_PORT": str(free_port()),
        }
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(  # noqa: S603 - our own CLI, loopback only
            [sys.executable, "-m", "camfleet.cli", "up", "--demo"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        # Read its output for as long as it runs: a full pipe would stall it.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if UP_READY in line:
                self.ready.set()

    def output(self, last: int = 60) -> str:
        return "".join(self.lines[-last:])

    def wait_ready(self, timeout: float = UP_READY_TIMEOUT_S) -> float:
        """Seconds until it printed UP_READY (it prints that once its services serve)."""
        t0 = time.monotonic()
        while not self.ready.wait(0.5):
            if self.proc.poll() is not None:
                self.reader.join(5)
                raise RuntimeError(f"camfleet up exited ({self.proc.returncode}):\n{self.output()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"camfleet up not up after {timeout:.0f} s:\n{self.output()}")
        return time.monotonic() - t0

    @property
    def groups(self) -> dict[str, object]:
        """The CpuMeter group of the whole stack: up with every descendant (its services
        run in sessions of their own, but stay its children)."""
        return {"camfleet up": self.proc.pid}

    def stop(self) -> int | None:
        """Ctrl-C to its process group; kill what is left after UP_STOP_GRACE_S."""
        if self.proc.poll() is None:
            try:
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(UP_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                print(f"   camfleet up still running after {UP_STOP_GRACE_S} s: killed")
                os.killpg(self.proc.pid, signal.SIGKILL)
                for child in tree:  # its services, in sessions of their own
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass
                self.proc.wait(30)
        self.reader.join(10)
        if "stopped." not in "".join(self.lines[-5:]):
            print(f"   camfleet up did not say 'stopped.':\n{self.output(20)}")
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


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
    ap.add_argument(
        "--under-stack",
        action="store_true",
        help="after the rounds, start `camfleet up --demo` and run them again beside it "
        "(issue 20: the loaded ratio within 0.1 of the quiet one)",
    )
    args = ap.parse_args()
    d, m = args.devices, args.images
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
    chosen = {label: (opts, pre) for f, (label, opts, pre) in variants.items() if getattr(args, f)}
    loaded = None
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
            quiet = rounds(args, broker, pg, dsn, Path(tmp), chosen, first=0)
            if args.under_stack:
                loaded = under_stack(args, broker, pg, dsn, Path(tmp), chosen)
    summary(args, "summary", *quiet, load_average())
    if loaded is not None:
        rows, load_end, up_s = loaded
        summary(args, "under `camfleet up --demo`: summary", *rows, load_end)
        compare(quiet, rows, up_s)
    if args.profile:
        raw = args.profile / "assembler.txt"
        print(f"where the assembler's busy samples went in the first (b) run ({raw}):")
        for pct, name in profile_summary(raw):
            print(f"  {pct:5.1f}%  {name}")


def rounds(args, broker, pg, dsn, tmp: Path, chosen, first: int, tag: str = "", more=None):
    """--repeat repetitions of (a) then (b) (then each chosen (c)), each (b) beside its
    own (a). Device ids and directories are numbered from `first`, so the rows of two
    series in one database never mix; `tag` marks the series' lines, `more` adds
    CpuMeter groups. Returns (plain, full, {label of (c): rows})."""
    d, m = args.devices, args.images
    plain, full = [], []
    extra: dict[str, list] = {label: [] for label in chosen}
    for i in range(args.repeat):
        k = first + i
        compiled = tmp / f"pub{k}" if args.baseline_publisher == "mosquitto_pub" else None
        a = bench_plain(broker, pg, d, m, args.publishers, f"BA{k:02X}00", compiled, more)
        print(
            f"[{tag}{i + 1}] (a) plain subscriber {a['chunks_s']:7,.0f} chunks/s  "
            f"{a['meter'].line()}",
            flush=True,
        )
        b = bench_full(
            broker,
            pg,
            dsn,
            tmp / f"objects{k}",
            d,
            m,
            args.publishers,
            f"F0{k:02X}00",
            profile=args.profile if k == 0 else None,
            more=more,
        )
        print(
            f"[{tag}{i + 1}] (b) full path        {b['chunks_s']:7,.0f} chunks/s  "
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
                tmp / f"o-{pre}-{k}",
                d,
                m,
                args.publishers,
                f"{pre}{k:02X}00",
                opts,
                more=more,
            )
            print(
                f"[{tag}{i + 1}] {label:<20} {c['chunks_s']:7,.0f} chunks/s  "
                f"ratio {c['chunks_s'] / a['chunks_s']:.2f}  {c['meter'].line()}",
                flush=True,
            )
            extra[label].append(c)
    return plain, full, extra


def under_stack(args, broker, pg, dsn, tmp: Path, chosen):
    """The same rounds again while `camfleet up --demo` runs beside them (our broker,
    PostgreSQL and Prefect server stay ours). Returns (rows, load at their end, seconds
    until up said it was up)."""
    print(f"starting `camfleet up --demo` (load {load_average()})...", flush=True)
    stack = CamfleetUp()
    try:
        up_s = stack.wait_ready()
        print(f"camfleet is up after {up_s:.0f} s (load {load_average()})", flush=True)
        rows = rounds(
            args, broker, pg, dsn, tmp, chosen, first=args.repeat, tag="L", more=stack.groups
        )
        load_end = load_average()
    finally:
        print("stopping `camfleet up` (SIGINT to its process group)...", flush=True)
        code = stack.stop()
        print(f"camfleet up exited with {code}", flush=True)
    return rows, load_end, up_s


def summary(args, title: str, plain, full, extra, load_now: str) -> None:
    d, m = args.devices, args.images
    mb = 1024 * 1024
    inflight = d * IMAGE_BYTES  # at most one image per device in flight
    print()
    print(f"{title} over {args.repeat} repetitions (range, median), load now {load_now}")
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


LOADED_TOLERANCE = 0.1  # issue 20: the loaded ratio within 0.1 of the quiet one


def compare(quiet, loaded, up_s: float) -> None:
    """Each ratio quiet and under the stack, the difference of the medians, and what the
    stack and the rest of the machine used while the loaded rounds ran."""
    q_plain, q_full, q_extra = quiet
    l_plain, l_full, l_extra = loaded
    print()
    print(
        "quiet vs under `camfleet up --demo` (issue 20: the loaded ratio within "
        f"{LOADED_TOLERANCE} of the quiet one)"
    )
    for label, q_rows, l_rows in (
        ("(b) full path", q_full, l_full),
        *((k, q_extra[k], l_extra[k]) for k in q_extra),
    ):
        q = [r["chunks_s"] / a["chunks_s"] for r, a in zip(q_rows, q_plain, strict=False)]
        lo = [r["chunks_s"] / a["chunks_s"] for r, a in zip(l_rows, l_plain, strict=False)]
        diff = statistics.median(lo) - statistics.median(q)
        met = "yes" if abs(diff) <= LOADED_TOLERANCE else "no"
        print(f"  {label}: ratio to (a)")
        print(f"      quiet                   {span(q, '{:.2f}')}")
        print(f"      under the stack         {span(lo, '{:.2f}')}")
        print(f"      loaded - quiet (medians) {diff:+.2f}   within {LOADED_TOLERANCE}: {met}")
    print("  (a) and (b) measurements; load = 1-minute load average at the end of each:")
    for name, plain, full in (("quiet", q_plain, q_full), ("loaded", l_plain, l_full)):
        meters = [r["meter"] for r in (*plain, *full)]
        print(f"      {name:<7} load {span((m.load1[0] for m in meters), '{:.2f}')}")
    print(f"  `camfleet up --demo` (ready {up_s:.0f} s after start), % of one core:")
    for name, rows in (("(a)", l_plain), ("(b)", l_full)):
        meters = [r["meter"] for r in rows]
        stack = [m.pct()["camfleet up"] for m in meters]
        rest = [max(0.0, m.box_pct() - sum(m.pct().values())) for m in meters]
        box = [m.box_pct() for m in meters]
        print(
            f"      during {name}: the stack {span(stack)}, rest of the box {span(rest)}, "
            f"whole machine {span(box)} of {100 * (os.cpu_count() or 1)}"
        )


if __name__ == "__main__":
    main()
