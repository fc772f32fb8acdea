"""Fault injection for the SFTP event uploader and for Prefect itself (issue #9).

While an analyzer keeps writing event packages (video + JSON) into `pending_upload/`,
the uploader keeps running the way users run it, and its dependencies are killed
(SIGKILL) and restarted in turn:

1. sshd, while a large video is on the wire;
2. PostgreSQL (a private cluster with fsync on, as in tests/test_faults.py);
3. the Prefect server (PostgreSQL-backed, so its state survives the restart) while
   scheduled flow runs of the event-upload deployment are going;
4. the Prefect worker (`prefect worker start --pool camfleet-process`) with all its
   processes, mid-run of the event-upload deployment: the run is marked Crashed (by
   Prefect's heartbeat-based zombie detection) and the next run completes the job.

After each fault and recovery, and after a final drain, the invariants are checked:

- every event in `uploaded/` has its `events` row 'completed' with both remote paths,
  and both remote files exist with the SHA-256 of the bytes the analyzer wrote;
- no final remote name holds other bytes (no half-written file under a final name);
  `.name.part` temporary names left on the server are counted (0 after the drain);
- no duplicate rows, no event completed twice, no `events` row written by a session
  that did not hold the event's advisory lock (how two uploaders could overlap);
- nothing lost: after the drain every event written is in `uploaded/`.

The short test (CI) does fault 1 against `camfleet uploader run` (the seed's main
loop). The long one (`make faults`, or `.venv/bin/pytest tests/test_faults_prefect.py
-m slow -s`) does all four against the event-upload deployment served by a Prefect
worker, and prints the table pasted into docs/reliability.md.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from camfleet.localsvc import SshdInstance
from camfleet.uploader.simulate import local_config
from tests.faults_prefect_support import (
    BIG_VIDEO_BYTES,
    Check,
    EventWriter,
    FaultRow,
    check_invariants,
    install_lock_audit,
    kill_when_mid_transfer,
    print_table,
    uploader_loop,
    wait_until,
    write_config,
)

# Scan every second; a package is taken once both files are a second old (the writer
# writes the video first and the JSON last, as the analyzer does).
SCAN_INTERVAL_S = 1
SETTLE_S = 1.0
# Longest a restarted dependency may take to let uploads flow again before that is a
# failure rather than a slow, shared machine.
RECOVERY_LIMIT_S = 90.0
DOWN_S = 1.0
DRAIN_LIMIT_S = 120.0


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMFLEET_")}
    env["CAMFLEET_DATA_DIR"] = str(tmp_path / "data")
    return env


def _uploaded_count(cfg: dict) -> int:
    return sum(1 for _ in Path(cfg["uploaded_dir"]).glob("*.json"))


def _not_uploaded(cfg: dict, writer: EventWriter, among=None) -> set[str]:
    """Events written (or those of `among`) that are not in uploaded/ yet: in flight."""
    uploaded = Path(cfg["uploaded_dir"])
    ids = writer.snapshot() if among is None else among
    return {e for e in ids if not (uploaded / f"{e}.json").exists()}


def _drain(cfg: dict, writer: EventWriter, timeout: float = DRAIN_LIMIT_S) -> bool:
    """Wait until every event written is in uploaded/."""
    return bool(wait_until(lambda: not _not_uploaded(cfg, writer), timeout, step=0.5))


def _assert_clean(rows: list[FaultRow]) -> None:
    for r in rows:
        c: Check = r.check
        assert c.lost == 0, (r.fault, c.problems)
        assert c.duplicated == 0, (r.fault, c.problems)
        assert c.partial_remote == 0, (r.fault, c.problems)
        assert c.unlocked_writes == 0, r.fault


def test_sshd_killed_mid_upload_while_the_uploader_loop_runs(database_url, tmp_path):
    base = tmp_path / f"site-{uuid.uuid4().hex[:8]}"
    install_lock_audit(database_url)
    with SshdInstance() as sshd:
        config = local_config(
            sshd,
            database_url,
            base,
            scan_interval_seconds=SCAN_INTERVAL_S,
            settle_seconds=SETTLE_S,
            concurrency=2,
        )
        cfg = config["uploader"]
        loop = uploader_loop(
            write_config(tmp_path / "config.json", config), _env(tmp_path), tmp_path / "up.log"
        )
        writer = EventWriter(Path(cfg["pending_dir"]), period=0.25)
        loop.start()
        try:
            assert wait_until(lambda: _uploaded_count(cfg) >= 3, 45), loop.log_tail()
            big = writer.write(BIG_VIDEO_BYTES, name="big00001")
            caught = _not_uploaded(cfg, writer)
            mid = kill_when_mid_transfer(Path(cfg["sftp"]["remote_video_dir"]) / f"{big}.mp4",
                                         sshd.kill)  # fmt: skip
            time.sleep(DOWN_S)
            sshd.start()
            t_up = time.monotonic()
            recovered = wait_until(lambda: not _not_uploaded(cfg, writer, caught), RECOVERY_LIMIT_S)
            recovery = time.monotonic() - t_up
            rows = [
                FaultRow(
                    "sshd SIGKILL mid-upload",
                    recovery if recovered else None,
                    len(caught),
                    check_invariants(cfg, database_url, writer.snapshot(), drained=False),
                    "mid-transfer" if mid else "kill missed the transfer",
                )
            ]
            writer.close()
            drained = _drain(cfg, writer)
            rows.append(
                FaultRow(
                    "final (after drain)",
                    None,
                    0,
                    check_invariants(cfg, database_url, writer.snapshot(), drained=True),
                )
            )
            print_table(rows)
            assert mid, "sshd was not killed while the big video was on the wire"
            assert recovered, loop.log_tail()
            assert drained, loop.log_tail()
            _assert_clean(rows)
            assert rows[-1].check.temp_remote == 0
            assert rows[-1].check.uploaded == len(writer.snapshot())
        finally:
            writer.close()
            loop.stop()
