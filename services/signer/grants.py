"""Requests and grants: a device's URL request becomes presigned POSTs and grant rows.

A request is parsed (`edge_batch.parse_url_request`), rate limited (3007), checked
against the bucket allow-list (3009) and the grant caps (3008), then answered part by
part (at most `MAX_REQUEST_FILES` names an answer): one transaction writes the grant
rows and leases them to this instance before any URL is published. A name verified
before with the same declared checksum gets no URL, only a read-back (`verified`).
Names are never granted a key that holds a delivered image (`_key_for`).

`GrantRequests` runs on the signer's worker thread. It is built with what it uses: the
pool, the stores by bucket, the watch table it adds grants to (`watch.WatchTable`),
the leases it writes grant rows under (`leases.Leases`), the device error rows
(`errors.DeviceErrors`), a `publish_answer(serial, answer)` callable, the stats, the
clock and its settings; nothing else of the signer.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from camfleet import db
from camfleet.protocol import edge_batch as eb
from camfleet.storage import ObjectStore
from services.signer.errors import DeviceErrors
from services.signer.leases import Leases
from services.signer.limits import RateLimiter
from services.signer.watch import (
    CHECK_FIRST_S,
    SIBLING_FALLBACK_S,
    Pending,
    SignerStats,
    WatchTable,
)

log = logging.getLogger("camfleet.signer")

# Grants watched at once: 2,000 devices with a 5-file batch each in flight. One device
# may hold at most MAX_OPEN_GRANTS_PER_DEVICE of them (two full 50-file answers), so
# no device can fill the total; names past either cap are answered `rejected` (3008)
# and the device asks again once its open grants are resolved.
MAX_PENDING_GRANTS = 10_000
MAX_OPEN_GRANTS_PER_DEVICE = 100


@dataclass(frozen=True)
class _Known:
    """What the database knows of a requested file name (see `edge_names_known`)."""

    status: str | None  # the grant's; None: never granted
    key: str | None
    size: int | None  # as stored, when verified
    sha256: str | None
    delivered: bool  # a capture was recorded under this name


def _key_for(serial: str, name: str, seen: _Known | None) -> str:
    """The object key to grant for `name`: never one that holds a delivered image.

    A name not delivered before keeps edge/{serial}/{key name}. A delivered name asked
    for again without proof of the same bytes (a seed request, another checksum) is a
    camera reusing the name for a new image, or a device re-sending one whose
    verification it missed: its own key either way, and verification tells which.
    A grant not verified keeps its key: it is still open (an upload to the earlier URL
    still counts), expired or failed without delivering, or its delivered object was
    found gone (the upload restores it); no image recorded as stored lives there.
    """
    if seen is None or not seen.delivered:
        return eb.device_key(serial, name)
    if seen.status != "verified" and seen.key:
        return seen.key
    return eb.reuse_key(serial, name)


def bucket_stores(store: ObjectStore, buckets: list[str] | None) -> dict:
    """{bucket name or None: store}; None is the signer's own bucket.

    Allowed buckets are reached with the same endpoint and credentials as `store`
    (the operator lists only buckets those credentials may write).
    """
    stores: dict[str | None, ObjectStore] = {None: store}
    for name in buckets or []:
        if not hasattr(store, "bucket") or not hasattr(store, "client"):
            raise ValueError("a bucket allow-list needs an S3 store (STORAGE_URL s3://...)")
        if name == store.bucket:
            stores[name] = store
            continue
        other = copy.copy(store)  # shares the boto3 client: same endpoint, same keys
        other.bucket = name
        stores[name] = other
    return stores


class GrantRequests:
    """The signer's request handling (its worker thread)."""

    def __init__(
        self,
        pool: db.Pool,
        stores: dict[str | None, ObjectStore],
        watch: WatchTable,
        leases: Leases,
        errors: DeviceErrors,
        publish_answer: Callable[[str, dict], None],
        stats: SignerStats,
        *,
        topics: eb.Topics | None = None,
        clock: Callable[[], float] = time.time,
        rate_limiter: RateLimiter | None = None,
        expires_in: int = eb.URL_EXPIRES_S,
        max_file_bytes: int = eb.MAX_FILE_BYTES,
        max_open_per_device: int = MAX_OPEN_GRANTS_PER_DEVICE,
        max_pending: int = MAX_PENDING_GRANTS,
        legacy_answer_delay_s: float = eb.LEGACY_ANSWER_DELAY_S,
    ) -> None:
        self.pool = pool
        # Buckets a request's bucket-name may choose (`bucket_stores`; None: the
        # signer's own bucket, the only one without an allow-list).
        self.stores = stores
        self.watch = watch
        self.leases = leases
        self.errors = errors
        self.publish_answer = publish_answer
        self.stats = stats
        self.topics = topics or eb.Topics()
        self.clock = clock
        self.rate_limiter = rate_limiter or RateLimiter()
        self.expires_in = expires_in
        self.max_file_bytes = max_file_bytes
        self.max_open_per_device = max_open_per_device
        self.max_pending = max_pending
        self.legacy_answer_delay_s = legacy_answer_delay_s
        self._answers_due: list[tuple[float, int, str, dict]] = []  # delayed seed answers
        self._answer_seq = itertools.count()

    def publish_answers_due(self, now: float) -> None:
        """Publish the delayed seed answers whose time has come (the worker's loop)."""
        while self._answers_due and self._answers_due[0][0] <= now:
            _, _, serial, answer = heapq.heappop(self._answers_due)
            self.publish_answer(serial, answer)

    def next_answer_due(self) -> float | None:
        return self._answers_due[0][0] if self._answers_due else None

    def handle_safely(self, topic: str, payload: bytes) -> None:
        """Answer one request; a failure is logged and counted, never raised."""
        for attempt in (0, 1):
            try:
                self.handle(topic, payload)
                return
            except db.CONNECTION_ERRORS as exc:
                # A kept connection the server dropped (the pool has now let go of
                # them all): once more on a fresh one rather than make the device wait
                # for its answer timeout. Nothing was published or kept before the
                # transaction failed.
                if attempt == 0:
                    continue
                failure = exc
            except Exception as exc:  # the database or store failed: the device asks again
                failure = exc
            log.warning("signer: request on %s not answered: %s", topic, type(failure).__name__)
            self.stats.errors.append(type(failure).__name__)
            return

    def handle(self, topic: str, payload: bytes) -> None:
        self.stats.requests += 1
        try:
            serial = self.topics.serial_from_request_topic(topic)
        except eb.RequestRefused as exc:
            # No valid device to answer: the topic level itself is malformed.
            log.warning("signer: ignoring request on a malformed topic: %s", exc.reason)
            self.stats.refused += 1
            return
        try:
            request = eb.parse_url_request(serial, payload, max_file_bytes=self.max_file_bytes)
        except eb.RequestRefused as exc:
            self.stats.refused += 1
            if self.rate_limiter.allow(serial):  # a flood of garbage gets no answers
                self.errors.record(serial, None, eb.E_REQUEST, "warn", exc.reason, {})
                self.publish_answer(serial, eb.url_answer(serial, None, [], error=exc.reason))
            return
        if not self.rate_limiter.allow(serial):
            self._refuse(serial, request, eb.E_RATE, "too many requests; ask again later")
            self.stats.rate_limited += 1
            return
        allowed, bucket = self._bucket_for(request.bucket_name)
        if not allowed:
            reason = f"bucket-name {eb._printable(request.bucket_name)!r} is not allowed"
            self._refuse(serial, request, eb.E_BUCKET, reason)
            self.stats.refused += 1
            return
        request = self._within_caps(serial, request)
        # More names than one answer holds: one answer (and, for a names-only request,
        # one verification group) per part, so a seed device that reads only the first
        # answer gets that part verified and asks again for the rest.
        files = request.files
        parts = [
            files[i : i + eb.MAX_REQUEST_FILES] for i in range(0, len(files), eb.MAX_REQUEST_FILES)
        ] or [()]
        for number, part in enumerate(parts):
            rejected = request.rejected if number == 0 else ()
            part_request = dataclasses.replace(request, files=part, rejected=rejected)
            self._answer_part(serial, part_request, bucket, number if len(parts) > 1 else None)

    def _bucket_for(self, name: str | None) -> tuple[bool, str | None]:
        """(allowed, bucket to use: None is the signer's own) for a bucket-name.

        Without an allow-list bucket-name is ignored, as the seed's cloud did; with
        one, a listed bucket is used, the signer's own bucket or no name means the
        signer's own, and any other name is refused (3009).
        """
        own = self.stores[None]
        if len(self.stores) == 1 or not name or name == getattr(own, "bucket", None):
            return True, None
        if name in self.stores:
            return True, name
        return False, None

    def _refuse(self, serial: str, request: eb.UrlRequest, code: int, reason: str) -> None:
        """Answer the whole request with an error (no grants), for this device only."""
        self.errors.record(serial, None, code, "warn", reason, {})
        answer = eb.url_answer(serial, request.request_id, [], error=reason)
        answer["error-code"] = code
        self.publish_answer(serial, answer)

    def _within_caps(self, serial: str, request: eb.UrlRequest) -> eb.UrlRequest:
        """The request with the names past the device's or the signer's grant cap
        moved to `rejected` (3008): one device cannot hold every grant the signer
        watches, and a full signer refuses instead of granting what it cannot watch."""
        table = self.watch
        with table.lock:
            watched = {f.name for f in request.files if (serial, f.name) in table.pending}
            device_room = self.max_open_per_device - table.open_by_device.get(serial, 0)
            total_room = self.max_pending - len(table.pending)
        keep: list[eb.FileSpec] = []
        over: list[eb.Rejection] = []
        for spec in request.files:
            if spec.name in watched:  # asked again: replaces its own grant
                keep.append(spec)
            elif device_room > 0 and total_room > 0:
                device_room -= 1
                total_room -= 1
                keep.append(spec)
            else:
                over.append(eb.Rejection(spec.name, "too many open uploads; ask again later"))
        if not over:
            return request
        self.stats.capped += len(over)
        self.errors.record(
            serial, None, eb.E_CAPACITY, "warn", f"{len(over)} names over the grant cap", {}
        )
        return dataclasses.replace(
            request, files=tuple(keep), rejected=request.rejected + tuple(over)
        )

    def _answer_part(
        self, serial: str, request: eb.UrlRequest, bucket: str | None, part: int | None
    ) -> None:
        now = self.clock()
        with self.pool.connection() as conn:  # one transaction for the whole part
            group, grants, already = self._grant(conn, serial, request, now, bucket, part)
        with self.watch.lock:
            if group is not None and grants:
                self.watch.publishing.open_request(
                    serial, group, [g.name for g, _, _ in grants], now
                )
            for grant, _, _ in grants:
                first = grant is grants[0][0]
                due = now + (CHECK_FIRST_S if first else SIBLING_FALLBACK_S)
                self.watch.watch(
                    Pending(grant, group, due, siblings=(serial, grant.request_id or ""))
                )
            for grant in already:  # read back by a job, due now, before its {"file"}
                self.watch.watch(
                    Pending(
                        grant, None, now, siblings=(serial, grant.request_id or ""), recheck=True
                    )
                )
            self.stats.granted += len(grants)

        answer = eb.url_answer(
            serial,
            request.request_id,
            [(g.name, g.key, url, fields) for g, fields, url in grants],
            verified=[g.name for g in already],
            rejected=request.rejected,
            expires_in=self.expires_in,
        )
        if part is not None:
            answer["part"] = part + 1
        if request.checked or not self.legacy_answer_delay_s:
            self.publish_answer(serial, answer)
        else:
            due_at = self.clock() + self.legacy_answer_delay_s
            entry = (due_at, next(self._answer_seq), serial, answer)
            heapq.heappush(self._answers_due, entry)

    def _grant(
        self,
        conn,
        serial: str,
        request: eb.UrlRequest,
        now: float,
        bucket: str | None = None,
        part: int | None = None,
    ):
        """Presigned POSTs and grant rows for a request, in the caller's transaction.

        Returns (the verification group of an unchecked request or None, grants as
        (grant, POST fields, POST url), grants for files verified before that only need
        their object confirmed).
        """
        expires_at = now + self.expires_in
        group = None if request.checked else (request.request_id or uuid.uuid4().hex)
        if group is not None and part is not None:
            group = f"{group}.{part + 1}"
        store = self.stores[bucket]
        grants: list[tuple[eb.Grant, dict[str, str], str]] = []
        already: list[eb.Grant] = []
        known = self._names_known(conn, request)
        for spec in request.files:
            seen = known.get(spec.name)
            verified_before = seen is not None and seen.status == "verified"
            same_bytes = verified_before and (seen.size, seen.sha256) == (spec.size, spec.sha256)
            if request.checked and same_bytes:
                key = seen.key  # where the delivered bytes are
            else:
                key = _key_for(serial, spec.name, seen)
            max_bytes = spec.size or self.max_file_bytes
            grant = eb.Grant(
                serial=serial,
                name=spec.name,
                key=key,
                max_bytes=max_bytes,
                expires_at=expires_at,
                request_id=request.request_id or group,
                declared_size=spec.size,
                declared_sha256=spec.sha256,
                bucket=bucket,
            )
            if request.checked and same_bytes:
                # Verified before (the device crashed or missed the message): no upload;
                # a job confirms the object still has these bytes, then verifies it.
                already.append(grant)
                continue
            post = store.presigned_post(key, max_bytes=max_bytes, expires_in=self.expires_in)
            grants.append((grant, post.fields, post.url))

        self._store_grants(conn, serial, request, [g for g, _, _ in grants])
        return group, grants, already

    def _store_grants(
        self, conn, serial: str, request: eb.UrlRequest, grants: list[eb.Grant]
    ) -> None:
        """Grant rows, leased to us, and the refused names' error rows (caller's
        transaction: nothing is published before it commits)."""
        if grants:
            # One statement: the device registered, the rows written and leased to us
            # (a re-grant takes the name over from whoever held it).
            self.leases.issue(conn, serial, request.checked, grants)
        else:
            db.queries.edge_ensure_device(conn, device_id=serial)
        for rejection in request.rejected:
            if not self.errors.allowed(serial):
                break
            self.errors.insert(
                conn,
                serial,
                None,
                eb.E_NAME,
                "warn",
                f"file name refused: {rejection.reason}",
                {"filename": eb._printable(rejection.filename, 255)},
            )

    @staticmethod
    def _names_known(conn, request: eb.UrlRequest) -> dict[str, _Known]:
        rows = db.queries.edge_names_known(
            conn,
            device_id=request.serial,
            file_names=[f.name for f in request.files],
            capture_names=[eb.key_name(f.name) for f in request.files],
        )
        return {row[0]: _Known(*row[1:]) for row in rows}
