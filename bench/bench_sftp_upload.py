"""SFTP event upload: camfleet's SFTP path vs OpenSSH's `sftp`, and events/s end to end.

    .venv/bin/python bench/bench_sftp_upload.py [--mb 100] [--repeat 3] [--events 200]

What each baseline is the limit of (each run prints the CPU of every process beside its
figure and names the CPU-bound one):

* large file: OpenSSH's `sftp` client (C) into sshd's sftp-server on loopback: the
  limit of one SSH connection on this machine, set by the encryption + MAC in `sftp`
  and sshd (both C; no Python load generator to outrun);
* events: the plain `DataUploader` loop in this process (INSERT, two SFTP files over
  one connection, UPDATE, move per event): the limit of one uploader doing each
  event's round trips and durable commits in turn (no process near a full core:
  PostgreSQL's fsync and the SFTP round trips set the pace on a quiet machine; on
  2026-12-03, load average 20, other users' CPU did), so the flow's ratio to it says
  what Prefect's bookkeeping adds per run and per event.

All against private services on loopback started here (sshd, PostgreSQL, a Prefect
server). Prints, each beside a baseline measured in the same run:

1. one large file (default 100 MB): OpenSSH `sftp` (the baseline), camfleet's
   `upload_file` (temp name, pipelined 64 KiB writes, every ack checked, size check,
   rename), and paramiko's stock `SFTPClient.put` for reference; MB/s and the ratio;
2. camfleet's write size: 32 / 64 / 128 / 255 KiB requests (why WRITE_CHUNK is 64 KiB);
3. small events (default 200 x 50 KB video + 1 KB JSON): the Prefect flow
   (INSERT, two SFTP files, UPDATE, move; artifacts) vs DataUploader alone
   (the same phases, no Prefect); events/s and the ratio (target, issue 20: >= 0.9x).

--repeat runs of each (default 3), interleaved, with the range and median; the load
average and per-process CPU beside each run. Numbers move with whatever else runs on
the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchstat import CpuMeter, load_average, span  # noqa: E402

from camfleet import db  # noqa: E402
from camfleet.localsvc import PostgresInstance, PrefectServerInstance, SshdInstance  # noqa: E402


def target(sshd: SshdInstance) -> SimpleNamespace:
    return SimpleNamespace(
        host=sshd.host,
        port=sshd.port,
        username=sshd.username,
        ssh_key_path=str(sshd.client_key_path),
        private_key=None,
        passphrase=None,
        host_key_fingerprint=sshd.host_key_fingerprint,
        known_hosts_path=None,
    )


def openssh_put(sshd: SshdInstance, local: Path, remote: str) -> float:
    """Seconds for OpenSSH `sftp` to put `local` (connection setup included)."""
    start = time.perf_counter()
    subprocess.run(
        [
            "sftp",
            "-q",
            "-b",
            "-",
            "-i",
            str(sshd.client_key_path),
            "-P",
            str(sshd.port),
            "-o",
            f"UserKnownHostsFile={sshd.known_hosts_path}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            f"{sshd.username}@{sshd.host}",
        ],
        input=f"put {local} {remote}\n",
        text=True,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def camfleet_put(sshd: SshdInstance, local: Path, remote: str, chunk: int | None = None) -> float:
    """Seconds for camfleet's SFTP path (connection setup included, like `sftp`)."""
    from camfleet.uploader.sftp import WRITE_CHUNK, SftpConnection, upload_file

    start = time.perf_counter()
    with SftpConnection(target(sshd)) as conn:
        client = conn.channel()
        upload_file(client, local, remote, chunk=chunk or WRITE_CHUNK)
    return time.perf_counter() - start


def paramiko_put(sshd: SshdInstance, local: Path, remote: str) -> float:
    """Seconds for paramiko out of the box: SSHClient + SFTPClient.put (32 KiB writes)."""
    import paramiko

    start = time.perf_counter()
    ssh = paramiko.SSHClient()
    ssh.load_host_keys(str(sshd.known_hosts_path))
    ssh.connect(
        sshd.host,
        sshd.port,
        sshd.username,
        key_filename=str(sshd.client_key_path),
        look_for_keys=False,
        allow_agent=False,
    )
    ssh.open_sftp().put(str(local), remote)
    ssh.close()
    return time.perf_counter() - start


def median_rate(fn, size: int, repeat: int) -> float:
    return statistics.median(size / fn() / 1e6 for _ in range(repeat))


def bench_large(sshd: SshdInstance, mb: int, repeat: int) -> None:
    size = mb * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="bench-sftp-"))
    local = work / "big.bin"
    with open(local, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1024 * 1024))
    remote = str(Path(sshd.root) / "big.bin")
    try:
        # Interleaved, so a burst of load elsewhere hits all of them alike.
        rates: dict[str, list[float]] = {"openssh": [], "camfleet": [], "paramiko": []}
        puts = {"openssh": openssh_put, "camfleet": camfleet_put, "paramiko": paramiko_put}
        print(f"\n1. one {mb} MB file to sshd on loopback (MB/s; client = this process)")
        groups = {"client": psutil.Process(), "sshd": sshd.pid}
        for i in range(repeat):
            for name, put in puts.items():
                with CpuMeter(groups, own_only=["client"]) as meter:
                    rates[name].append(size / put(sshd, local, remote) / 1e6)
                print(f"   [{i + 1}] {name:<9} {rates[name][-1]:7.1f}  {meter.line()}")
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"   range (median) of {repeat}:")
        print(f"   OpenSSH sftp (baseline)        {span(rates['openssh'], '{:.1f}')}")
        print(
            f"   camfleet upload_file           {span(rates['camfleet'], '{:.1f}')}   "
            f"ratio {med['camfleet'] / med['openssh']:.2f}x  (target >= 0.8x)"
        )
        print(
            f"   paramiko SFTPClient.put        {span(rates['paramiko'], '{:.1f}')}   "
            f"ratio {med['paramiko'] / med['openssh']:.2f}x"
        )

        print(f"\n2. camfleet write request size (median of {repeat}, interleaved, MB/s)")
        chunks = (32 * 1024, 64 * 1024, 128 * 1024, 255 * 1024)
        by_chunk: dict[int, list[float]] = {c: [] for c in chunks}
        for _ in range(repeat):
            for chunk in chunks:
                by_chunk[chunk].append(size / camfleet_put(sshd, local, remote, chunk) / 1e6)
        for chunk, runs in by_chunk.items():
            print(f"   {chunk // 1024:4d} KiB                       {span(runs, '{:.1f}')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        Path(remote).unlink(missing_ok=True)


def bench_events(sshd: SshdInstance, pg, prefect, dsn: str, events: int, repeat: int) -> None:
    from camfleet.uploader import DataUploader
    from camfleet.uploader.simulate import local_config, write_events
    from flows.event_upload import event_upload

    def site(name: str) -> tuple[Path, dict]:
        base = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        config = local_config(sshd, dsn, base)
        (base / "config.json").write_text(json.dumps(config))
        write_events(config["uploader"]["pending_dir"], events, 50_000)
        return base, config

    def reset(conn) -> None:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE events")
        conn.commit()

    def own_ms(meter: CpuMeter, n: int) -> float:
        """CPU of this process (uploader or flow, no services) per event, ms."""
        return 1000 * meter.pct()["bench"] * meter.wall / 100 / n

    conn = db.connect(dsn)
    plain, flow, flow_inner, plain_cpu, flow_cpu = [], [], [], [], []
    try:
        # The first flow call in a process against a fresh server pays for the client
        # and the server's first requests; shown separately, not in the medians.
        base, _ = site("warmup")
        for extra in Path(base / "pending_upload").iterdir():
            if not extra.name.startswith("evt000000."):
                extra.unlink()
        start = time.perf_counter()
        asyncio.run(event_upload(str(base / "config.json")))
        cold = time.perf_counter() - start
        shutil.rmtree(base, ignore_errors=True)
        groups = {"bench": psutil.Process(), "sshd": sshd.pid, "postgres": pg.pid}
        groups["prefect"] = prefect.pid
        print(f"\n3. {events} events of 50 KB video + 1 KB JSON, whole pipeline (events/s)")
        for i in range(repeat):
            reset(conn)
            base, config = site("plain")
            uploader = DataUploader(config)
            with CpuMeter(groups, own_only=["bench"]) as meter:
                start = time.perf_counter()
                report = uploader.run_once()
                plain.append(events / (time.perf_counter() - start))
            plain_cpu.append(own_ms(meter, events))
            print(
                f"   [{i + 1}] DataUploader  {plain[-1]:6.1f} events/s  "
                f"{plain_cpu[-1]:.1f} ms CPU/event here  {meter.line()}"
            )
            uploader.close()
            assert report.counts == {"uploaded": events}, report.counts
            shutil.rmtree(base, ignore_errors=True)

            reset(conn)
            base, _ = site("flow")
            with CpuMeter(groups, own_only=["bench"]) as meter:
                start = time.perf_counter()
                summary = asyncio.run(event_upload(str(base / "config.json")))
                flow.append(events / (time.perf_counter() - start))
            flow_cpu.append(own_ms(meter, events))
            print(
                f"   [{i + 1}] Prefect flow  {flow[-1]:6.1f} events/s  ratio "
                f"{flow[-1] / plain[-1]:.2f}  {flow_cpu[-1]:.1f} ms CPU/event here  "
                f"{meter.line()}"
            )
            flow_inner.append(summary["events_per_second"])
            assert summary["counts"] == {"uploaded": events}, summary["counts"]
            shutil.rmtree(base, ignore_errors=True)
    finally:
        conn.close()
    ratios = [f / p for f, p in zip(flow, plain, strict=False)]
    print(f"   range (median) of {repeat}, load now {load_average()}:")
    print(f"   DataUploader, no Prefect (baseline)  {span(plain, '{:.1f}')}")
    print(f"   Prefect flow, call to return         {span(flow, '{:.1f}')}")
    print(f"   ratio flow / DataUploader            {span(ratios, '{:.2f}')}  (target >= 0.9x)")
    print(f"   Prefect flow, inside the flow body   {span(flow_inner, '{:.1f}')}")
    print(
        f"   CPU of this process per event: DataUploader {span(plain_cpu, '{:.1f}')} ms, "
        f"flow {span(flow_cpu, '{:.1f}')} ms (what load does not distort)"
    )
    print(f"   first flow call in this process, 1 event (not counted): {cold:.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="large file size in MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument(
        "--fast-db",
        action="store_true",
        help="PostgreSQL with fsync off (default: durable commits)",
    )
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-events", action="store_true")
    args = parser.parse_args()

    print(
        f"camfleet SFTP upload benchmark, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {load_average()}"
    )
    with SshdInstance() as sshd:
        if not args.skip_large:
            bench_large(sshd, args.mb, args.repeat)
        if not args.skip_events:
            with (
                PostgresInstance(fast=args.fast_db) as pg,
                PrefectServerInstance(services=False) as prefect,
            ):
                os.environ["PREFECT_API_URL"] = prefect.api_url
                dsn = pg.create_database("bench_events")
                db.migrate(dsn)
                bench_events(sshd, pg, prefect, dsn, args.events, args.repeat)
                from prefect.logging.handlers import APILogHandler

                APILogHandler().flush()  # the runs' logs, while their server is still up
                print(
                    f"   (PostgreSQL fsync {'off' if args.fast_db else 'on'}; "
                    "Prefect server on SQLite, services off)"
                )


if __name__ == "__main__":
    main()
