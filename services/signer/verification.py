"""Verification: read back what a device uploaded, judge it, record it, tell the device.

A job is one request's due grants (`jobs`); the first object found pulls in its
siblings (a device uploads a batch together), all are read in parallel through the
object store (`camfleet.storage.fast_s3.ObjectReader` for S3 with static credentials,
the store's own `digest` otherwise), judged by `edge_batch.judge_upload` and the
verified ones recorded in one transaction, under the grant's lease, before their
`{"file"}` messages go out. Reused names whose bytes are an earlier delivery's are
recognised here (`_resent_images`): the copy is deleted, the earlier row stands.

`Verification` runs a job at a time per thread (the signer's `edge-verify` threads).
It is built with what it uses: the pool, the stores and their readers by bucket, the
watch table (`watch.WatchTable`), the leases it records under (`leases.Leases`), the
device error rows (`errors.DeviceErrors`), a `publish_verification(pub)` callable, the
stats, the clock and the grace period; optionally the hand-off that takes new captures
and a `wake()` callable that tells the worker a job finished. `reads` is the worker's
read pool while it runs (without one, a batch's objects are read one by one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from camfleet import db
from camfleet.protocol import edge_batch as eb
from camfleet.storage import ObjectStore
from services.signer.errors import DeviceErrors
from services.signer.handoff import Handoff
from services.signer.leases import LeaseLost, Leases
from services.signer.watch import Pending, SignerStats, WatchTable

log = logging.getLogger("camfleet.signer")

# Verification jobs (one per request's due files) in parallel, and the threads a job
# reads a batch's other objects with (a GET to a remote store waits tens of
# milliseconds; five in a row would make a device wait five times as long). Together
# at most 8 GETs at once, which does not flood a small S3-compatible server.
CHECK_WORKERS = 4
READ_WORKERS = 4


class Verification:
    """The signer's verification jobs (run on its `edge-verify` threads)."""

    def __init__(
        self,
        pool: db.Pool,
        stores: dict[str | None, ObjectStore],
        readers: dict,
        watch: WatchTable,
        leases: Leases,
        errors: DeviceErrors,
        publish_verification: Callable[[eb.Publish], None],
        stats: SignerStats,
        *,
        clock: Callable[[], float] = time.time,
        grace_s: float = eb.GRANT_GRACE_S,
        handoff: Handoff | None = None,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.stores = stores  # {bucket or None: store}; None is the signer's own
        self.readers = readers  # {bucket: ObjectReader or None (the store digests)}
        self.watch = watch
        self.leases = leases
        self.errors = errors
        self.publish_verification = publish_verification
        self.stats = stats
        self.clock = clock
        self.grace_s = grace_s
        self.handoff = handoff
        self.wake = wake
        self.reads: Executor | None = None  # the worker's read threads, while it runs

    def _store(self, bucket: str | None) -> ObjectStore:
        return self.stores.get(bucket, self.stores[None])

    def _read(
        self, key: str, max_bytes: int | None = None, bucket: str | None = None
    ) -> tuple[int, str | None] | None:
        """(size, SHA-256) of the stored object, None when absent; raises on store errors."""
        reader = self.readers.get(bucket)
        if reader is not None:
            return reader.digest(key, max_bytes)
        return self._store(bucket).digest(key, max_bytes)

    def check_safely(self, job: list[Pending]) -> None:
        try:
            self._check(job)
        except Exception as exc:
            now = self.clock()
            for pending in job:  # resolved ones are no longer watched: harmless
                self.watch.backoff(pending, now)
            log.warning("signer: verifying %s failed: %s", job[0].grant.key, type(exc).__name__)
        finally:
            for pending in job:
                pending.in_flight = False
            self.wake()

    def _check(self, job: list[Pending]) -> None:
        """Verify a request's due grants; the first object found pulls in its siblings.

        A device uploads a batch together, so once one of its objects is there the
        others are read at once in the same job (in parallel) instead of being probed
        one by one, and all that pass are recorded in one transaction.
        """
        outcomes = self._read_all(job)
        if any(isinstance(o, tuple) for o in outcomes):
            siblings = self._claim_siblings(job[0])
            job.extend(siblings)  # the caller releases them with the rest of the job
            outcomes += self._read_all(siblings)
        verified: list[tuple[Pending, int, str]] = []
        for pending, outcome in zip(job, outcomes, strict=True):
            grant = pending.grant
            now = self.clock()
            if isinstance(outcome, Exception):  # store down: look again later
                self.watch.backoff(pending, now)
                log.warning(
                    "signer: store error checking %s: %s", grant.key, type(outcome).__name__
                )
                continue
            size, sha = outcome if outcome else (None, None)
            verdict, reason = eb.judge_upload(grant, size, sha)
            if verdict is eb.Verdict.MISSING:
                if pending.recheck:  # nobody is uploading it: let the next request ask
                    reason = "object gone since it was verified"
                    self._resolve_failed(pending, "failed", eb.E_NEVER_UPLOADED, reason, None, None)
                elif now > grant.expires_at + self.grace_s:
                    self._resolve_failed(pending, "expired", eb.E_NEVER_UPLOADED, reason, size, sha)
                else:
                    self.watch.backoff(pending, now)
                continue
            if verdict is not eb.Verdict.VERIFIED:
                code = eb.E_SIZE if verdict is eb.Verdict.SIZE else eb.E_CHECKSUM
                if verdict is eb.Verdict.SIZE and size and size > grant.max_bytes:
                    # The store did not enforce the POST policy: do not keep what it forbade.
                    self._store(grant.bucket).delete(grant.key)
                self._resolve_failed(pending, "failed", code, reason, size, sha)
                continue
            verified.append((pending, size, sha))
        if verified:
            self._resolve_verified(verified)

    def _read_all(self, pendings: list[Pending]) -> list:
        """Each grant's stored (size, SHA-256), None when absent, or the exception."""
        if len(pendings) > 1 and self.reads is not None:
            return list(self.reads.map(self._read_outcome, pendings))
        return [self._read_outcome(p) for p in pendings]

    def _read_outcome(self, pending: Pending):
        try:
            grant = pending.grant
            return self._read(grant.key, grant.max_bytes, grant.bucket)
        except Exception as exc:
            return exc

    def _claim_siblings(self, pending: Pending) -> list[Pending]:
        """The other open grants of this file's request, now in this job's hands."""
        if pending.siblings is None:
            return []
        with self.watch.lock:
            found = [
                other
                for other in self.watch.pending.values()
                if other.siblings == pending.siblings
                and other is not pending
                and not other.in_flight
            ]
            for other in found:
                other.in_flight = True
        return found

    def _resolve_verified(self, found: list[tuple[Pending, int, str]]) -> None:
        """Capture rows for verified uploads in one transaction, then their {"file"}s.

        Only grants this instance still holds are recorded; the others (claimed or
        re-granted by another instance meanwhile) are dropped: their holder records them.
        """
        now = self.clock()
        try:
            resent = self._resent_images(found)
            with self.pool.connection() as conn:
                verified, lost = self.leases.holding(conn, found)
                captures = [
                    self._record_capture(conn, p.grant, size, sha, resent.get(id(p)))
                    for p, size, sha in verified
                ]
        except Exception as exc:
            if len(found) > 1:  # one bad row must not hold back the others
                for item in found:
                    self._resolve_verified([item])
                return
            pending = found[0][0]  # database down: keep the grant open, verify later
            self.watch.backoff(pending, now)
            log.warning("signer: could not record %s: %s", pending.grant.key, type(exc).__name__)
            return
        self._drop_lost(lost)
        publish: list[eb.Publish] = []
        with self.watch.lock:
            for pending, _, _ in verified:
                grant = pending.grant
                self.watch.unwatch(pending)
                self.stats.verified += 1
                publish += self.watch.publishing.resolved(
                    grant.serial, pending.group, grant.name, True, now
                )
        for pending, _, _ in verified:
            earlier = resent.get(id(pending))
            if earlier is not None and earlier[1] != pending.grant.key:
                self._drop_copy(pending.grant)
        for pub in publish:
            self.publish_verification(pub)
        if self.handoff:
            self.handoff.add([c for c in captures if c])

    def _resent_images(self, verified: list[tuple[Pending, int, str]]) -> dict:
        """Uploads under a reused name that are an earlier delivery's exact bytes.

        {id(pending): (record_id, key) of that delivery}. A device that missed a
        verification sends the image again under the same name and gets a key of its
        own; the bytes tell it apart from a new image. The earlier object is read back
        first: only while it still holds those bytes is the new copy redundant.
        """
        reused = [(p, sha) for p, _, sha in verified if p.grant.reuses_name]
        if not reused:
            return {}
        with self.pool.connection() as conn:
            found = [
                (pending, sha, _same_image(conn, pending.grant, sha)) for pending, sha in reused
            ]
        resent = {}
        for pending, sha, row in found:
            if row is None:
                continue
            record_id, key = row
            if key == pending.grant.key:  # this very object (re-confirmed after a re-request)
                resent[id(pending)] = (record_id, key)
                continue
            stored = self._read(key, bucket=pending.grant.bucket)
            if stored is not None and stored[1] == sha:
                resent[id(pending)] = (record_id, key)
        return resent

    def _drop_copy(self, grant: eb.Grant) -> None:
        """Delete a re-sent image's second object; its bytes are stored under the first."""
        try:
            self._store(grant.bucket).delete(grant.key)
        except Exception as exc:  # a leftover copy wastes space, loses nothing
            log.warning(
                "signer: could not delete the re-sent copy %s: %s", grant.key, type(exc).__name__
            )

    def _record_capture(
        self, conn, grant: eb.Grant, size: int, sha: str, earlier: tuple[str, str] | None
    ) -> dict | None:
        """Capture row + grant resolution in the caller's transaction; the new capture.

        `earlier` is the (record_id, key) of a delivery these bytes already are: then
        the grant points at it and no row is written.
        """
        if earlier is not None:
            self._resolve_grant(conn, grant, size, sha, *earlier)
            return None
        metadata = {"uploaded_via": "edge-presigned-post"}
        if grant.renamed:  # the device's own name (reused or not a safe key as is)
            metadata["device_file_name"] = grant.name
        if grant.bucket:  # storage_path is in this bucket, not the signer's own
            metadata["bucket"] = grant.bucket
        row = db.queries.edge_capture_upsert(
            conn,
            device_id=grant.serial,
            file_name=grant.capture_name,
            image_bytes=size,
            content_type=_content_type(grant.name),
            storage_path=grant.key,
            sha256=sha,
            metadata=metadata,
        )
        record_id, inserted = row
        self._resolve_grant(conn, grant, size, sha, record_id, None)
        if not inserted:
            return None
        return {
            "record_id": record_id,
            "device_id": grant.serial,
            "file": grant.capture_name,
            "key": grant.key,
            "size": size,
            "sha256": sha,
        }

    @staticmethod
    def _resolve_grant(
        conn,
        grant: eb.Grant,
        size,
        sha,
        capture_id,
        key: str | None,
        status: str = "verified",
        reason: str | None = None,
    ) -> None:
        """The grant's final state, in the caller's transaction (`key`: where the
        delivered bytes are, when not the grant's own key)."""
        db.queries.edge_grant_resolve(
            conn,
            device_id=grant.serial,
            file_name=grant.name,
            status=status,
            failed_reason=reason,
            stored_size=size,
            stored_sha256=sha,
            capture_id=capture_id,
            object_key=key,
        )

    def _resolve_failed(self, pending, status, code, reason, size, sha) -> None:
        grant = pending.grant
        try:
            with self.pool.connection() as conn:
                _, lost = self.leases.holding(conn, [(pending,)])
                if lost:
                    raise LeaseLost
                self._resolve_grant(conn, grant, size, sha, None, None, status, reason)
                if self.errors.allowed(grant.serial):
                    self.errors.insert(
                        conn, grant.serial, grant.name, code, "error", reason, {"key": grant.key}
                    )
        except LeaseLost:
            self._drop_lost([pending])
            return
        except Exception as exc:
            self.watch.backoff(pending, self.clock())
            log.warning("signer: could not record failure of %s: %s", grant.key, type(exc).__name__)
            return
        with self.watch.lock:
            self.watch.unwatch(pending)
            self.stats.failed += 1
            publish = self.watch.publishing.resolved(
                grant.serial, pending.group, grant.name, False, self.clock()
            )
        log.info("signer: %s not verified: %s", grant.key, reason)
        for pub in publish:
            self.publish_verification(pub)

    def _drop_lost(self, lost: list[Pending]) -> None:
        """Stop watching grants another instance holds now (its own watch records them)."""
        if not lost:
            return
        now = self.clock()
        with self.watch.lock:
            for pending in lost:
                self.watch.unwatch(pending)
                # An unchecked request's group no longer waits for this name here.
                self.watch.publishing.resolved(
                    pending.grant.serial, pending.group, pending.grant.name, False, now
                )
            self.stats.lease_lost += len(lost)
        log.info("signer: %d grants are held by another instance now", len(lost))


def jobs(due: list[Pending]) -> list[list[Pending]]:
    """Due grants grouped by request: one verification job (and transaction) each."""
    jobs: dict[object, list[Pending]] = {}
    for pending in due:
        jobs.setdefault(pending.siblings or id(pending), []).append(pending)
    return list(jobs.values())


def _same_image(conn, grant: eb.Grant, sha: str) -> tuple[str, str] | None:
    """(record_id, key) of an earlier capture of these bytes under the grant's name."""
    return db.queries.edge_capture_same_image(
        conn, device_id=grant.serial, sha256=sha, file_name=grant.name
    )


def _content_type(name: str) -> str:
    lower = name.lower()
    if lower.endswith((".jpg", ".jpeg")):
        return "image/jpeg"
    if lower.endswith(".png"):
        return "image/png"
    if lower.endswith((".mp4", ".h264")):
        return "video/mp4"
    return "application/octet-stream"
