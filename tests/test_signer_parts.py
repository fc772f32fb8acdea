"""The signer's parts, each built alone: no `Signer`, no MQTT broker.

`GrantRequests` and `Verification` (services/signer/) are constructed here with exactly
their collaborators: a real PostgreSQL database (migrated, from conftest), a real local
file store, a shared `WatchTable` and `SignerStats`, and a publish callable that only
collects what would go out over MQTT. Each test drives one real behaviour through the
part's entry point and checks the rows and the messages it leaves.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import closing

import psycopg2
import pytest

from camfleet import db
from camfleet.protocol import edge_batch as eb
from camfleet.storage.local import LocalStore
from services.signer.errors import DeviceErrors
from services.signer.grants import GrantRequests, bucket_stores
from services.signer.leases import Leases
from services.signer.verification import Verification
from services.signer.watch import CHECK_FIRST_S, Pending, SignerStats, WatchTable

OWNER = "signer-parts-test"
PUBLIC_URL = "http://127.0.0.1:9"  # presigned URLs are only handed out, never used here
DATA = b"\xff\xd8signer-parts\xff\xd9"
SHA = hashlib.sha256(DATA).hexdigest()


class Parts:
    """What `Signer` would share between its parts, built by hand."""

    def __init__(self, database_url: str, tmp_path) -> None:
        self.dsn = database_url
        self.store = LocalStore(tmp_path / "objects", public_url=PUBLIC_URL, secret=b"parts")
        self.stores = bucket_stores(self.store, None)
        self.pool = db.Pool(database_url, maxconn=2)
        self.watch = WatchTable()
        self.stats = SignerStats()
        self.leases = Leases(OWNER)
        self.errors = DeviceErrors(self.pool)
        self.answers: list[tuple[str, dict]] = []
        self.published: list[eb.Publish] = []
        self.woken = 0

    def grant_requests(self) -> GrantRequests:
        return GrantRequests(
            self.pool,
            self.stores,
            self.watch,
            self.leases,
            self.errors,
            lambda serial, answer: self.answers.append((serial, answer)),
            self.stats,
        )

    def verification(self, grace_s: float = eb.GRANT_GRACE_S) -> Verification:
        def wake() -> None:
            self.woken += 1

        return Verification(
            self.pool,
            self.stores,
            {None: None},  # a local store digests its own objects
            self.watch,
            self.leases,
            self.errors,
            self.published.append,
            self.stats,
            grace_s=grace_s,
            wake=wake,
        )

    def issue(self, serial: str, name: str, expires_at: float, owner: str = OWNER) -> Pending:
        """A checked grant row leased to `owner`, and watched here as `GrantRequests`
        would watch it."""
        grant = eb.Grant(
            serial=serial,
            name=name,
            key=eb.device_key(serial, name),
            max_bytes=len(DATA),
            expires_at=expires_at,
            request_id="r-parts",
            declared_size=len(DATA),
            declared_sha256=SHA,
        )
        with db.transaction(self.dsn) as conn:
            Leases(owner).issue(conn, serial, True, [grant])
        pending = Pending(grant, None, time.time(), siblings=(serial, "r-parts"))
        with self.watch.lock:
            self.watch.watch(pending)
        return pending

    def rows(self, sql: str, *args) -> list[tuple]:
        with closing(psycopg2.connect(self.dsn)) as conn, conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def grant_row(self, serial: str, name: str) -> tuple:
        rows = self.rows(
            "select status, checked, object_key, leased_by, stored_sha256, capture_id"
            " from edge_upload_grants where device_id = %s and file_name = %s",
            serial,
            name,
        )
        assert len(rows) == 1
        return rows[0]


@pytest.fixture
def parts(database_url, tmp_path):
    built = Parts(database_url, tmp_path)
    yield built
    built.pool.close()


def test_a_request_for_a_new_name_writes_a_leased_grant_and_answers_with_a_url(parts):
    serial, name = "ENTO-PARTS1", "IMG_0001.jpg"
    grants = parts.grant_requests()
    payload = {
        "device-serialID": serial,
        "request-id": "r-1",
        "files": [name],
        "checksums": {name: {"size": len(DATA), "sha256": SHA}},
    }
    grants.handle(f"cameraDevice/generateURL/{serial}", json.dumps(payload).encode())

    # One answer, to this device, with a presigned POST for edge/{serial}/{name}.
    assert len(parts.answers) == 1
    to, answer = parts.answers[0]
    assert to == serial and answer["request-id"] == "r-1"
    assert answer["verified"] == [] and answer["rejected"] == []
    [entry] = answer["files"]
    key = f"edge/{serial}/{name}"
    assert entry["filename"] == name and entry["key"] == key
    assert entry["url"]["url"].startswith(f"{PUBLIC_URL}/storage/upload/")
    # The grant row was written, checked and leased to this instance, before the answer.
    status, checked, object_key, leased_by, _, _ = parts.grant_row(serial, name)
    assert (status, checked, object_key, leased_by) == ("granted", True, key, OWNER)
    # ... and it is watched, first look due almost at once.
    with parts.watch.lock:
        pending = parts.watch.pending[(serial, name)]
        assert parts.watch.open_by_device == {serial: 1}
    assert pending.grant.declared_sha256 == SHA and not pending.in_flight
    assert parts.stats.requests == 1 and parts.stats.granted == 1
    assert parts.published == []  # grant requests never publish a {"file"}


def test_a_seed_request_past_the_device_cap_is_answered_late_with_3008(parts):
    serial = "ENTO-PARTS2"
    grants = parts.grant_requests()
    grants.max_open_per_device = 1
    payload = {"device-serialID": serial, "files": ["a.jpg", "b.jpg"]}  # names only
    grants.handle(f"cameraDevice/generateURL/{serial}", json.dumps(payload).encode())

    # A seed device's answer waits LEGACY_ANSWER_DELAY_S, published by the worker's loop.
    assert parts.answers == []
    due = grants.next_answer_due()
    assert due is not None
    grants.publish_answers_due(due - 0.001)
    assert parts.answers == []
    grants.publish_answers_due(due)
    [(_, answer)] = parts.answers
    assert [f["filename"] for f in answer["files"]] == ["a.jpg"]
    assert [r["filename"] for r in answer["rejected"]] == ["b.jpg"]
    assert parts.stats.capped == 1
    # One row for the request over the cap, one for the name it left out (as any
    # rejected name gets, in the grant's transaction).
    codes = parts.rows("select error_code from device_errors where device_id = %s", serial)
    assert sorted(codes) == sorted([(eb.E_CAPACITY,), (eb.E_NAME,)])


def test_verifying_an_uploaded_object_records_the_capture_and_publishes_file(parts):
    serial, name = "ENTO-PARTS3", "IMG_0003.jpg"
    pending = parts.issue(serial, name, time.time() + 300)
    parts.store.put(pending.grant.key, DATA)  # the device's upload
    pending.in_flight = True  # as the worker marks a job it hands out

    parts.verification().check_safely([pending])

    assert parts.published == [eb.Publish(serial, name)]
    status, _, key, _, stored_sha, capture_id = parts.grant_row(serial, name)
    assert status == "verified" and stored_sha == SHA and capture_id is not None
    captures = parts.rows(
        "select record_id, sha256, storage_path, image_bytes from captures where device_id = %s",
        serial,
    )
    assert captures == [(capture_id, SHA, key, len(DATA))]
    with parts.watch.lock:
        assert parts.watch.pending == {} and parts.watch.open_by_device == {}
    assert parts.stats.verified == 1 and parts.stats.failed == 0
    assert not pending.in_flight and parts.woken == 1  # released, the worker told


def test_a_missing_object_is_looked_for_again_until_its_grant_expires(parts):
    serial = "ENTO-PARTS4"
    # Not uploaded yet, URL still valid: backed off and still watched, nothing recorded.
    waiting = parts.issue(serial, "late.jpg", time.time() + 300)
    before = time.time()
    parts.verification().check_safely([waiting])
    assert waiting.next_check > before and waiting.interval > CHECK_FIRST_S
    with parts.watch.lock:
        assert parts.watch.pending[(serial, "late.jpg")] is waiting
    assert parts.grant_row(serial, "late.jpg")[0] == "granted"
    assert parts.published == [] and parts.stats.failed == 0

    # Never uploaded and past its URL's expiry plus the grace: expired, error row (3004).
    gone = parts.issue(serial, "never.jpg", time.time() - 1)
    parts.verification(grace_s=0).check_safely([gone])
    assert parts.grant_row(serial, "never.jpg")[0] == "expired"
    codes = parts.rows(
        "select error_code from device_errors where device_id = %s and capture_id = %s",
        serial,
        "never.jpg",
    )
    assert codes == [(eb.E_NEVER_UPLOADED,)]
    with parts.watch.lock:
        assert (serial, "never.jpg") not in parts.watch.pending
    assert parts.stats.failed == 1
    assert parts.published == []  # a checked request gets no {"file"} for a failure


def test_a_grant_leased_to_another_instance_is_dropped_not_recorded(parts):
    serial, name = "ENTO-PARTS5", "taken.jpg"
    pending = parts.issue(serial, name, time.time() + 300, owner="another-signer")
    parts.store.put(pending.grant.key, DATA)

    parts.verification().check_safely([pending])

    assert parts.grant_row(serial, name)[0] == "granted"  # its holder records it
    assert parts.rows("select 1 from captures where device_id = %s", serial) == []
    with parts.watch.lock:
        assert parts.watch.pending == {}
    assert parts.stats.lease_lost == 1 and parts.stats.verified == 0
    assert parts.published == []
