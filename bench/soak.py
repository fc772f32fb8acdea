"""Soak: the whole `camfleet up` stack under three pipelines' load at once, for minutes.

One run starts `camfleet up` exactly as a user would (a fresh data directory: its own
PostgreSQL cluster, Mosquitto, Prefect server, served deployments, the assembler, the
device API and the signer), then keeps three device fleets busy together:

  ESP32-CAMs   rounds of `camfleet simulate esp32` (chunked JPEGs over MQTT, waiting
               for ACK_OK), a fresh device-id prefix per round            (issue #3)
  Visant       SSE streams held on the API, manual triggers inserted at a fixed rate,
               each device uploading a capture when its command arrives   (issue #6)
  Lifelog      `camfleet simulate lifelog` cameras: upload-url, PUT, ingest, looping
                                                                          (issue #7)

Every --sample seconds it records each service's memory (PSS, with its children) and the
captures and trigger states in PostgreSQL. At the end it stops the fleets, lets the
stack drain, and checks the invariants of issue #9:

  - every image an ESP32 got ACK_OK for is stored: stored rows >= ACKs, and every stored
    row's object exists with the row's SHA-256 (the local store is read back);
  - every Lifelog ingest a camera moved past (seq 1 .. last-1) has its row and object;
  - no duplicate rows (the unique keys make them impossible; counted anyway);
  - every trigger is executed, expired or failed once the fleet has drained;
  - memory: each service's PSS over the last third of the run against the middle third
    (steady state, after warm-up): growth above GROWTH_LIMIT is reported as a failure.

It prints the memory table over time and the invariants table, and exits 1 when an
invariant fails. The rates default to what this 2-core box sustains with all three
fleets and the whole stack on it; the issue targets are printed beside them.

    make soak                                          # 10 minutes
    .venv/bin/python bench/soak.py --minutes 2         # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import psutil  # noqa: E402
from bench_sse_triggers import Fleet, insert_triggers, raise_nofile, tiny_jpeg  # noqa: E402

from camfleet import db  # noqa: E402
from camfleet.localsvc import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CAMFLEET = [sys.executable, "-m", "camfleet.cli"]
# Growth of a service's steady-state memory (last third vs middle third of the run) above
# this is a leak worth a look; below it is allocator noise and caches settling.
GROWTH_LIMIT = 0.10
GROWTH_FLOOR_MB = 5.0  # ... and a few MB either way is not a leak in any service
# PostgreSQL's PSS includes the shared buffers it fills as the tables grow (bounded by
# shared_buffers, 128 MB by default): printed, not judged. `deployments` includes the
# short-lived flow-run processes of the served deployments, so it comes and goes.
NOT_JUDGED = {"postgres"}
# How long the fleets' last in-flight work may take to land after they stop.
DRAIN_S = 30
TARGETS = {
    "esp32": "#3: >= 0.7x the plain subscriber (~7,000-9,500 chunks/s on this box)",
    "visant": "#6: 10,000 SSE devices, 100 triggers/s, lag p99 <= 1 s",
    "lifelog": "#7: >= 500 upload-url + ingest pairs/s",
}


class Stack:
    """`camfleet up` as a child process in a fresh data directory."""

    def __init__(self, data_dir: Path, api_port: int, prefect_port: int):
        self.data_dir = data_dir
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.log = data_dir / "up.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MQTT_"))},
            "CAMFLEET_DATA_DIR": str(data_dir),
            # Never the machine's 1883 or the user's Prefect profiles (`up` activates
            # a `camfleet` profile in PREFECT_HOME).
            "CAMFLEET_MQTT_PORT": str(free_port()),
            "PREFECT_HOME": str(data_dir / "prefect-home"),
            # Visant devices of the soak have no tokens: the seed's id-only mode.
            "CAMFLEET_ALLOW_DEVICE_ID_ONLY": "true",
            # One operator key pairs and owns the whole Lifelog fleet here; the per-user
            # defaults (100 requests/s, 10 pairings/min) are sized for a person's cameras.
            "CAMFLEET_RATE_LIMIT_USER": "2000/second;120000/minute",
            "CAMFLEET_RATE_LIMIT_PAIR": "1000/minute",
        }
        for name in ("DATABASE_URL", "STORAGE_URL", "CAMFLEET_SECRET_KEY"):
            env.pop(name, None)
        self.env = env
        argv = CAMFLEET + ["up", "--api-port", str(api_port), "--prefect-port", str(prefect_port)]
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own CLI, loopback only
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("camfleet up exited:\n" + self.log.read_text()[-3000:])
            banner = self.log.read_text()
            if "camfleet is up" in banner:
                self.dsn = re.search(r"database:\s+(\S+)", banner).group(1)
                self.broker = re.search(r"broker:\s+mqtt://(\S+)", banner).group(1)
                self.objects = Path(re.search(r"storage:\s+file://(\S+)", banner).group(1))
                try:
                    if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(1)
        raise RuntimeError("camfleet up not ready:\n" + self.log.read_text()[-3000:])

    def services(self) -> dict[str, list[psutil.Process]]:
        """The stack's processes by service: each child of `up` with its descendants."""
        groups: dict[str, list[psutil.Process]] = defaultdict(list)
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return groups
        for child in children:
            try:
                name = service_name(child.cmdline())
                groups[name] += [child, *child.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return groups

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def service_name(cmdline: list[str]) -> str:
    line = " ".join(cmdline)
    for name in ("assembler", "signer", "deployments.serve", "camfleet.demo"):
        if name in line:
            return name.split(".")[0]
    if "camfleet.cli api" in line:
        return "api"
    if "postgres" in line:
        return "postgres"
    if "mosquitto" in line:
        return "mosquitto"
    if "prefect" in line:
        return "prefect server"
    return cmdline[0].rsplit("/", 1)[-1] if cmdline else "?"


def pss_mb(procs: list[psutil.Process]) -> float:
    """Proportional set size: pages shared between processes (PostgreSQL's shared
    buffers, Python's libraries) count once across them, so a service's sum is honest."""
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 1e6


class Esp32Rounds:
    """`camfleet simulate esp32` rounds until stopped; sums their JSON summaries."""

    def __init__(self, broker: str, devices: int, images: int, log: Path, env: dict):
        self.broker, self.devices, self.images, self.log = broker, devices, images, log
        self.env = env  # CAMFLEET_DATA_DIR: the broker's credentials from up's stack.json
        self.totals: dict[str, float] = defaultdict(float)
        self.rounds = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.rounds += 1
            argv = CAMFLEET + ["simulate", "esp32", "--broker", self.broker, "--json"]
            argv += ["--devices", str(self.devices), "--images", str(self.images)]
            argv += ["--id-prefix", f"5A{self.rounds:04X}", "--seed", str(self.rounds)]
            argv += ["--ack-timeout", "10"]
            with open(self.log, "ab") as err:
                out = subprocess.run(
                    argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=err, check=False
                )
            try:
                summary = json.loads(out.stdout.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                self.totals["rounds_without_summary"] += 1
                continue
            for key in ("images_sent", "images_acked", "images_failed", "chunks_sent", "nacks"):
                self.totals[key] += summary[key]
            self.totals["ack_p99_s_max"] = max(
                self.totals["ack_p99_s_max"], summary["ack_p99_s"] or 0
            )


class Visant:
    """SSE devices held on the API, triggers at a fixed rate, an upload per command."""

    def __init__(self, api_url: str, dsn: str, devices: int, rate: float):
        self.port = int(api_url.rsplit(":", 1)[1])
        self.dsn, self.rate = dsn, rate
        self.ids = [f"SOAK{i:05d}" for i in range(devices)]
        self.created: dict[str, float] = {}
        self.stop = threading.Event()

    def register(self) -> None:
        with db.transaction(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO devices (device_id, kind) SELECT unnest(%s::text[]), 'visant'",
                (self.ids,),
            )

    async def run(self) -> None:
        self.fleet = Fleet(self.port)
        self.fleet.upload = True
        image_b64 = base64.b64encode(tiny_jpeg()).decode()
        uploaders = [asyncio.create_task(self.fleet.uploader(image_b64)) for _ in range(8)]
        await self.fleet.connect_many(self.ids)
        while not self.stop.is_set():  # 10-second slices of triggers at the fixed rate
            result = await asyncio.to_thread(insert_triggers, self.dsn, self.ids, self.rate, 10)
            self.created.update(result["created"])
        await asyncio.sleep(DRAIN_S / 2)  # commands in flight reach devices and upload
        for task in [*uploaders, *self.fleet.tasks]:
            task.cancel()

    def lags(self) -> list[float]:
        got = self.fleet.received
        return [got[t] - c for t, c in self.created.items() if t in got]


def counts(dsn: str) -> dict:
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT source, count(*) FROM captures GROUP BY source")
        captures = dict(cur.fetchall())
        cur.execute("SELECT status, count(*) FROM scheduled_triggers GROUP BY status")
        triggers = dict(cur.fetchall())
        cur.execute("SELECT count(*) FROM device_errors")
        errors = cur.fetchone()[0]
    return {"captures": captures, "triggers": triggers, "device_errors": errors}


def check_mqtt(dsn: str, objects: Path, acked: int) -> dict:
    """Stored ESP32 rows >= ACKs; every stored row's object hashes to its sha256."""
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT storage_path, sha256 FROM captures WHERE source = 'mqtt'"
            " AND ingest_status = 'stored' AND device_id ILIKE '5a%%'"
        )
        rows = cur.fetchall()
        cur.execute(
            "SELECT count(*) - count(DISTINCT (device_id, device_capture_id)) FROM captures"
            " WHERE source = 'mqtt'"
        )
        duplicated = cur.fetchone()[0]
    bad = 0
    for path, sha in rows:
        f = objects / path
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != sha:
            bad += 1
    return {"acked": acked, "stored": len(rows), "bad_objects": bad, "duplicated": duplicated,
            "lost": max(0, acked - len(rows)) + bad}  # fmt: skip


def check_lifelog(dsn: str, objects: Path, state_dir: Path) -> dict:
    """Every seq a camera moved past has its row and its object."""
    expected = missing = 0
    with db.connect(dsn) as conn, conn.cursor() as cur:
        for f in state_dir.glob("lifelog-*.json"):
            state = json.loads(f.read_text())
            cur.execute(
                "SELECT seq, storage_path FROM captures WHERE device_id = %s AND seq < %s",
                (state["device_id"], state["seq"]),
            )
            rows = dict(cur.fetchall())
            expected += state["seq"] - 1
            for seq in range(1, state["seq"]):
                path = rows.get(seq)
                missing += path is None or not (objects / path).is_file()
        cur.execute(
            "SELECT count(*) - count(DISTINCT (device_id, seq)) FROM captures"
            " WHERE source = 'lifelog'"
        )
        duplicated = cur.fetchone()[0]
    return {"ingested": expected, "lost": missing, "duplicated": duplicated}


def check_triggers(dsn: str, created: dict[str, float]) -> dict:
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, count(*) FROM scheduled_triggers WHERE trigger_id = ANY(%s)"
            " GROUP BY status",
            (list(created),),
        )
        states = dict(cur.fetchall())
        cur.execute(
            "SELECT count(*) - count(DISTINCT trigger_id) FROM captures WHERE trigger_id = ANY(%s)",
            (list(created),),
        )
        duplicated = cur.fetchone()[0]
    final = sum(states.get(s, 0) for s in ("executed", "expired", "failed"))
    return {"created": len(created), "states": states, "not_final": len(created) - final,
            "duplicated": duplicated}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def growth(series: list[float]) -> tuple[float, float]:
    """(relative, MB) growth of the last third's mean over the middle third's."""
    third = len(series) // 3
    if third < 1:
        return 0.0, 0.0
    middle = sum(series[third : 2 * third]) / third
    last = sum(series[-third:]) / third
    return ((last - middle) / middle if middle else 0.0), last - middle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample", type=float, default=20.0, help="seconds between samples")
    ap.add_argument("--esp32-devices", type=int, default=50)
    ap.add_argument("--esp32-images", type=int, default=5, help="images per device per round")
    ap.add_argument("--visant-devices", type=int, default=1000)
    ap.add_argument("--trigger-rate", type=float, default=20.0)
    ap.add_argument("--lifelog-devices", type=int, default=20)
    ap.add_argument("--lifelog-interval", type=float, default=0.5)
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    args = ap.parse_args()
    raise_nofile()

    work = Path(tempfile.mkdtemp(prefix="camfleet-soak-"))
    os.chmod(work, 0o755)  # the local PostgreSQL runs as `postgres` and must traverse it
    stack = Stack(work / "data", free_port(), free_port())
    print(f"soak: {args.minutes:g} min, data in {work}; starting camfleet up ...", flush=True)
    failed = True  # until the checks say otherwise (an exception keeps the logs)
    died = False
    try:
        stack.wait_ready()
        print(f"stack up: API {stack.api_url}, broker {stack.broker}", flush=True)
        env = {**stack.env, "DATABASE_URL": stack.dsn}
        key = subprocess.run(  # finds up's generated secret in the data directory
            CAMFLEET + ["users", "create-key", "soak-operator", "--label", "soak"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

        esp32 = Esp32Rounds(
            stack.broker, args.esp32_devices, args.esp32_images, work / "esp32.log", stack.env
        )
        visant = Visant(stack.api_url, stack.dsn, args.visant_devices, args.trigger_rate)
        visant.register()
        lifelog_state = work / "lifelog"
        with open(work / "lifelog.log", "wb") as out:
            lifelog = subprocess.Popen(  # noqa: S603 - our own CLI, loopback only
                CAMFLEET + ["simulate", "lifelog", "--api", stack.api_url, "--photos", "0"]
                + ["--devices", str(args.lifelog_devices)]
                + ["--interval", str(args.lifelog_interval), "--state-dir", str(lifelog_state)],
                cwd=ROOT, env={**env, "CAMFLEET_USER_KEY": key}, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        loop_thread = threading.Thread(target=lambda: asyncio.run(visant.run()), daemon=True)
        loop_thread.start()
        esp32.thread.start()

        samples: list[tuple[float, dict[str, float], dict]] = []
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        print("  t(s) " + "".join(f"{n:>16}" for n in ("captures", "triggers exec", "errors")))
        while time.monotonic() < end:
            time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
            rss = {name: pss_mb(procs) for name, procs in stack.services().items()}
            c = counts(stack.dsn)
            samples.append((time.monotonic() - t0, rss, c))
            print(f"{samples[-1][0]:6.0f} {sum(c['captures'].values()):>16}"
                  f"{c['triggers'].get('executed', 0):>16}{c['device_errors']:>16}",
                  flush=True)  # fmt: skip
            if lifelog.poll() is not None:
                tail = (work / "lifelog.log").read_text()[-1500:]
                print(f"lifelog simulator exited early ({work / 'lifelog.log'}):\n{tail}")
                died = True
                break

        # Stop the fleets, let what is in flight land, then check.
        esp32.stop.set()
        visant.stop.set()
        lifelog.send_signal(signal.SIGINT)
        try:
            lifelog.wait(30)
        except subprocess.TimeoutExpired:
            lifelog.kill()
        esp32.thread.join(300)
        loop_thread.join(120)
        time.sleep(DRAIN_S)
        elapsed = samples[-1][0] if samples else 0.0
        # Triggers not executed by now are past saving: expire them the way the
        # expire-triggers deployment does once their expiry passes.
        with db.transaction(stack.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE scheduled_triggers SET expires_at = now() WHERE status IN"
                " ('pending', 'sent') AND trigger_id = ANY(%s)",
                (list(visant.created),),
            )
        subprocess.run(CAMFLEET + ["triggers", "sweep"], cwd=ROOT, env=env, check=False,
                       capture_output=True)  # fmt: skip

        mqtt = check_mqtt(stack.dsn, stack.objects, int(esp32.totals["images_acked"]))
        life = check_lifelog(stack.dsn, stack.objects, lifelog_state)
        trig = check_triggers(stack.dsn, visant.created)
        lags = visant.lags()
        final = counts(stack.dsn)

        names = sorted({n for _, rss, _ in samples for n in rss})
        print("\n## Memory over time (PSS in MB, each service with its child processes)\n")
        print("| t (s) | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for t, rss, _ in samples:
            print(f"| {t:.0f} | " + " | ".join(f"{rss.get(n, 0):.0f}" for n in names) + " |")
        growths = {n: growth([rss.get(n, 0.0) for _, rss, _ in samples]) for n in names}
        print("| growth, last vs middle third | "
              + " | ".join(f"{growths[n][0]:+.1%}" for n in names) + " |")  # fmt: skip

        print("\n## Load achieved (targets of the pipeline issues beside)\n")
        print("| fleet | achieved | target |")
        print("|---|---|---|")
        chunks = esp32.totals["chunks_sent"]
        print(f"| ESP32 ({args.esp32_devices} devices/round, {esp32.rounds} rounds) | "
              f"{esp32.totals['images_acked'] / elapsed:.1f} images/s, "
              f"{chunks / elapsed:.0f} chunks/s, ACK p99 (worst round) "
              f"{esp32.totals['ack_p99_s_max']:.2f} s | {TARGETS['esp32']} |")  # fmt: skip
        print(f"| Visant ({args.visant_devices} SSE devices) | "
              f"{len(visant.created) / elapsed:.1f} triggers/s, lag p50 {pct(lags, 50) * 1000:.0f}"
              f" ms, p99 {pct(lags, 99) * 1000:.0f} ms | {TARGETS['visant']} |")  # fmt: skip
        print(
            f"| Lifelog ({args.lifelog_devices} cameras) | "
            f"{life['ingested'] / elapsed:.1f} ingests/s | {TARGETS['lifelog']} |"
        )

        print("\n## Invariants after drain\n")
        print("| pipeline | delivered (device view) | stored | lost | duplicated | other |")
        print("|---|---|---|---|---|---|")
        print(f"| ESP32 ACK_OK | {mqtt['acked']} | {mqtt['stored']} | {mqtt['lost']} | "
              f"{mqtt['duplicated']} | objects failing sha256: {mqtt['bad_objects']}, "
              f"gave up: {int(esp32.totals['images_failed'])} |")  # fmt: skip
        print(f"| Lifelog queued | {life['ingested']} | {life['ingested'] - life['lost']} | "
              f"{life['lost']} | {life['duplicated']} | |")  # fmt: skip
        print(f"| Visant triggers | {trig['created']} | {trig['states'].get('executed', 0)} "
              f"executed | - | {trig['duplicated']} | not final: {trig['not_final']}, "
              f"states: {trig['states']} |")  # fmt: skip
        print(f"\ndevice_errors rows: {final['device_errors']}; captures by source: "
              f"{final['captures']}")  # fmt: skip

        leaks = [
            n
            for n, (rel, mb) in growths.items()
            if rel > GROWTH_LIMIT and mb > GROWTH_FLOOR_MB and n not in NOT_JUDGED
        ]
        failed = died
        if mqtt["lost"] or life["lost"] or mqtt["duplicated"] or life["duplicated"]:
            failed = True
        if trig["not_final"] or trig["duplicated"]:
            failed = True
        if leaks and args.minutes >= 5:  # a short run has no steady state to judge
            print(f"memory grew more than {GROWTH_LIMIT:.0%} in steady state: {leaks}")
            failed = True
    finally:
        stack.stop()
        if failed or args.keep:
            print(f"logs and data kept in {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print("\nsoak:", "FAILED" if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
