"""Assembler replicas (issue 15): 1 instance vs 3 leasing device partitions, same stream.

On one private Mosquitto and PostgreSQL (started here, loopback only), --devices
simulated ESP32-CAMs (a separate `camfleet simulate esp32` process) send --images
45-chunk images each at QoS 1 and wait for ACK_OK, like the firmware:

 (1) one `camfleet assembler` (the default: no partitions, no leases);
 (3) three `camfleet assembler --partitions 64 --replica-id rN`, balanced first;
 (F) three again, and the replica holding the most devices is SIGKILLed once a
     quarter of the images are stored.

A 2-core machine cannot show a speedup, so the figures are costs, side by side:
CPU seconds per image of all assembler processes together (and of the broker, which
delivers every message to every replica), ACK_OK p99 after an image's last chunk, and
for (F) how long after the SIGKILL the survivors held every partition and the last of
the victim's devices got an ACK_OK.  Devices resend an unACKed image after
--ack-timeout (default RETRANSMIT_DELAY_MS = 3 s); the issue's bound, 2 x
RETRANSMIT_DELAY_MS + the broker's session expiry (0 s: the replicas' sessions are
clean), leaves room for one resend that reaches nobody during the takeover.

What the 1-instance baseline is the limit of: one `camfleet assembler` (a single Python
process, one core at most) taking every chunk from Mosquitto, with the simulated devices
(one process, 4 MQTT clients) each waiting for its ACK_OK before the next image. So its
images/s is set by whichever of the assembler, the broker, PostgreSQL or the device
simulator is at its one-core ceiling, or, when none is, by the ACK round trips; on a
shared machine the cores themselves may be the limit. A small run on 2026-12-03 (12
devices x 2 images, load average ~1.7) found the device simulator at 78-82 % of a core
(its start-up included, which weighs more in a short run) and one assembler at 13 %:
check whether the simulator is the limit at full size before reading the ratios as the
assembler's. Every run prints the load average and the CPU of each process group beside
its figures (assemblers, broker, PostgreSQL, the device simulator as load generator, the
rest of the box) and names the one that limited it (bench/benchstat.py); the
configurations run --rounds times (default 3), one, three, kill, one, ... and the
summary prints the range of each figure over the rounds.

    .venv/bin/python bench/bench_assembler_replicas.py [--devices 60] [--images 6] [--rounds 3]

Measured 2026-12-03, 2 CPUs shared with other agents (load average 14-23), two runs:
3 replicas 1.09x / 1.12x the total assembler CPU per image of one (target <= 1.2x),
broker 1.44x / 1.04x, PostgreSQL 1.00x; SIGKILL: partitions taken 4.3 / 5.1 s, the last
of the victim's devices ACKed 10.9 / 12.0 s after it; 0 lost, 0 stored twice.  ACK p99
missed 1 s for one instance and for three alike at that load.  All figures and the
decision: docs/scaling.md.

Since replicas carry an MQTT will (2026-12-03 12:40, quiet box, load 1.7-3.5, 2 rounds
each, devices resending after 3 s, the previous commit run just before): partitions
taken 0.2-0.6 s after the SIGKILL (previous: 5.3 s, the lease TTL), the last of the
victim's 22 devices ACKed 4.2-5.0 s after it (previous: 7.7-8.9 s), within the 6 s
bound; 3 replicas 1.07-1.28x (median 1.17) the assembler CPU per image of one, ACK_OK
p99 0.48-0.64 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchstat import CpuMeter, load_average, span  # noqa: E402

from blocks.mqtt import MqttBroker  # noqa: E402
from camfleet import db  # noqa: E402
from camfleet.localsvc import MosquittoInstance, PostgresInstance, free_port  # noqa: E402
from camfleet.simulators.esp32 import device_id  # noqa: E402
from services.assembler.partitions import (  # noqa: E402
    DEFAULT_PARTITIONS,
    LEASE_TTL_S,
    partition_of,
)

CHUNKS_PER_IMAGE = 45
IMAGE_BYTES = CHUNKS_PER_IMAGE * 1024 - 100


def health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}


class Assembler:
    def __init__(self, broker, dsn, objects, replica=None):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            MQTT_HOST=broker.host,
            MQTT_PORT=str(broker.port),
            DATABASE_URL=dsn,
            STORAGE_URL=f"file://{objects}",
            MQTT_CLIENT_ID=f"bench-{uuid.uuid4().hex[:6]}",
            LOG_LEVEL="WARNING",
        )
        args = ["assembler", "--no-prefect", "--health-port", str(self.port)]
        if replica:
            args += ["--partitions", str(DEFAULT_PARTITIONS), "--replica-id", replica]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "camfleet.cli", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.cpu_at_kill = None

    def cpu(self) -> float:
        if self.cpu_at_kill is not None:
            return self.cpu_at_kill
        t = self.ps.cpu_times()
        return t.user + t.system

    def owned(self) -> set[int]:
        return set(health(self.port).get("partitions", {}).get("owned", []))

    def kill(self):
        # Not reaped here but in stop(): until then its CPU times stay readable (a
        # zombie), so the run's CpuMeter still counts what it used before it died.
        self.cpu_at_kill = self.cpu()
        self.proc.send_signal(signal.SIGKILL)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait(fn, timeout=120, step=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if v := fn():
            return v
        time.sleep(step)
    raise TimeoutError(getattr(fn, "__name__", "condition"))


class AckClock:
    """When each device got each ACK_OK (monotonic), from a separate subscriber."""

    def __init__(self, broker):
        self.acks: list[tuple[float, str]] = []
        ready = threading.Event()
        c = broker.client(client_id=f"ackclock-{uuid.uuid4().hex[:6]}")
        c.on_connect = lambda c, u, f, rc, p=None: c.subscribe("ESP32CAM/+/ack", qos=1)
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = lambda c, u, m: (
            b"ACK_OK" in m.payload and self.acks.append((time.monotonic(), m.topic.split("/")[1]))
        )
        c.connect(broker.host, broker.port)
        c.loop_start()
        ready.wait(15)
        self.c = c

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def start_simulator(broker, devices, images, prefix, ack_timeout) -> subprocess.Popen:
    args = [sys.executable, "-m", "camfleet.cli", "simulate", "esp32",
            "--devices", str(devices), "--images", str(images),
            "--image-bytes", str(IMAGE_BYTES), "--broker", f"{broker.host}:{broker.port}",
            "--id-prefix", prefix, "--json", "--ack-timeout", str(ack_timeout),
            "--clients", "4"]  # fmt: skip
    # stderr to a file, so that reading stdout to its end cannot block on a full pipe
    err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in simulator_result
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    proc.err_file = err
    return proc


def simulator_result(proc: subprocess.Popen, stdout: str) -> dict:
    """Its --json summary. Reaps it: until then its CPU times stay readable (a zombie)
    for the run's CpuMeter, which is why the reading thread only reads stdout."""
    proc.wait(1800)
    proc.err_file.seek(0)
    stderr = proc.err_file.read()
    proc.err_file.close()
    if proc.returncode not in (0, 1):
        raise RuntimeError(stderr[-2000:])
    return json.loads(stdout.strip().splitlines()[-1])


def captures(dsn) -> int:
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("select count(*) from captures")
        return cur.fetchone()[0]


def db_costs(dsn) -> dict:
    """Transactions, rows written and bytes on disk so far (pg_stat_database; the
    statistics reach it when the writing sessions end or within ~1 s)."""
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "select xact_commit, tup_inserted, tup_updated from pg_stat_database "
            "where datname = current_database()"
        )
        commits, inserted, updated = cur.fetchone()
        sizes = {}
        for table in ("captures", "sensor_readings", "device_publish_log"):
            cur.execute("select pg_total_relation_size(%s)", (table,))
            sizes[table] = cur.fetchone()[0]
    return {"commits": commits, "inserted": inserted, "updated": updated, "bytes": sizes}


def run(pg, broker, mosq_ps, name, replicas, args, kill=False, round_=0):
    dsn = pg.create_database(f"bench_{name}_{uuid.uuid4().hex[:6]}")
    db.migrate(dsn)
    objects = Path(args.workdir) / f"{name}{round_}"
    prefix = f"B{name.upper()[:3]}{round_}"  # each round its own devices and objects
    with db.connect(dsn) as conn, conn.cursor() as cur:  # a registered fleet
        cur.executemany(
            "insert into devices (device_id) values (%s)",
            [(device_id(prefix, i),) for i in range(args.devices)],
        )
    if replicas == 1:
        procs = [Assembler(broker, dsn, objects)]
    else:
        procs = [Assembler(broker, dsn, objects, f"r{i + 1}") for i in range(replicas)]
    try:
        wait(lambda: all(health(p.port).get("ready") for p in procs))
        if replicas > 1:  # balanced: every partition held, by one replica each
            every = set(range(DEFAULT_PARTITIONS))

            def balanced():
                bodies = [health(p.port).get("partitions", {}) for p in procs]
                held = [set(b.get("owned", ())) for b in bodies]
                subscribed = sum(b.get("device_subscriptions", 0) for b in bodies)
                pending = sum(b.get("subscribe_pending", 1) for b in bodies)
                return (
                    sum(map(len, held)) == len(every)
                    and set().union(*held) == every
                    and subscribed == args.devices
                    and not pending
                )

            wait(balanced)
        # fixed cost of the replicas when no device sends (lease rounds, timers)
        idle0 = [p.cpu() for p in procs]
        time.sleep(args.idle_window)
        idle = sum(p.cpu() - c for p, c in zip(procs, idle0, strict=True)) / args.idle_window
        clock = AckClock(broker)
        db0 = db_costs(dsn)
        cpu0 = [p.cpu() for p in procs]
        m0 = mosq_ps.cpu_times()
        pg0 = pg_cpu(pg)
        out: dict = {}
        t0 = time.monotonic()
        sim_proc = start_simulator(broker, args.devices, args.images, prefix, args.ack_timeout)
        sim = threading.Thread(target=lambda: out.setdefault("stdout", sim_proc.stdout.read()))
        groups = {
            "assemblers": [p.proc.pid for p in procs],
            "broker": mosq_ps,
            "postgres": pg.pid,
            "devices": sim_proc.pid,
        }
        with CpuMeter(groups) as meter:  # the devices' whole run, and a kill in it
            sim.start()
            failover = {}
            if kill:
                owners = [p.owned() for p in procs]
                devs = [device_id(prefix, i) for i in range(args.devices)]
                victim_i = max(
                    range(replicas),
                    key=lambda i: sum(
                        partition_of(d, DEFAULT_PARTITIONS) in owners[i] for d in devs
                    ),
                )
                victim = procs[victim_i]
                victim_devs = {
                    d for d in devs if partition_of(d, DEFAULT_PARTITIONS) in owners[victim_i]
                }
                wait(
                    lambda: captures(dsn) >= args.devices * args.images // 4, timeout=600, step=0.2
                )
                t_kill = time.monotonic()
                victim.kill()
                survivors = [p for p in procs if p is not victim]
                wait(lambda: sum(len(p.owned()) for p in survivors) == DEFAULT_PARTITIONS,
                     timeout=120, step=0.05)  # fmt: skip
                failover["partitions_taken_s"] = time.monotonic() - t_kill
            sim.join()
        elapsed = time.monotonic() - t0
        cpu = sum(p.cpu() - c for p, c in zip(procs, cpu0, strict=True))
        m1 = mosq_ps.cpu_times()
        pg1 = pg_cpu(pg)
        clock.close()
        r = simulator_result(sim_proc, out["stdout"])
        if kill:
            served = {}
            for t, dev in clock.acks:
                if dev in victim_devs and t > t_kill and dev not in served:
                    served[dev] = t - t_kill
            failover["victim_devices"] = len(victim_devs)
            failover["served_after_kill"] = len(served)
            failover["last_device_served_s"] = max(served.values()) if served else None
        images = r["images_acked"]
        for p in procs:  # their sessions end: the statistics are flushed
            p.stop()
        time.sleep(1.5)
        db1 = db_costs(dsn)
        per = max(1, images)
        return {
            "pg_commits_per_image": (db1["commits"] - db0["commits"]) / per,
            "pg_rows_inserted_per_image": (db1["inserted"] - db0["inserted"]) / per,
            "pg_rows_updated_per_image": (db1["updated"] - db0["updated"]) / per,
            "pg_bytes_per_image": {t: v / per for t, v in db1["bytes"].items()},
            "name": name,
            "replicas": replicas,
            "images": images,
            "failed": r["images_failed"],
            "resends": r.get("resends"),
            "stored": captures(dsn),
            "elapsed_s": elapsed,
            "images_s": images / elapsed,
            "cpu_ms_per_image": 1000 * cpu / max(1, images),
            "idle_cpu_ms_per_s": 1000 * idle,
            "net_cpu_ms_per_image": 1000 * max(0.0, cpu - idle * elapsed) / max(1, images),
            "broker_cpu_ms_per_image": 1000
            * ((m1.user + m1.system) - (m0.user + m0.system))
            / max(1, images),
            "pg_cpu_ms_per_image": 1000 * (pg1 - pg0) / max(1, images),
            "ack_p50_s": r.get("ack_p50_s"),
            "ack_p99_s": r.get("ack_p99_s"),
            **failover,
            "cpu_pct": meter.pct(),
            "limit": meter.limit(),
            "meter": meter.line(),
        }
    finally:
        for p in procs:
            p.stop()


def pg_cpu(pg) -> float:
    """CPU seconds of the PostgreSQL server and its backends so far (backends that
    ended meanwhile are lost: measure around a run whose sessions stay open)."""
    server = psutil.Process(pg.pid)
    total = 0.0
    for p in [server, *server.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def shared_state_probe(pg, images: int) -> dict:
    """The alternative not built: chunk state in PostgreSQL. Each chunk one autocommit
    INSERT (a replica must make it durable before the next may land elsewhere), then
    one SELECT of the image's chunks, one DELETE. PostgreSQL's CPU per image."""
    import base64
    import random

    dsn = pg.create_database(f"bench_chunks_{uuid.uuid4().hex[:6]}")
    conn = db.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute(
        "create table chunk_state (device text, image text, chunk int, payload text, "
        "primary key (device, image, chunk))"
    )
    payload = base64.b64encode(random.randbytes(1024)).decode()
    c0, t0 = pg_cpu(pg), time.monotonic()
    for i in range(images):
        for c in range(CHUNKS_PER_IMAGE):
            cur.execute(
                "insert into chunk_state values (%s, %s, %s, %s) on conflict do nothing",
                (f"D{i % 100}", f"img{i}", c, payload),
            )
        cur.execute(
            "select payload from chunk_state where device = %s and image = %s order by chunk",
            (f"D{i % 100}", f"img{i}"),
        )
        cur.fetchall()
        cur.execute("delete from chunk_state where device = %s and image = %s",
                    (f"D{i % 100}", f"img{i}"))  # fmt: skip
    wall, cpu = time.monotonic() - t0, pg_cpu(pg) - c0
    conn.close()
    return {"statements_per_image": CHUNKS_PER_IMAGE + 2,
            "pg_cpu_ms_per_image": 1000 * cpu / images,
            "wall_ms_per_image": 1000 * wall / images}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=60)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--ack-timeout", type=float, default=3.0, help="device resend (s)")
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--probe-images", type=int, default=200,
                    help="images for the shared-chunk-state probe (0: skip)")  # fmt: skip
    ap.add_argument("--idle-window", type=float, default=5.0, help="idle CPU sample (s)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each configuration")
    args = ap.parse_args()
    with (
        PostgresInstance(fast=True) as pg,
        MosquittoInstance() as m,
        tempfile.TemporaryDirectory() as work,
    ):
        args.workdir = work
        broker = MqttBroker(host=m.host, port=m.port)
        mosq_ps = psutil.Process(m.pid)
        probe = shared_state_probe(pg, args.probe_images) if args.probe_images else None
        configs = [("one", 1, False), ("three", 3, False)]
        if not args.no_failover:
            configs.append(("kill", 3, True))
        print(f"load {load_average()} before the first round", flush=True)
        rounds: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        for i in range(args.rounds):  # alternating, so the box's drift hits every side
            for name, replicas, kill in configs:
                r = run(pg, broker, mosq_ps, name, replicas, args, kill=kill, round_=i)
                rounds[name].append(r)
                print(
                    f"  [{i + 1}] {name} ({replicas}): {r['images_s']:.1f} images/s, "
                    f"assemblers {r['cpu_ms_per_image']:.1f} ms/image, "
                    f"ACK p99 {r['ack_p99_s'] or 0:.3f} s  {r['meter']}",
                    flush=True,
                )
    # The table: each figure's median over the rounds; the ranges follow it.
    results = [median_of(runs) for runs in rounds.values()]
    one = results[0]
    print(f"\n{args.devices} devices x {args.images} images of {CHUNKS_PER_IMAGE} chunks, "
          f"QoS 1, device resend after {args.ack_timeout:g} s; lease TTL {LEASE_TTL_S:g} s; "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.rounds} rounds")  # fmt: skip
    hdr = f"{'':34}" + "".join(
        f"{r['name'] + ' (' + str(r['replicas']) + ')':>16}" for r in results
    )
    print(hdr)

    def row(label, key, fmt="{:.2f}", ratio=False):
        cells = []
        for r in results:
            v = r.get(key)
            if v is None:
                cells.append(f"{'-':>16}")
                continue
            text = fmt.format(v)
            if ratio and r is not one and one.get(key):
                text += f" ({v / one[key]:.2f}x)"
            cells.append(f"{text:>16}")
        print(f"{label:34}" + "".join(cells))

    row("images ACKed", "images", "{:d}")
    row("capture rows", "stored", "{:d}")
    row("devices gave up on an image", "failed", "{:d}")
    row("device resends", "resends", "{:d}")
    row("images/s", "images_s", "{:.1f}", ratio=True)
    row("assembler CPU ms/image (all)", "cpu_ms_per_image", "{:.1f}", ratio=True)
    row("  idle (no device sending) ms/s", "idle_cpu_ms_per_s", "{:.1f}", ratio=True)
    row("  net of idle, ms/image", "net_cpu_ms_per_image", "{:.1f}", ratio=True)
    row("broker CPU ms/image", "broker_cpu_ms_per_image", "{:.2f}", ratio=True)
    row("PostgreSQL CPU ms/image", "pg_cpu_ms_per_image", "{:.2f}", ratio=True)
    row("ACK_OK p50 after last chunk (s)", "ack_p50_s", "{:.3f}")
    row("ACK_OK p99 after last chunk (s)", "ack_p99_s", "{:.3f}")
    row("PG commits/image (incl. leases)", "pg_commits_per_image", "{:.2f}", ratio=True)
    row("PG rows inserted/image", "pg_rows_inserted_per_image", "{:.1f}", ratio=True)
    row("PG rows updated/image", "pg_rows_updated_per_image", "{:.1f}", ratio=True)
    row("failover: partitions taken (s)", "partitions_taken_s", "{:.1f}")
    row("failover: victim's devices", "victim_devices", "{:d}")
    row("failover: last device ACKed (s)", "last_device_served_s", "{:.1f}")
    if probe:
        print(
            f"shared chunk state in PostgreSQL (not built, probed): "
            f"{probe['statements_per_image']} statements/image, PostgreSQL CPU "
            f"{probe['pg_cpu_ms_per_image']:.1f} ms/image (vs the one instance's assembler "
            f"{one['cpu_ms_per_image']:.1f} ms/image), {probe['wall_ms_per_image']:.1f} ms "
            "of round trips per image"
        )
    print_ranges(rounds, load_average())
    print(json.dumps(rounds))


def median_of(runs: list[dict]) -> dict:
    """Each numeric figure's median over the rounds (name and replicas as they are)."""
    out = dict(runs[0])
    for key, v in runs[0].items():
        if isinstance(v, int | float) and key != "replicas":
            values = [r[key] for r in runs if r.get(key) is not None]
            med = statistics.median(values) if values else None
            out[key] = round(med) if isinstance(v, int) and med is not None else med
    return out


def print_ranges(rounds: dict[str, list[dict]], load: str) -> None:
    """Range of each headline figure over the rounds, each run's limit, and the ratios
    of three to one within each round (neighbours in time on a drifting machine)."""
    n = len(rounds["one"])
    print(f"range over {n} rounds (median), load now {load}")
    figures = [
        ("images/s", "images_s", "{:.1f}"),
        ("assembler CPU ms/image", "cpu_ms_per_image", "{:.1f}"),
        ("broker CPU ms/image", "broker_cpu_ms_per_image", "{:.2f}"),
        ("PostgreSQL CPU ms/image", "pg_cpu_ms_per_image", "{:.2f}"),
        ("ACK_OK p99 (s)", "ack_p99_s", "{:.3f}"),
        ("failover: partitions taken (s)", "partitions_taken_s", "{:.1f}"),
        ("failover: last device ACKed (s)", "last_device_served_s", "{:.1f}"),
    ]
    for name, runs in rounds.items():
        cells = []
        for label, key, fmt in figures:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                cells.append(f"{label} {span(values, fmt)}")
        print(f"  {name} ({runs[0]['replicas']}): " + "; ".join(cells))
        print(f"    limited by (each round): {'; '.join(r['limit'] for r in runs)}")
    for name, runs in rounds.items():
        if name == "one":
            continue
        ratios = []
        for label, key in (("assembler CPU/image", "cpu_ms_per_image"),
                           ("broker CPU/image", "broker_cpu_ms_per_image"),
                           ("images/s", "images_s")):  # fmt: skip
            pairs = [(a[key], b[key]) for a, b in zip(rounds["one"], runs, strict=True)]
            ratios.append(f"{label} {span((b / a for a, b in pairs if a), '{:.2f}')}")
        print(f"  ratio {name}/one: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
