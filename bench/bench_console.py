"""Console page latency: the fleet page with N devices, the device page of a device
with M captures, each against a small baseline measured in the same run.

On a private PostgreSQL (fsync off), the real app in-process (Starlette's TestClient:
no network, so the time is the server's: queries, health, Jinja rendering):

  fleet baseline   a user with 10 devices           GET /console/
  fleet            a user with N devices (1,000)    GET /console/
  device baseline  a device with 10 captures        GET /console/devices/<id>
  device           a device with M captures (10k)   GET /console/devices/<id> (first page)

What the baselines are the limit of: the same page for a small account, served by the
same in-process app, i.e. the fixed cost of one console request on this machine (auth,
session, the queries' round trips, Jinja, TestClient's in-process transport); the big
page's ratio to it is what the data size adds. There is no load generator to outrun:
requests go one at a time (a latency benchmark), so the limit is this process
(the app and its client share it) or PostgreSQL; each series prints the CPU of both
and the load average, and names the CPU-bound one.

Every device has captures today, errors and triggers, so every lateral join works.
Targets (issue 16): fleet page for 1,000 devices <= 300 ms; device page with 10,000
captures <= 200 ms. Each page's --repeat requests run in --rounds interleaved rounds
(default 3) in one run; prints each round's median and p95 and the range of medians.

    .venv/bin/python bench/bench_console.py [--devices 1000] [--captures 10000] \
        [--repeat 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from benchstat import CpuMeter, load_average, span  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from camfleet import db, tokens  # noqa: E402
from camfleet.localsvc import PostgresInstance  # noqa: E402
from camfleet.storage.local import LocalStore  # noqa: E402
from services.api.app import create_app  # noqa: E402

SECRET = b"bench-console-secret-0123456789abcdef"


def seed(dsn: str, user: str, devices: int, captures_each: int, prefix: str) -> str:
    key = tokens.new_user_key()
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        db.queries.devices_create_user(conn, user_id=user, name=user)
        db.queries.devices_create_user_key(
            conn, user_id=user, key_hash=tokens.hash_user_key(SECRET, key), label="bench"
        )
        cur.execute(
            """insert into devices (device_id, kind, user_id, friendly_name, config, last_seen_at)
               select %(p)s || g, (array['esp32','edge','visant','lifelog','sftp'])[1 + g %% 5],
                      %(u)s, 'camera ' || g, '{"schedule": {"interval_seconds": 300}}',
                      now() - (g %% 900) * interval '1 second'
               from generate_series(1, %(n)s) g""",
            {"p": prefix, "u": user, "n": devices},
        )
        cur.execute(
            """insert into captures (device_id, device_capture_id, ingest_status, storage_path,
                                     flow_run_id, created_at)
               select %(p)s || d, 'img' || c, 'stored', %(p)s || d || '/img' || c || '.jpg',
                      gen_random_uuid()::text, now() - c * interval '10 seconds'
               from generate_series(1, %(n)s) d, generate_series(1, %(m)s) c""",
            {"p": prefix, "n": devices, "m": captures_each},
        )
        cur.execute(
            """insert into device_errors (device_id, error_code, message)
               select %(p)s || d, 2201, 'timeout' from generate_series(1, %(n)s) d""",
            {"p": prefix, "n": devices},
        )
        cur.execute(
            """insert into scheduled_triggers (trigger_id, device_id, trigger_type, status,
                                               scheduled_at)
               select 'trg_' || %(p)s || d || '_' || t, %(p)s || d, 'scheduled',
                      case when t %% 4 = 0 then 'expired' else 'executed' end,
                      now() - t * interval '5 minutes'
               from generate_series(1, %(n)s) d, generate_series(1, 4) t""",
            {"p": prefix, "n": devices},
        )
        cur.execute(
            """insert into sensor_readings (device_id, temperature_c, humidity_pct, recorded_at)
               select %(p)s || d, 20 + random() * 5, 40 + random() * 10,
                      now() - r * interval '5 minutes'
               from generate_series(1, %(n)s) d, generate_series(1, 100) r""",
            {"p": prefix, "n": min(devices, 10)},
        )
        cur.execute("analyze")
    return key


def sign_in(client: TestClient, key: str) -> None:
    page = client.get("/console/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/console/login", data={"api_key": key, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text


def timed(client: TestClient, url: str, repeat: int, groups: dict) -> tuple[list, CpuMeter]:
    client.get(url)  # warm: template compile, connection, plan cache
    out = []
    with CpuMeter(groups, own_only=["app+client"]) as meter:
        for _ in range(repeat):
            start = time.perf_counter()
            r = client.get(url)
            out.append((time.perf_counter() - start) * 1000)
            assert r.status_code == 200, r.status_code
    return out, meter


def summary(name: str, result: tuple[list, CpuMeter]) -> float:
    ms, meter = result
    med = statistics.median(ms)
    p95 = sorted(ms)[int(len(ms) * 0.95) - 1]
    print(f"  {name:<36} median {med:7.1f} ms   p95 {p95:7.1f} ms   {meter.line()}")
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--captures", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with PostgresInstance(fast=True) as pg, tempfile.TemporaryDirectory() as tmp:
        dsn = pg.create_database("bench_console")
        db.migrate(dsn)
        small_key = seed(dsn, "small", 10, 3, "S")
        big_key = seed(dsn, "big", args.devices, 3, "B")
        seed(dsn, "deep", 1, args.captures, "D")  # one device, many captures
        seed(dsn, "shallow", 1, 10, "H")
        with db.transaction(dsn) as conn, conn.cursor() as cur:  # both owned by 'small'
            cur.execute("update devices set user_id = 'small' where device_id in ('D1', 'H1')")
        store = LocalStore(Path(tmp) / "objects", public_url="http://testserver", secret=SECRET)
        app = create_app(database_url=dsn, secret_key=SECRET, processing_runs=None, store=store)
        print(
            f"devices {args.devices}, captures on the deep device {args.captures}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {load_average()}"
        )
        groups = {"app+client": psutil.Process(), "postgres": pg.pid}
        with TestClient(app) as client:
            sign_in(client, small_key)
            small = dict(client.cookies)
            client.cookies.clear()
            sign_in(client, big_key)
            big = dict(client.cookies)

            def run(cookies: dict, url: str) -> list[float]:
                client.cookies.clear()
                for name, value in cookies.items():
                    client.cookies.set(name, value, path="/console")
                return timed(client, url, args.repeat, groups)

            pages = (
                ("fleet page, 10 devices (baseline)", small, "/console/"),
                (f"fleet page, {args.devices} devices", big, "/console/"),
                ("device page, 10 captures (baseline)", small, "/console/devices/H1"),
                (f"device page, {args.captures} captures", small, "/console/devices/D1"),
            )
            med: dict[str, list[float]] = {label: [] for label, _, _ in pages}
            for i in range(args.rounds):
                print(f"round {i + 1}:")
                for label, cookies, url in pages:
                    med[label].append(summary(label, run(cookies, url)))
        (base, fleet, dbase, deep) = (med[label] for label, _, _ in pages)
        print(f"\nrange (median) of the {args.rounds} rounds' medians, load now {load_average()}:")
        for label, _, _ in pages:
            print(f"  {label:<36} {span(med[label], '{:.1f}')} ms")
        fleet_m, deep_m = statistics.median(fleet), statistics.median(deep)
        fleet_r = [f / b for f, b in zip(fleet, base, strict=False)]
        deep_r = [d / b for d, b in zip(deep, dbase, strict=False)]
        fleet_ok = "OK" if fleet_m <= 300 else "OVER"
        deep_ok = "OK" if deep_m <= 200 else "OVER"
        print(f"fleet ratio  {span(fleet_r, '{:.1f}')}x  (target <= 300 ms: {fleet_ok})")
        print(f"device ratio {span(deep_r, '{:.1f}')}x  (target <= 200 ms: {deep_ok})")


if __name__ == "__main__":
    main()
