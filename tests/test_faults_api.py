"""Fault injection for the device HTTP API (issue #9): no trigger or upload is lost.

While real `camfleet agent` loops hold SSE command streams, triggers are created
continuously (manual triggers through the API, scheduler-style rows in the table) and
simulated Lifelog devices run pair -> activate -> upload-url -> PUT -> ingest, this
injects in turn:

1. `camfleet api` SIGKILL with the streams connected, ~2 s down, then restarted (the
   agents reconnect on their own; triggers made meanwhile go through a second API
   instance, or straight into the table when no API answers);
2. PostgreSQL SIGKILL + restart (a private cluster with fsync on, as tests/test_faults.py);
3. the S3-compatible server (moto) frozen with SIGSTOP, then SIGCONT: a hung store
   rather than a restarted one, because moto forgets every object when restarted.

After each fault and recovery it checks, against the devices' own records:

- every ingest a device was answered `queued` (or `duplicate` on retry after a lost
  answer) has exactly one captures row, the one it was told, and its object in storage;
- every capture POST /v1/captures accepted with a 2xx has its row and object, and its
  trigger is `executed` with that capture;
- no duplicate rows for (device_id, seq) or for a trigger, no seq answered `queued`
  twice, no trigger written to a device twice;
- every trigger created while the dependency was down is delivered and executed after
  recovery (none expire here: their TTL outlasts every outage).

At the end the fleet stops, the expiry sweep runs, and every trigger must be final.
`make faults` runs the long version and prints the table for docs/reliability.md; the
short version (API SIGKILL, two streams, local storage) runs in CI.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from camfleet import db
from camfleet.protocol import triggers as core
from tasks import triggers as trig
from tests.faults_api_support import (
    AgentFleet,
    LifelogFleet,
    TriggerMaker,
    check_invariants,
    final_trigger_states,
    make_user_key,
    trigger_rows,
    wait_until,
)
from tests.test_api_commands_helpers import ApiProcess, add_device, fetch, jpeg_bytes

# How long each dependency stays down before it comes back.
DOWN_S = 2.0
# moto stays frozen longer than the API's 5 s storage HEAD timeout, so ingests meet
# the 503 + Retry-After path and not only a slow answer.
S3_FROZEN_S = 8.0
# Each fault is injected this many times (CAMFLEET_FAULT_ROUNDS), with this long of
# steady traffic in between.
ROUNDS = int(os.environ.get("CAMFLEET_FAULT_ROUNDS", "2"))
STEADY_S = 5.0
# A recovery slower than this is a failure, not a slow machine.
RECOVERY_LIMIT_S = 90.0
# Triggers made after the fleet stopped live this long; the sweep must expire them.
EXPIRING_TTL_S = 1.0
# After recovery, every trigger made so far must be executed within this long.
SETTLE_LIMIT_S = 60.0
PING_SECONDS = "1"


# Streams held on API instances that still heart-beat (every 5 s; a killed instance's
# rows linger until they go stale, and they hold no stream).
LIVE_STREAMS = (
    "SELECT count(*) FROM device_connections c JOIN api_instances i USING (instance_id)"
    " WHERE i.heartbeat_at > now() - interval '10 seconds'"
)


@dataclass
class Row:
    fault: str
    recovery: float | None
    in_flight: int
    lost: int
    duplicated: int
    made_while_down: int
    delivered_after: int
    ingests: int
    captures: int


def api_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "CAMFLEET_SSE_PING_SECONDS": PING_SECONDS,
        "CAMFLEET_DATA_DIR": str(tmp_path / "data"),
        "PREFECT_API_URL": "",  # no processing deployment: items get no flow run
        "NO_PROXY": "127.0.0.1,localhost",
        **extra,
    }


class Run:
    """The three loads against one stack, and the bookkeeping of each fault."""

    def __init__(self, dsn, stream_api, trigger_api, has_object, tmp_path, agents, lifelogs):
        image = tmp_path / "frame.jpg"
        image.write_bytes(jpeg_bytes())
        self.dsn, self.has_object = dsn, has_object
        devices = [f"FLTCAM{i}" for i in range(agents)]
        self.agents = AgentFleet(dsn, stream_api.url, devices, image)
        self.maker = TriggerMaker(dsn, trigger_api.url, devices, interval=0.5)
        self.fleet = LifelogFleet(stream_api.url, make_user_key(dsn), lifelogs, jpeg_bytes())
        self.table: list[Row] = []

    def warm_up(self, uploads: int, photos: int) -> None:
        ok = wait_until(
            lambda: len(self.agents.uploaded) >= uploads and len(self.fleet.photos) >= photos, 60
        )
        assert ok, f"no traffic before any fault: {self.state()}"

    def in_flight(self) -> int:
        sent = 0
        try:
            sent = fetch(self.dsn, "SELECT count(*) FROM scheduled_triggers WHERE status='sent'")
            sent = sent[0][0]
        except Exception:  # noqa: S110 - the database may be the one that is down
            pass
        return len(self.fleet.in_flight) + sent

    def inject(self, name: str, fault) -> None:
        in_flight = self.in_flight()
        made_before = set(self.maker.made)
        self.maker.down.set()
        try:
            fault()
        finally:
            self.maker.down.clear()
        t_up = time.monotonic()
        recovered = wait_until(
            lambda: self.agents.uploads_after(t_up) and self.fleet.delivered_after(t_up),
            RECOVERY_LIMIT_S,
        )
        recovery = time.monotonic() - t_up if recovered else None
        settled = wait_until(lambda: not self.open_triggers(time.monotonic()), SETTLE_LIMIT_S)
        inv = check_invariants(self.dsn, self.has_object, self.agents, self.maker, self.fleet)
        down = [t for t, m in list(self.maker.made.items()) if m.while_down]
        down = [t for t in down if t not in made_before]
        states = trigger_rows(self.dsn)
        delivered = sum(1 for t in down if states[t][0] == core.EXECUTED)
        lost = inv["lost"] + (len(down) - delivered)
        self.table.append(
            Row(
                name,
                recovery,
                in_flight,
                lost,
                inv["duplicated"],
                len(down),
                delivered,
                len(self.fleet.photos),
                len(self.agents.uploaded),
            )
        )
        assert recovered, f"{name}: no upload and ingest within {RECOVERY_LIMIT_S}s: {self.state()}"
        if not settled:
            rows = trigger_rows(self.dsn)
            still = {t: rows[t] for t in self.open_triggers(time.monotonic())}
            pytest.fail(f"{name}: triggers still open: {still}; {self.state()}")

    def state(self) -> str:
        """What each load is doing, for a failure message."""
        states = final_trigger_states(self.dsn, self.maker)
        return (
            f"agents {[a.stats for a in self.agents.agents]}, uploads {len(self.agents.uploaded)}"
            f", photos {len(self.fleet.photos)}, photo retries {self.fleet.retries}, "
            f"in flight {len(self.fleet.in_flight)}, triggers {states}, "
            f"lifelog fleet {self.fleet.problem()}"
        )

    def open_triggers(self, before: float) -> list[str]:
        """Triggers made before `before` that are not executed yet."""
        made = list(self.maker.made.items())  # before the rows: a newer one has no row yet
        rows = trigger_rows(self.dsn)
        return [t for t, m in made if m.at < before and rows[t][0] != core.EXECUTED]

    def finish(self) -> dict[str, int]:
        """Stop making triggers, let the agents drain, stop everything, run the sweep."""
        self.maker.close()
        wait_until(lambda: not self.open_triggers(time.monotonic()), SETTLE_LIMIT_S)
        self.fleet.close()
        self.agents.close()
        # With no device listening, short-lived triggers must end expired, not linger.
        wait_until(lambda: not fetch(self.dsn, LIVE_STREAMS)[0][0], 30)
        unheard = [
            trig.create_manual(self.dsn, d, ttl_seconds=EXPIRING_TTL_S) for d in self.agents.devices
        ]
        time.sleep(EXPIRING_TTL_S + 0.5)
        # every trigger left open now ends: pending past expiry -> expired, sent -> failed
        swept = trig.sweep(self.dsn, execution_timeout=0)
        self.expired_unheard = len(set(unheard) & set(swept["expired"]))
        inv = check_invariants(self.dsn, self.has_object, self.agents, self.maker, self.fleet)
        states = dict(fetch(self.dsn, "SELECT status, count(*) FROM scheduled_triggers GROUP BY 1"))
        stuck = fetch(
            self.dsn,
            "SELECT count(*) FROM scheduled_triggers WHERE status = 'sent'"
            " OR (status = 'pending' AND expires_at <= now())",
        )[0][0]
        self.table.append(
            Row(
                "final (fleet stopped, sweep)",
                None,
                len(self.fleet.in_flight),
                inv["lost"],
                inv["duplicated"],
                0,
                0,
                len(self.fleet.photos),
                len(self.agents.uploaded),
            )
        )
        return {"states": states, "stuck": stuck, "expired_unheard": self.expired_unheard}

    def print_table(self) -> None:
        print()
        print(
            f"{len(self.maker.made)} triggers made ({self.maker.refused} refused while down), "
            f"{len(self.agents.uploaded)} captures uploaded, {len(self.fleet.photos)} photos "
            f"ingested, {self.fleet.retries} ingest-path retries, {self.fleet.gave_up} photos "
            f"given up, {self.agents.failures()} agent upload failures"
        )
        unrecorded = set(self.agents.uploaded) - set(self.maker.made)
        print(
            f"{len(unrecorded)} triggers executed whose creating request had failed "
            "(created, then the answer was lost)"
        )
        print(
            "| fault | recovery (s) | in flight | lost | duplicated "
            "| triggers made while down | of them delivered after | ingests queued "
            "| captures 2xx |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in self.table:
            rec = f"{r.recovery:.1f}" if r.recovery is not None else "-"
            print(
                f"| {r.fault} | {rec} | {r.in_flight} | {r.lost} | {r.duplicated} "
                f"| {r.made_while_down} | {r.delivered_after} | {r.ingests} | {r.captures} |"
            )

    def close(self) -> None:
        self.maker.close()
        for closer in (self.fleet.close, self.agents.close):
            try:
                closer()
            except Exception:  # noqa: S110 - already closed by finish()
                pass

    def assert_clean(self, final: dict) -> None:
        for r in self.table:
            assert r.lost == 0, r
            assert r.duplicated == 0, r
        assert final["stuck"] == 0, final
        assert final["expired_unheard"] == len(self.agents.devices), final
        assert set(final["states"]) <= core.FINAL_STATES, final
        assert not self.fleet.refused, self.fleet.refused[:3]


def test_api_sigkill_with_two_streams_loses_nothing(database_url, tmp_path):
    """CI version: one API process SIGKILLed under two SSE agents and one Lifelog device."""
    objects = tmp_path / "objects"
    objects.mkdir()
    api = ApiProcess(database_url, objects, **api_env(tmp_path)).start()
    run = None
    try:
        run = Run(
            database_url,
            api,
            api,
            lambda key: (objects / key).is_file(),
            tmp_path,
            agents=2,
            lifelogs=1,
        )
        run.warm_up(uploads=2, photos=2)

        def kill_api():
            api.stop(kill=True)
            time.sleep(DOWN_S)
            api.start()

        run.inject("API SIGKILL (2 SSE streams)", kill_api)
        final = run.finish()
        run.print_table()
        run.assert_clean(final)
        assert final["states"].get(core.EXECUTED, 0) >= 1
    finally:
        if run is not None:
            run.close()
        api.stop()


def test_upload_url_works_when_a_capture_was_the_first_request(database_url, tmp_path):
    """After an API restart the first request may be a capture upload (agents retry
    theirs at once); it must not leave a store that cannot presign for upload-url.

    Found by the API SIGKILL fault: every upload-url answered 500
    (PresignNotSupported) until the next restart, because POST /v1/captures cached an
    unsigned local store on app.state before routes_devices could build its own.
    """
    import httpx

    from camfleet.simulators.lifelog import LifelogDevice, pair
    from tests.test_api_commands_helpers import add_device, capture_body

    objects = tmp_path / "objects"
    objects.mkdir()
    add_device(database_url, "FIRSTCAP")
    user_key = make_user_key(database_url)
    with ApiProcess(database_url, objects, **api_env(tmp_path)) as api:
        r = httpx.post(api.url + "/v1/captures", json=capture_body("FIRSTCAP", None))
        assert r.status_code == 201, r.text

        async def one_photo() -> dict:
            device = LifelogDevice(api.url)
            try:
                await device.activate((await pair(api.url, user_key))["pairing_code"])
                return await device.upload_photo(jpeg_bytes())
            finally:
                await device.aclose()

        assert asyncio.run(one_photo())["status"] == "queued"


def test_agent_executes_the_whole_backlog_it_gets_on_reconnect(database_url, tmp_path):
    """Triggers made while a device (or the API) was away all arrive at once on
    reconnect (up to the hub's MAX_PENDING_ON_CONNECT); the agent must run every one.

    Found by the API SIGKILL fault: the agent's 8-command queue dropped the oldest of
    the burst as "camera busy", so triggers made during the outage ended failed.
    """
    objects = tmp_path / "objects"
    objects.mkdir()
    image = tmp_path / "frame.jpg"
    image.write_bytes(jpeg_bytes())
    add_device(database_url, "BACKLOG1")
    backlog = [trig.create_manual(database_url, "BACKLOG1", ttl_seconds=120) for _ in range(20)]
    with ApiProcess(database_url, objects, **api_env(tmp_path)) as api:
        agents = AgentFleet(database_url, api.url, ["BACKLOG1"], image)
        try:
            done = wait_until(lambda: set(backlog) <= set(agents.uploaded), 60)
        finally:
            agents.close()
    assert done, f"not executed: {sorted(set(backlog) - set(agents.uploaded))}"
    assert all(n == 1 for n in agents.received.values())


def test_agent_upload_outlasts_an_api_restart(database_url, tmp_path):
    """A capture taken just before the API went down is uploaded once it is back.

    Found by the API SIGKILL fault: the agent tried three times over ~3 s, while a
    restart on a busy 2-core box takes 5-10 s, so the image was thrown away and its
    trigger ended failed.
    """
    import httpx

    from camfleet.agent.camera import FileCamera
    from camfleet.agent.client import Agent, AgentConfig

    objects = tmp_path / "objects"
    objects.mkdir()
    image = tmp_path / "frame.jpg"
    image.write_bytes(jpeg_bytes())
    add_device(database_url, "UPLATE1")
    tid = trig.create_manual(database_url, "UPLATE1", ttl_seconds=120)
    api = ApiProcess(database_url, objects, **api_env(tmp_path))  # its port, not started
    agent = Agent(AgentConfig(api_url=api.url, device_id="UPLATE1"), FileCamera(image))

    async def upload_while_api_starts_late():
        async with httpx.AsyncClient() as client:
            starting = asyncio.create_task(asyncio.to_thread(lambda: time.sleep(4) or api.start()))
            try:
                await agent._capture_and_upload(client, {"trigger_id": tid, "type": "manual"})
            finally:
                await starting

    try:
        asyncio.run(upload_while_api_starts_late())
    finally:
        api.stop()
    assert agent.stats.uploads == 1
    assert fetch(database_url, "SELECT count(*) FROM captures WHERE trigger_id = %s", tid) == [(1,)]


def test_database_outage_answers_503_with_retry_after(tmp_path):
    """While PostgreSQL is down, device requests get a coded 503 with Retry-After (the
    simulator and firmware back off on it), not a bare 500; and work again after.

    Found by the PostgreSQL SIGKILL fault: every request answered "Internal Server
    Error" and logged a traceback.
    """
    import httpx

    from camfleet.localsvc import PostgresInstance

    objects = tmp_path / "objects"
    objects.mkdir()
    with PostgresInstance(fast=True) as pg:
        dsn = pg.create_database("outage")
        db.migrate(dsn)
        add_device(dsn, "PGDOWN1")
        with ApiProcess(dsn, objects, **api_env(tmp_path)) as api:
            url = api.url + "/v1/devices/PGDOWN1/trigger"
            assert httpx.post(url, json={"ttl_seconds": 5}, timeout=10).status_code == 200
            pg.kill()
            r = httpx.post(url, json={"ttl_seconds": 5}, timeout=10)
            assert r.status_code == 503, r.text
            assert r.json()["detail"]["error"] == "database_unavailable"
            assert int(r.headers["Retry-After"]) > 0
            pg.start()
            ok = wait_until(
                lambda: httpx.post(url, json={"ttl_seconds": 5}, timeout=10).status_code == 200,
                20,
            )
            assert ok, "the API did not come back after the database did"


@pytest.mark.slow
def test_kill_api_database_and_freeze_storage_while_devices_work(tmp_path):
    from camfleet.localsvc import PostgresInstance, S3Instance
    from camfleet.storage.s3 import S3Store

    with PostgresInstance() as pg, S3Instance() as s3:  # fsync on: a crash keeps commits
        dsn = pg.create_database("faults_api")
        db.migrate(dsn)
        bucket = s3.create_bucket("faults-api")
        objects = tmp_path / "unused"
        objects.mkdir()
        env = api_env(
            tmp_path,
            STORAGE_URL=f"s3://{bucket}?endpoint_url={s3.endpoint_url}",
            AWS_ACCESS_KEY_ID=s3.access_key,
            AWS_SECRET_ACCESS_KEY=s3.secret_key,
            AWS_DEFAULT_REGION=s3.region,
        )
        store = S3Store(
            bucket,
            endpoint_url=s3.endpoint_url,
            access_key_id=s3.access_key,
            secret_access_key=s3.secret_key,
        )
        streams = ApiProcess(dsn, objects, **env).start()  # holds the SSE streams
        triggers = ApiProcess(dsn, objects, **env).start()  # where operators trigger
        run = None
        try:
            run = Run(
                dsn,
                streams,
                triggers,
                lambda key: store.head(key) is not None,
                tmp_path,
                agents=4,
                lifelogs=3,
            )
            run.warm_up(uploads=4, photos=6)

            def kill_api():
                streams.stop(kill=True)
                time.sleep(DOWN_S)
                streams.start()

            def kill_postgres():
                pg.kill()
                time.sleep(DOWN_S)
                pg.restart()

            def freeze_s3():
                os.killpg(s3.pid, signal.SIGSTOP)
                try:
                    time.sleep(S3_FROZEN_S)
                finally:
                    os.killpg(s3.pid, signal.SIGCONT)

            def kill_trigger_api():
                triggers.stop(kill=True)
                time.sleep(DOWN_S)
                triggers.start()

            for _ in range(ROUNDS):
                run.inject("API SIGKILL (instance holding 4 SSE streams)", kill_api)
                time.sleep(STEADY_S)
                run.inject("API SIGKILL (instance taking manual triggers)", kill_trigger_api)
                time.sleep(STEADY_S)
                run.inject("PostgreSQL SIGKILL", kill_postgres)
                time.sleep(STEADY_S)
                run.inject(f"S3 server frozen (SIGSTOP {S3_FROZEN_S:.0f} s)", freeze_s3)
                time.sleep(STEADY_S)
            final = run.finish()
            run.print_table()
            print("trigger states:", final["states"])
            run.assert_clean(final)
        finally:
            if run is not None:
                run.close()
            streams.stop()
            triggers.stop()
