"""Helpers for tests/test_faults_prefect.py: an event writer, the uploader processes, the
invariant checks and the fault table.

- `EventWriter` keeps writing seed-001 event packages (video, then JSON) into
  `pending_upload/` and remembers the SHA-256 of every byte it wrote.
- `install_lock_audit` adds a trigger to the test database that records every write
  that makes an `events` row 'pending' or 'completed' and whether the writing session
  held the event's advisory lock at that moment: a write without the lock is how two
  uploaders could work on one event at once.
- `check_invariants` compares what was written with `uploaded/`, the `events` table and
  the sshd's directory (the remote side, read from disk: same bytes SFTP would return).
- `UploaderLoop` is `camfleet uploader run` (the seed's main loop) as a child process;
  `PrefectWorker` is `prefect worker start --pool camfleet-process` as one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg2

from camfleet.commands import prefect_mode
from camfleet.uploader.session import LOCK_NAMESPACE
from camfleet.uploader.sftp import TEMP_PREFIX, TEMP_SUFFIX
from camfleet.uploader.simulate import write_event
from deployments.automations import CRASH_MESSAGE, HEARTBEAT_S, ZOMBIE_AFTER_S  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Small events: a camera clip of a few seconds at low bitrate.
SMALL_VIDEO_BYTES = 64 * 1024
# A large video: long enough on the wire (~0.3-1 s on loopback) for a kill to land
# in the middle of its transfer.
BIG_VIDEO_BYTES = 40 * 1024 * 1024
# A kill counts as mid-transfer once this much of the big video is on the server.
MID_TRANSFER_BYTES = 1024 * 1024
STOP_WAIT_S = 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the analyzer side: events appearing in pending_upload/ ------------------------------


@dataclass
class Written:
    video_sha256: str
    video_bytes: int
    json_sha256: str
    json_bytes: int


class EventWriter:
    """A thread writing one event package every `period` seconds until closed."""

    def __init__(self, pending_dir: Path, prefix: str = "ev", period: float = 0.2):
        self.pending_dir = Path(pending_dir)
        self.prefix, self.period = prefix, period
        self.written: dict[str, Written] = {}
        self._lock = threading.Lock()
        self._n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="event-writer")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.write()

    def write(self, video_bytes: int = SMALL_VIDEO_BYTES, name: str | None = None) -> str:
        with self._lock:
            self._n += 1
            event_id = name or f"{self.prefix}{self._n:05d}"
        video = os.urandom(video_bytes)
        video_path, json_path = write_event(self.pending_dir, event_id, video=video)
        body = json_path.read_bytes()
        record = Written(sha256(video), len(video), sha256(body), len(body))
        with self._lock:
            self.written[event_id] = record
        return event_id

    def snapshot(self) -> dict[str, Written]:
        with self._lock:
            return dict(self.written)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


# ---- lock audit --------------------------------------------------------------------------

AUDIT_SQL = f"""
CREATE TABLE IF NOT EXISTS fault_audit (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL,
    status text NOT NULL,
    backend_pid int NOT NULL,
    held_lock boolean NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION fault_audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('pending', 'completed')
       AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status
            OR OLD.attempts IS DISTINCT FROM NEW.attempts) THEN
        INSERT INTO fault_audit (event_id, status, backend_pid, held_lock)
        VALUES (NEW.event_id, NEW.status, pg_backend_pid(), EXISTS (
            SELECT 1 FROM pg_locks
            WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
              AND objsubid = 2 AND classid::bigint = {LOCK_NAMESPACE}
              AND objid::bigint = (hashtext(NEW.event_id)::bigint & 4294967295)));
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS fault_audit ON events;
CREATE TRIGGER fault_audit AFTER INSERT OR UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION fault_audit_write();
"""


def install_lock_audit(dsn: str) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(AUDIT_SQL)
    conn.close()


# ---- invariants --------------------------------------------------------------------------


@dataclass
class Check:
    """One look at the whole system; every count but `uploaded` and `retried` must be 0."""

    uploaded: int = 0
    lost: int = 0
    duplicated: int = 0
    partial_remote: int = 0  # a final remote name whose bytes are not what was written
    temp_remote: int = 0  # `.name.part` files left on the server
    unlocked_writes: int = 0  # events rows written by a session without the event's lock
    retried: int = 0  # events whose phase 1 ran more than once (re-sent after a fault)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


def _file_sha(path: Path) -> str | None:
    try:
        return sha256(path.read_bytes())
    except FileNotFoundError:
        return None


def check_invariants(cfg: dict, dsn: str, written: dict[str, Written], drained: bool) -> Check:
    """The invariants of issue #9 for event upload; `drained`: nothing may be pending."""
    pending = Path(cfg["pending_dir"])
    uploaded = Path(cfg["uploaded_dir"])
    failed = Path(cfg["failed_dir"])
    videos = Path(cfg["sftp"]["remote_video_dir"])
    jsons = Path(cfg["sftp"]["remote_json_dir"])
    # The file system first, the database second: a package is moved to uploaded/ only
    # after its row is completed, so a row read later is never older than the move.
    archived_now = {p.name for p in uploaded.glob("*.json")} if uploaded.is_dir() else set()
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT event_id, status, remote_video_path, remote_json_path, attempts FROM events"
        )
        rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM fault_audit WHERE NOT held_lock")
        unlocked = cur.fetchone()[0]
        cur.execute(
            "SELECT count(*) FROM (SELECT event_id FROM fault_audit WHERE status = 'completed'"
            " GROUP BY event_id HAVING count(*) > 1) AS twice"
        )
        completed_twice = cur.fetchone()[0]
    conn.close()
    row_of = {r[0]: r for r in rows}
    c = Check(unlocked_writes=unlocked)
    c.duplicated = len(rows) - len(row_of) + completed_twice
    c.retried = sum(1 for r in rows if r[4] > 1)
    for event_id, w in written.items():
        names = (f"{event_id}.mp4", f"{event_id}.json")
        where = [d.name for d in (pending, failed) if (d / names[1]).exists()]
        if names[1] in archived_now:
            where.append(uploaded.name)
        if len(where) > 1 and (drained or failed.name in where):
            c.duplicated += 1  # (pending and uploaded at once is a move in progress)
            c.problem(f"{event_id}: JSON in {where}")
        if names[1] not in archived_now:
            if not where and (uploaded / names[1]).exists():
                continue  # archived since the snapshot: checked next time
            if drained or not where:
                c.lost += 1
                c.problem(f"{event_id}: not uploaded (JSON in {where or 'nowhere'})")
            continue
        c.uploaded += 1
        row = row_of.get(event_id)
        expected = {videos / names[0]: w.video_sha256, jsons / names[1]: w.json_sha256}
        if row is None or row[1] != "completed":
            c.lost += 1
            c.problem(f"{event_id}: archived but row is {row and row[1]}")
            continue
        if (row[2], row[3]) != tuple(str(p) for p in expected):
            c.lost += 1
            c.problem(f"{event_id}: row paths {row[2:4]}")
            continue
        archived = {uploaded / names[0]: w.video_sha256, uploaded / names[1]: w.json_sha256}
        for path, digest in (*expected.items(), *archived.items()):
            if _file_sha(path) != digest:
                c.lost += 1
                c.problem(f"{event_id}: {path} missing or not the bytes written")
                break
    for remote_dir in (videos, jsons):
        if not remote_dir.is_dir():
            continue
        for path in remote_dir.iterdir():
            if path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX):
                c.temp_remote += 1
                continue
            event_id = path.name.rsplit(".", 1)[0]
            w = written.get(event_id)
            if w is None:
                if drained:  # nothing was written after `written` was taken
                    c.partial_remote += 1
                    c.problem(f"{path.name}: on the server but never written")
                continue  # written after `written` was taken: the next check covers it
            digest = w.video_sha256 if path.suffix == ".mp4" else w.json_sha256
            if _file_sha(path) != digest:
                c.partial_remote += 1
                c.problem(f"{path.name}: final remote name with other bytes than written")
    return c


# ---- the fault table ---------------------------------------------------------------------


@dataclass
class FaultRow:
    fault: str
    recovery_s: float | None
    in_flight: int
    check: Check
    note: str = ""


HEADER = (
    "| fault | recovery (s) | events in flight | lost | duplicated | partial remote "
    "| temp remote files | unlocked writes | uploaded so far | re-sent | note |"
)


def print_table(rows: list[FaultRow]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in rows:
        c = r.check
        rec = f"{r.recovery_s:.1f}" if r.recovery_s is not None else "-"
        lines.append(
            f"| {r.fault} | {rec} | {r.in_flight} | {c.lost} | {c.duplicated} "
            f"| {c.partial_remote} | {c.temp_remote} | {c.unlocked_writes} | {c.uploaded} "
            f"| {c.retried} | {r.note} |"
        )
    text = "\n".join(lines)
    print()
    print(text)
    for r in rows:
        for p in r.check.problems:
            print(f"  {r.fault}: {p}")
    return text


# ---- remote side -------------------------------------------------------------------------


def kill_when_mid_transfer(remote_path: Path, kill, timeout: float = 60) -> bool:
    """Call `kill` as soon as the `.part` of `remote_path` holds MID_TRANSFER_BYTES.

    Returns True when the kill landed mid-transfer, False when the transfer was never
    seen in progress (then `kill` is called anyway, after `timeout`).
    """
    part = remote_path.parent / f"{TEMP_PREFIX}{remote_path.name}{TEMP_SUFFIX}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if part.stat().st_size >= MID_TRANSFER_BYTES:
                kill()
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    kill()
    return False


# ---- processes ---------------------------------------------------------------------------


class Child:
    """A camfleet or prefect command as a child process in its own session."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT):
        self.args, self.env, self.log, self.cwd = args, env, log, cwd
        self.p: subprocess.Popen | None = None

    def start(self) -> Child:
        with open(self.log, "ab") as out:
            self.p = subprocess.Popen(  # noqa: S603 - our own commands, loopback only
                self.args,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill_tree(self) -> int:
        """SIGKILL the process and every descendant (a crashed machine or container)."""
        procs = []
        try:
            main = psutil.Process(self.p.pid)
            procs = [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.p.wait(10)
        return len(procs)

    def stop(self) -> None:
        if self.p is None or self.p.poll() is not None:
            return
        os.killpg(self.p.pid, signal.SIGTERM)
        try:
            self.p.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill_tree()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def uploader_loop(config_path: Path, env: dict[str, str], log: Path) -> Child:
    """`camfleet uploader run --config ...`: the seed's main loop, as users run it."""
    return Child([str(BIN / "camfleet"), "uploader", "run", "--config", str(config_path)], env, log)


def prefect_cmd(*args: str) -> list[str]:
    return [str(BIN / "prefect"), "--no-prompt", *args]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


# ---- Prefect: the deployment, a worker, crash detection ---------------------------------

POOL = "camfleet-process"
DEPLOYMENT = "event-upload/event-upload"
# Flow-run heartbeats every HEARTBEAT_S; a run that misses them for ZOMBIE_AFTER_S is
# marked Crashed by camfleet's automation (deployments/automations.py).


def prefect_env(api_url: str, home: Path, config_path: Path, base_env: dict[str, str]):
    """Environment of the prefect CLI and the worker (and so of every flow run)."""
    env = {k: v for k, v in base_env.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S),
        # The work pool's flow runs read the uploader config named here (prefect.yaml).
        CAMFLEET_UPLOADER_CONFIG=str(config_path),
    )
    # No PWD: `prefect deploy` (run from ROOT) records the checkout flows run from.
    env.pop("PWD", None)
    return env


def prefect_run(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(  # noqa: S603 - the prefect CLI of this environment
        prefect_cmd(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def deploy_event_upload(env: dict[str, str], interval_s: float) -> None:
    """prefect.yaml's event-upload deployment, with an active schedule every interval_s.

    prefect.yaml ships the schedule paused (a worker needs the config first); an
    operator with the config in place adds an active one, as here.
    """
    deploy_every(env, "event-upload", interval_s)


def deploy_every(env: dict[str, str], name: str, interval_s: float) -> str:
    """prefect.yaml's deployment `name` on the process pool, its schedule replaced by an
    active one every interval_s (so a test sees many runs in a minute)."""
    prefect_run(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    out = prefect_run(["deploy", "--name", name], env)
    deployment = f"{name}/{name}"
    assert deployment in out, out
    prefect_run(
        ["deployment", "schedule", "create", deployment, "--interval", str(interval_s),
         "--replace", "-y"],
        env,
    )  # fmt: skip
    return deployment


def worker(env: dict[str, str], log: Path, name: str, limit: int = 2) -> Child:
    args = prefect_cmd("worker", "start", "--pool", POOL, "--name", name, "--limit", str(limit))
    return Child(args, env, log, cwd=log.parent)


def create_zombie_automation(api_url: str) -> None:
    """The zombie-run automation `camfleet up` creates (deployments/automations.py)."""
    import anyio
    from prefect.client.orchestration import PrefectClient

    from deployments.automations import ensure_automations

    async def create():
        async with PrefectClient(api_url) as client:
            await ensure_automations(client)

    anyio.run(create)


def flow_runs(api_url: str) -> list:
    """Every event-upload flow run that has started (not the scheduled future ones)."""
    import anyio
    from prefect.client.orchestration import PrefectClient

    async def read():
        async with PrefectClient(api_url) as client:
            runs = await client.read_flow_runs(limit=200, sort="START_TIME_DESC")
            return [r for r in runs if r.start_time is not None and r.state is not None]

    try:
        return anyio.run(read)
    except Exception:  # noqa: BLE001 - the server may be down right now
        return []


def completed_since(api_url: str, since) -> int:
    """Flow runs that started after `since` (a datetime) and completed."""
    return sum(
        1 for r in flow_runs(api_url) if r.start_time > since and r.state.type.value == "COMPLETED"
    )


def not_final(api_url: str, run_ids) -> list[str]:
    """'id: STATE' of each of `run_ids` that is not in a final state yet."""
    wanted = {str(i) for i in run_ids}
    return [
        f"{r.id}: {r.state.type.value}"
        for r in flow_runs(api_url)
        if str(r.id) in wanted and not r.state.is_final()
    ]


def run_states(api_url: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in flow_runs(api_url):
        counts[r.state.type.value] = counts.get(r.state.type.value, 0) + 1
    return counts


def heartbeats(api_url: str, run_id) -> int:
    """How many heartbeat events the server received from one flow run."""
    import anyio
    from prefect.client.orchestration import PrefectClient
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    async def count():
        async with PrefectClient(api_url) as client:
            page = await client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                    resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
                ),
                limit=50,
            )
            return len(page.events)

    return anyio.run(count)


# ---- the Prefect server itself: frozen, then killed, then back -------------------------


class PrefectOutage:
    """A private Prefect server (camfleet.localsvc.PrefectServerInstance) taken down the
    two ways it goes down in production, in turn:

    - `freeze()`: SIGSTOP on every one of its processes. Connections are accepted by
      the kernel and then hang: the worst case for a client (no error, no answer).
    - `kill()`: SIGKILL while frozen. Hung requests are reset, new ones refused.
    - `restart()`: the same port and PREFECT_HOME (its SQLite state survives), so
      clients configured with its URL find it again without being told.
    """

    def __init__(self, server) -> None:
        self.server = server
        self.frozen: list[psutil.Process] = []

    def freeze(self) -> None:
        self.frozen = self.server.processes()
        assert self.frozen, "the Prefect server is not running"
        for p in self.frozen:
            p.suspend()

    def kill(self) -> None:
        self.server.kill()  # SIGKILL reaches stopped processes too
        self.frozen = []

    def restart(self) -> None:
        self.server.start()  # waits for /api/health

    def thaw(self) -> None:
        """Safety net for a failing test: never leave stopped processes behind."""
        for p in self.frozen:
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass
        self.frozen = []


def prefect_client_env(api_url: str, home: Path):
    """Point this process (and the children it spawns) at one private Prefect server,
    and back afterwards."""
    return prefect_mode.prefect_env(PREFECT_API_URL=api_url, PREFECT_HOME=str(home))
