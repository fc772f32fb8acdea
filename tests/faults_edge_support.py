"""Moving parts of the edge batch-upload fault suite (tests/test_faults_edge.py).

- `Camera` writes images into each device's `cameraImageRepo/` the way a camera
  finishes a JPEG (written beside the device's directories, then renamed in) and keeps
  every image's SHA-256: the ground truth the invariants are checked against.
- `DeviceFleet` is the device side as a child process (`python -m
  tests.faults_edge_support`), one thread per device running camfleet's `EdgeUploader`
  (what `camfleet edge run --no-prefect` and `camfleet simulate edge` run) in a loop,
  so the whole device side can be SIGKILLed mid-batch and restarted.
- `SignerProcess` is `camfleet signer` as a child process (SIGKILL, restart).
- `Watcher` polls the device directories and timestamps each file's deletion.
- `check_invariants` compares what the devices deleted with `captures`,
  `edge_upload_grants` and the bucket (versioned, so a second upload of one file
  shows up as a second version instead of silently overwriting the first).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from tests.faults_common import ChildProcess

REPO_DIR = "cameraImageRepo"
BUFFER_DIR = "bufferStorage"

# How often the watcher looks at the device directories: a deletion is timestamped to
# within this, far finer than the recoveries measured (seconds).
WATCH_INTERVAL_S = 0.1

# A device with nothing to send looks again this often (the served flow's schedule,
# shortened so the suite keeps files moving).
DEVICE_IDLE_S = 0.3

# A child process that does not exit this long after SIGTERM is SIGKILLed.
STOP_WAIT_S = 15.0

FINAL_GRANT_STATES = ("verified", "failed", "expired")

# The seed firmware keeps its last getURL answer beside its folders (sub.py): its own
# state file, rewritten every batch, not a leftover.
SEED_URLS_FILE = "signedUrls.json"


def device_dirs(root: Path, serial: str) -> tuple[Path, Path]:
    return root / serial / REPO_DIR, root / serial / BUFFER_DIR


def _names(directory: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(directory) if e.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        return set()


# ---- the camera ---------------------------------------------------------------------------


class Camera:
    """Writes `image_bytes`-sized JPEG-like images for every device, one per device
    every `period_s`, until stopped. `images` maps (serial, name) to its SHA-256 and
    holds an image only once it is complete in `cameraImageRepo/`."""

    def __init__(
        self,
        root: Path,
        staging: Path,
        serials: list[str],
        image_bytes: int,
        period_s: float,
        every: dict[str, int] | None = None,
    ) -> None:
        self.root, self.staging, self.serials = root, staging, serials
        self.image_bytes, self.period_s = image_bytes, period_s
        self.every = every or {}  # serial -> one image per that many rounds
        self.images: dict[tuple[str, str], str] = {}
        self.lock = threading.Lock()
        self._n = 0
        self._stop = threading.Event()
        for serial in serials:
            for d in device_dirs(root, serial):
                d.mkdir(parents=True, exist_ok=True)
            (staging / serial).mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)

    def start(self) -> Camera:
        self._thread.start()
        return self

    def shoot(self) -> None:
        """One image per device (fewer for devices with an `every`)."""
        self._n += 1
        for serial in self.serials:
            if self._n % self.every.get(serial, 1):
                continue
            name = f"cam_{self._n:05d}.jpg"
            data = b"\xff\xd8" + os.urandom(self.image_bytes - 4) + b"\xff\xd9"
            staged = self.staging / serial / name
            staged.write_bytes(data)
            # A rename within one filesystem: the device never sees half an image.
            os.rename(staged, device_dirs(self.root, serial)[0] / name)
            with self.lock:
                self.images[(serial, name)] = hashlib.sha256(data).hexdigest()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.shoot()
            self._stop.wait(self.period_s)

    def snapshot(self) -> dict[tuple[str, str], str]:
        with self.lock:
            return dict(self.images)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


# ---- watching the devices ------------------------------------------------------------------


class Watcher:
    """Polls the device directories; remembers when each image left its device."""

    def __init__(self, root: Path, camera: Camera) -> None:
        self.root, self.camera = root, camera
        self.deleted_at: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self._thread.start()

    def present(self) -> set[tuple[str, str]]:
        """Images on the devices. The repo is listed before the buffer: a file moving
        repo -> buffer meanwhile is seen in one of them, never in neither."""
        out = set()
        for serial in self.camera.serials:
            repo, buffer = device_dirs(self.root, serial)
            out |= {(serial, n) for n in _names(repo)}
            out |= {(serial, n) for n in _names(buffer)}
        return out

    def buffered(self) -> set[tuple[str, str]]:
        out = set()
        for serial in self.camera.serials:
            out |= {(serial, n) for n in _names(device_dirs(self.root, serial)[1])}
        return out

    def _run(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            known = self.camera.snapshot()  # before listing: see present()
            gone = set(known) - self.present()
            now = time.monotonic()
            with self.lock:
                for key in gone:
                    self.deleted_at.setdefault(key, now)

    def first_deletion_after(self, t: float) -> float | None:
        with self.lock:
            times = [v for v in self.deleted_at.values() if v > t]
        return min(times) if times else None

    def deleted(self, keys) -> bool:
        with self.lock:
            return all(k in self.deleted_at for k in keys)

    def count(self) -> int:
        with self.lock:
            return len(self.deleted_at)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- child processes -------------------------------------------------------------------------


def signer_process(env: dict[str, str], log: Path, client_id: str) -> ChildProcess:
    """`camfleet signer` with a stable client id (its MQTT session survives a restart)."""
    exe = str(Path(sys.executable).parent / "camfleet")
    argv = [exe, "signer", "--handoff", "none", "--client-id", client_id]
    return ChildProcess(argv, env, log, "signer: answering")


def device_fleet(
    env: dict[str, str],
    log: Path,
    root: Path,
    serials: list[str],
    host: str,
    port: int,
    seed_serials: list[str] = (),
) -> ChildProcess:
    argv = [sys.executable, "-m", "tests.faults_edge_support", "--root", str(root)]
    argv += ["--host", host, "--port", str(port)]
    for serial in seed_serials:
        argv += ["--seed", serial]
    argv += serials
    return ChildProcess(argv, env, log, "devices: running")


def run_devices(
    root: Path, serials: list[str], host: str, port: int, seed_serials: list[str] = ()
) -> None:
    """The child process: every device drains its repo through the signer, forever.

    camfleet devices (`serials`): each `drain()` opens its own MQTT session, as a
    scheduled run on a device does; a drain ends when the repo is empty or a batch got
    nothing through (broker, signer or store down), and the device simply tries again.
    Seed-firmware devices (`seed_serials`, names only, no checksums): one batch of five
    per run, as its cron job does; a run that raises (the seed's scripts do not catch
    a missing answer or a dropped broker) is followed by the next.
    """
    from blocks.mqtt import MqttBroker
    from camfleet.edge import files as edge_files
    from camfleet.edge.config import EdgeConfig
    from camfleet.edge.seed_device import run_seed_batch
    from camfleet.edge.uploader import EdgeUploader

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per POST otherwise
    log = logging.getLogger("camfleet.edge")
    broker = MqttBroker(host=host, port=port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def device(serial: str) -> None:
        repo, buffer = device_dirs(root, serial)
        cfg = EdgeConfig(serial, buffer, repo, host, port, tls=False)
        while not stop.is_set():
            summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
            for s in summaries:
                if s["left_for_next_run"]:  # what each fault did to a batch, for the docs
                    log.info("edge: batch %s left %s", s["request_id"][:8], s["reasons"])
            if not any(s["deleted"] for s in summaries):
                stop.wait(DEVICE_IDLE_S)

    def seed_device(serial: str) -> None:
        repo, buffer = device_dirs(root, serial)
        while not stop.is_set():
            batch = edge_files.take_batch(repo, buffer, min_age_s=0)
            deleted = []
            if batch:
                try:
                    names = [f.name for f in batch]
                    deleted = run_seed_batch(broker, serial, buffer, names, root / serial)
                except Exception as exc:
                    log.info("seed device %s: run ended by %s", serial, type(exc).__name__)
                if len(deleted) < len(batch):
                    log.info(
                        "edge: seed batch left %d of %d", len(batch) - len(deleted), len(batch)
                    )
            if not deleted:
                stop.wait(DEVICE_IDLE_S)

    threads = [threading.Thread(target=device, args=(s,), name=s) for s in serials]
    threads += [threading.Thread(target=seed_device, args=(s,), name=s) for s in seed_serials]
    for t in threads:
        t.start()
    print("devices: running", flush=True)
    stop.wait()
    for t in threads:
        t.join(STOP_WAIT_S)
    print("devices: stopped", flush=True)


# ---- the invariants ---------------------------------------------------------------------------


@dataclass
class Check:
    images: int = 0
    delivered: int = 0
    lost: list = field(default_factory=list)  # (key, why)
    duplicated: int = 0  # second row or second object key for one (device, file)
    reuploads: int = 0  # object versions beyond the first
    stray: int = 0  # rows or objects for no image the camera took
    open_grants: int = 0
    not_delivered: int = 0  # images still on a device
    temp_files: list = field(default_factory=list)


class Bucket:
    """Reads the versioned bucket; remembers which object versions were hashed OK."""

    def __init__(self, client, bucket: str) -> None:
        self.client, self.bucket = client, bucket
        self._hashed: dict[tuple[str, str], str] = {}

    def enable_versioning(self) -> None:
        self.client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )

    def versions(self) -> tuple[Counter, dict[str, str]]:
        """(versions per key, latest version id per key)."""
        count: Counter = Counter()
        latest: dict[str, str] = {}
        self.written: dict[str, list[str]] = {}  # key -> when each version was stored
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket):
            for v in page.get("Versions", []):
                count[v["Key"]] += 1
                self.written.setdefault(v["Key"], []).append(f"{v['LastModified']:%H:%M:%S}")
                if v["IsLatest"]:
                    latest[v["Key"]] = v["VersionId"]
        return count, latest

    def reuploaded(self) -> dict[str, list[str]]:
        """Keys stored more than once, with the times (from the last `versions()`)."""
        return {k: sorted(t) for k, t in self.written.items() if len(t) > 1}

    def sha256(self, key: str, version: str) -> str:
        if (key, version) not in self._hashed:
            body = self.client.get_object(Bucket=self.bucket, Key=key, VersionId=version)["Body"]
            self._hashed[(key, version)] = hashlib.sha256(body.read()).hexdigest()
        return self._hashed[(key, version)]


def check_invariants(
    dsn: str, bucket: Bucket, camera: Camera, watcher: Watcher, final: bool = False
) -> Check:
    images = camera.snapshot()
    present = watcher.present()  # after the snapshot: see Watcher.present
    deleted = set(images) - present
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select device_id, device_capture_id, sha256, storage_path from captures"
            " where source = 'edge'"
        )
        rows = cur.fetchall()
        cur.execute("select device_id, file_name, status from edge_upload_grants")
        grants = cur.fetchall()
    row_count = Counter((r[0], r[1]) for r in rows)
    row_of = {(r[0], r[1]): r for r in rows}
    versions, latest = bucket.versions()
    expected_key = {k: f"edge/{k[0]}/{k[1]}" for k in images}
    c = Check(images=len(images), delivered=len(deleted))
    for key in sorted(deleted):
        row = row_of.get(key)
        if row is None:
            c.lost.append((key, "deleted on the device, no captures row"))
        elif row[2] != images[key]:
            c.lost.append((key, "captures.sha256 differs from the device's image"))
        elif row[3] != expected_key[key]:
            c.lost.append((key, f"captures.storage_path is {row[3]!r}"))
        elif row[3] not in latest:
            c.lost.append((key, "deleted on the device, no object"))
        elif bucket.sha256(row[3], latest[row[3]]) != images[key]:
            c.lost.append((key, "object's SHA-256 differs from the device's image"))
    c.duplicated = sum(n - 1 for n in row_count.values() if n > 1)
    # Keys are edge/{serial}/{name}: a second object for one image would be a
    # second key for the same (serial, name).
    per_image = Counter(tuple(k.split("/")[1:3]) for k in latest if k.count("/") == 2)
    c.duplicated += sum(n - 1 for n in per_image.values() if n > 1)
    c.reuploads = sum(n - 1 for n in versions.values() if n > 1)
    known_keys = set(expected_key.values())
    c.stray = sum(1 for k in latest if k not in known_keys)
    c.stray += sum(1 for k in row_of if k not in images)
    c.open_grants = sum(1 for g in grants if g[2] not in FINAL_GRANT_STATES)
    c.not_delivered = len(set(images) & present)
    if final:
        c.temp_files = leftover_files(watcher.root, camera.serials)
        for key, times in bucket.reuploaded().items():  # when: which fault caused them
            print(f"re-uploaded {key} at {', '.join(times)}")
    if c.lost:
        print("LOST:", c.lost[:10])
    return c


def leftover_files(root: Path, serials: list[str]) -> list[str]:
    """Anything in a device's directories besides its two folders and its images:
    temporary or hidden files a crashed run left behind."""
    out = []
    for serial in serials:
        base = root / serial
        for entry in os.scandir(base):
            if entry.name not in (REPO_DIR, BUFFER_DIR, SEED_URLS_FILE):
                out.append(f"{serial}/{entry.name}")
        for d in device_dirs(root, serial):
            out += [f"{serial}/{d.name}/{n}" for n in os.listdir(d) if n.startswith(".")]
    return out


# ---- the table --------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    down_s: float | None
    recovery_s: float | None
    in_flight: int
    backlog_s: float | None
    check: Check


TABLE_HEAD = (
    "| fault | down (s) | recovery (s) | files in flight | backlog delivered (s) "
    "| lost | duplicated | re-uploads | open grants | delivered / taken |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_table(rows: list[Row]) -> str:
    lines = [TABLE_HEAD]
    for r in rows:
        c = r.check
        lines.append(
            f"| {r.fault} | {_s(r.down_s)} | {_s(r.recovery_s)} | {r.in_flight} "
            f"| {_s(r.backlog_s)} | {len(c.lost)} | {c.duplicated} | {c.reuploads} "
            f"| {c.open_grants} | {c.delivered} / {c.images} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="simulated edge devices (fault suite)")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--seed", action="append", default=[], help="a seed-firmware device")
    parser.add_argument("serials", nargs="*")
    args = parser.parse_args(argv)
    run_devices(args.root, args.serials, args.host, args.port, args.seed)


if __name__ == "__main__":
    main()


def service_env(mq, dsn: str, s3, bucket_name: str, data_dir) -> dict[str, str]:
    """The environment of a `camfleet signer` (and the edge devices) started by a test:
    the private broker, database and S3 bucket, and no block or share-group setting
    of the machine's own leaking in."""
    env = {
        **os.environ,
        "MQTT_HOST": mq.host,
        "MQTT_PORT": str(mq.port),
        "DATABASE_URL": dsn,
        "STORAGE_URL": f"s3://{bucket_name}?endpoint_url={s3.endpoint_url}",
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "CAMFLEET_DATA_DIR": str(data_dir),
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("CAMFLEET_MQTT_BLOCK", "CAMFLEET_DATABASE_BLOCK", "CAMFLEET_SIGNER_GROUP"):
        env.pop(key, None)
    return env
