"""Sans-IO core of the edge batch-upload transaction (seed 000, "entomologist").

Two plain classes and a few parsers, fed parsed messages and the current time, that
answer with what to do; MQTT, HTTP, S3, SQL and Prefect live in thin shells
(`camfleet/edge/` on the device, `services/signer/` in the cloud).

Wire format (deployed devices depend on it; topic templates are configurable)
-----------------------------------------------------------------------------
``cameraDevice/generateURL/{serial}``  device -> cloud, the request::

    {"device-serialID": "ENTO-0001", "bucket-name": "any", "files": ["a.jpg", ...]}

  camfleet's own device adds two optional fields (deployed devices send neither)::

    "request-id": "3f2a...",                            echoed back in the answer
    "checksums": {"a.jpg": {"size": 51200, "sha256": "<64 hex>"}, ...}

``cameraDevice/getURL/{serial}``  cloud -> device, the answer (only strings and
  integers, never true/false/null, because the seed device parses it with
  ``ast.literal_eval``; each ``url`` is exactly boto3's ``generate_presigned_post``
  shape, which the seed POSTs as ``requests.post(url["url"], data=url["fields"],
  files={"file": ...})``)::

    {"device-serialID": "ENTO-0001", "request-id": "3f2a...",
     "files": [{"filename": "a.jpg", "key": "devices/ENTO-0001/a.jpg",
                "url": {"url": "https://...", "fields": {"key": ..., "policy": ...}}}],
     "verified": ["b.jpg"],                 already stored with that checksum: no upload
     "rejected": [{"filename": "../x", "reason": "..."}],
     "expires-in": 300}

  A refused request still answers ``"files": []`` plus ``"error"`` so a seed device
  uploads nothing instead of crashing on a missing key.

``cameraDevice/fileUploaded/{serial}``  cloud -> device, one per verified file::

    {"file": "a.jpg"}

Checksums
---------
A request with ``checksums`` is *checked*: the signer verifies existence, the exact
size and the SHA-256 it computes from the stored object against the declared one, and
answers an already-stored identical file with ``verified`` instead of a URL. A request
without them (deployed firmware) is *unchecked*: the signer verifies existence and the
size against the presigned POST's content-length range and records the SHA-256 it
computes, so later audits can compare. Either way the object key is chosen by the
signer (``edge/{serial}/{key_name(name)}``), never by the device; a name that was delivered
before and is asked for again without proof of the same bytes gets a key of its own
(``edge/{serial}/{stem}~{token}{ext}``, see `reuse_key`), so a camera that reuses a
name cannot overwrite an image it has already deleted.

Unchecked requests are answered LEGACY_ANSWER_DELAY_S late and get their
verifications only once every file of the request is resolved, after a short settle
delay: the seed device subscribes to the URL topic while it publishes the request, and
to the verification topic only after its last upload, so earlier messages would be lost.
"""

from __future__ import annotations

import ast
import hashlib
import json
import posixpath
import re
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from camfleet.keys import BadName, key_within, object_key, safe_id, sanitize_name

# ---------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------

# The seed's move.py moves "batches of 5"; the device side defaults to it.
DEFAULT_BATCH_SIZE = 5

# Files one answer may hold (and the largest batch a camfleet device asks for): ten
# times the seed's batch, while an answer (one presigned POST is ~1.5 KB) stays far
# below MQTT and AWS IoT's 128 KB message limit.
MAX_REQUEST_FILES = 50

# Names one request may hold: a device that moved a backlog at once may name more than
# one answer holds; such a request is answered in parts of MAX_REQUEST_FILES, each its
# own answer message (a seed device uses the first and asks again for the rest).
MAX_REQUEST_NAMES = 250

# A raw request: 250 names of up to 255 bytes plus checksums is under 100 KB; anything
# beyond 128 KiB is refused before json.loads.
MAX_REQUEST_BYTES = 128 * 1024

# Longest file name a device can have (Linux and FAT/exFAT allow 255 bytes).
MAX_DEVICE_NAME_BYTES = 255

# A raw getURL answer the device accepts: 50 presigned POSTs at ~1.5 KB each.
MAX_ANSWER_BYTES = 128 * 1024

# A verification message is {"file": name}: a 255-byte name, JSON-escaped, fits.
MAX_VERIFICATION_BYTES = 2048

# Largest file a presigned POST allows: trap cameras write JPEGs of a few MB; 32 MiB
# also fits short clips and bounds what the signer reads back to hash.
MAX_FILE_BYTES = 32 * 1024 * 1024

# Presigned POST lifetime: five 50 KB-5 MB uploads over a slow cellular link finish in
# well under a minute; five minutes leaves margin and keeps a leaked URL short-lived.
URL_EXPIRES_S = 300

# How long after a URL expires the signer still looks for its object: an upload that
# started just before expiry may finish a little later.
GRANT_GRACE_S = 30

# Unchecked (seed firmware) requests: wait this long after the last file of a request
# is resolved before publishing, so the device has subscribed to the verification topic.
LEGACY_SETTLE_S = 2.0

# Unchecked (seed firmware) requests: the seed starts its URL subscriber and its
# request publisher at the same moment, each with its own TLS connection; answering
# this much later lets the subscriber be in place (its subscription is QoS 0 and not
# persistent, so an earlier answer would be lost and the device would wait forever).
LEGACY_ANSWER_DELAY_S = 1.5

# Device side: how long to wait for the answer to a request before asking again, and
# how often to ask before the batch is left for the next run.
URL_TIMEOUT_S = 10.0
URL_ATTEMPTS = 3

# Device side: how long to wait for all verifications after the last upload.
VERIFY_TIMEOUT_S = 30.0

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# Error codes the signer records in device_errors (the 3000s are edge uploads).
E_REQUEST = 3001  # request refused as a whole (JSON, types, serial, too many files)
E_NAME = 3002  # one file name refused (path components, duplicates, declared size)
E_SIZE = 3003  # stored object's size outside the grant or unequal to the declared size
E_CHECKSUM = 3004  # stored object's SHA-256 differs from the declared one
E_NEVER_UPLOADED = 3005  # the grant expired without an object
E_RATE = 3007  # the device sent requests faster than its rate limit: answered, not granted
E_CAPACITY = 3008  # the device (or the signer) has too many open grants: ask again later
E_BUCKET = 3009  # bucket-name not in the signer's allow-list


class RequestRefused(ValueError):
    """A request refused as a whole; `reason` is safe to publish back to the device."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# Topics
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    request: str = "cameraDevice/generateURL/{serial}"
    urls: str = "cameraDevice/getURL/{serial}"
    verified: str = "cameraDevice/fileUploaded/{serial}"

    def for_device(self, serial: str) -> tuple[str, str, str]:
        return (
            self.request.format(serial=serial),
            self.urls.format(serial=serial),
            self.verified.format(serial=serial),
        )

    def request_filter(self) -> str:
        """The subscription matching every device's request topic."""
        return self.request.format(serial="+")

    def serial_from_request_topic(self, topic: str) -> str:
        """The {serial} level of a request topic, validated; RequestRefused otherwise."""
        pattern = re.escape(self.request).replace(re.escape("{serial}"), "([^/]+)")
        match = re.fullmatch(pattern, topic)
        if not match:
            raise RequestRefused("topic does not match the request template")
        try:
            return safe_id(match.group(1), "serial in topic")
        except BadName as exc:
            raise RequestRefused(str(exc)) from None


# Edge objects live under their own prefix, apart from the device API's `devices/<id>/`,
# so no edge upload can ever take a key that another pipeline's device owns.
EDGE_PREFIX = "edge"

# A name reused for a new image (a camera whose counter or clock restarted: a Raspberry
# Pi has no RTC) is stored under its own key, `{stem}~{token}{ext}`; a name that is not
# a safe key as is becomes `{stem}~{hash}{ext}`. A plain key name never holds '~', so
# neither can meet a name a device asks for; the hash has 10 hex digits and the reuse
# token 12 characters without '.', so they cannot meet each other either.
REUSE_MARK = "~"
NAME_HASH_DIGITS = 10

_SAFE_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SAFE_EXT = re.compile(r"^\.[A-Za-z0-9]{1,10}$")
_KEY_STEM_CHARS = 80


def device_key(serial: str, name: str) -> str:
    """The object key of a device's file: edge/{serial}/{key_name(name)}."""
    return object_key(EDGE_PREFIX, safe_id(serial, "serial"), key_name(name))


def key_name(name: object) -> str:
    """A safe, collision-free object-key component for any file name a device can have.

    A name of `[A-Za-z0-9._-]` (not starting with '.', '_' or '-') is its own key
    name. Any other (spaces, colons, accents, a leading dot) becomes
    `{ascii stem}~{10 hex of its SHA-256}{ext}`: readable, and two names can only
    meet if their SHA-256 prefixes do.
    """
    name = check_device_name(name)
    if _SAFE_KEY_NAME.match(name) and len(name) <= 128 and name not in {".", ".."}:
        return name
    stem, ext = posixpath.splitext(name)
    if not _SAFE_EXT.match(ext):
        stem, ext = name, ""
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    safe_stem = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_stem).strip("._-")[:_KEY_STEM_CHARS]
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:NAME_HASH_DIGITS]
    return f"{safe_stem.rstrip('._-') or 'file'}{REUSE_MARK}{digest}{ext}"


def reuse_key(serial: str, name: str, token: str | None = None) -> str:
    """A fresh key in the device's prefix for a new image under a delivered `name`."""
    stem, ext = posixpath.splitext(key_name(name))
    token = token or uuid.uuid4().hex[:12]  # 48 bits: never the same twice for one name
    if not re.fullmatch(r"[0-9a-z]{1,32}", token):
        raise BadName("reuse token must be 1-32 of 0-9 a-z")
    serial = safe_id(serial, "serial")
    key = object_key(EDGE_PREFIX, serial, f"{stem}{REUSE_MARK}{token}{ext}")
    if not key_within(key, f"{EDGE_PREFIX}/{serial}") or key.count("/") != 2:
        raise BadName("reuse key escapes the device's prefix")
    return key


def check_name(name: object) -> str:
    """A file name usable as a key as is: sanitizing must not change it."""
    clean = sanitize_name(name)
    if clean != name:
        raise BadName("name has characters outside A-Z a-z 0-9 . _ -")
    return clean


def check_device_name(name: object) -> str:
    """Any name a file can have on a device's filesystem; BadName for what cannot.

    Refused: not a string, empty, '.', '..', '/' or NUL (no filesystem allows them in
    a name), not encodable as UTF-8 (a lone surrogate), over 255 bytes. Everything
    else (spaces, colons, accents, a leading dot, even control characters) is a name a
    camera can write, and `key_name` maps it to a safe key.
    """
    if not isinstance(name, str) or not name:
        raise BadName("name must be a non-empty string")
    if name in {".", ".."}:
        raise BadName("name must not be '.' or '..'")
    if "/" in name or "\x00" in name:
        raise BadName("name must not contain '/' or NUL")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadName("name is not valid UTF-8") from None
    if len(encoded) > MAX_DEVICE_NAME_BYTES:
        raise BadName(f"name longer than {MAX_DEVICE_NAME_BYTES} bytes")
    return name


# ---------------------------------------------------------------------------------------
# Cloud side: the request
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    name: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Rejection:
    filename: str
    reason: str


@dataclass(frozen=True)
class UrlRequest:
    serial: str
    bucket_name: str | None
    request_id: str | None
    files: tuple[FileSpec, ...]
    rejected: tuple[Rejection, ...]
    checked: bool  # the device declared size and SHA-256 of every file


def _load_json(payload: bytes, limit: int) -> Any:
    if len(payload) > limit:
        raise RequestRefused(f"message larger than {limit} bytes")
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: a small message nested thousands of levels deep.
        raise RequestRefused("message is not JSON") from None


def _load_payload(payload: bytes, limit: int) -> Any:
    """A cloud's answer or verification: JSON, or the Python literal a seed-style cloud
    may send (the seed device parses both with ast.literal_eval)."""
    try:
        return _load_json(payload, limit)
    except RequestRefused:
        if len(payload) > limit:
            raise
    try:
        return ast.literal_eval(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        raise RequestRefused("message is neither JSON nor a Python literal") from None


def _printable(value: object, limit: int = 80) -> str:
    """A device-supplied value made safe to echo in a reason or a log line."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text[:limit]


def parse_url_request(
    topic_serial: str,
    payload: bytes,
    *,
    max_files: int = MAX_REQUEST_NAMES,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> UrlRequest:
    """Validate a generateURL request from the device that owns `topic_serial`.

    The request as a whole is refused (RequestRefused) for bad JSON or types, a serial
    that is not the topic's, or too many files; single bad names are listed in
    `rejected` and the rest of the batch goes ahead.
    """
    body = _load_json(payload, MAX_REQUEST_BYTES)
    if not isinstance(body, dict):
        raise RequestRefused("request must be a JSON object")
    serial = body.get("device-serialID")
    if serial != topic_serial:
        raise RequestRefused("device-serialID does not match the topic's device")
    bucket = body.get("bucket-name")
    if bucket is not None and not isinstance(bucket, str):
        raise RequestRefused("bucket-name must be a string")
    request_id = body.get("request-id")
    if request_id is not None:
        try:
            request_id = safe_id(request_id, "request-id")
        except BadName as exc:
            raise RequestRefused(str(exc)) from None
    names = body.get("files")
    if not isinstance(names, list):
        raise RequestRefused("files must be a list of file names")
    if len(names) > max_files:
        raise RequestRefused(f"more than {max_files} files in one request")
    checksums = body.get("checksums")
    if checksums is not None and not isinstance(checksums, dict):
        raise RequestRefused("checksums must be an object keyed by file name")
    checked = bool(names) and checksums is not None
    files, rejected = _check_files(names, checksums, max_file_bytes)
    return UrlRequest(
        serial=serial,
        bucket_name=bucket,
        request_id=request_id,
        files=tuple(files),
        rejected=tuple(rejected),
        checked=checked,
    )


def _check_files(
    names: list, checksums: dict | None, max_file_bytes: int
) -> tuple[list[FileSpec], list[Rejection]]:
    """The request's files that may go ahead, and why each of the others may not."""
    files: list[FileSpec] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for raw in names:
        try:
            name = check_device_name(raw)
        except BadName as exc:
            rejected.append(Rejection(_printable(raw), str(exc)))
            continue
        if name in seen:
            rejected.append(Rejection(name, "duplicate name in request"))
            continue
        seen.add(name)
        size = sha = None
        if checksums is not None:
            info = checksums.get(name)
            if not isinstance(info, dict):
                rejected.append(Rejection(name, "no checksum entry for this file"))
                continue
            size, sha = info.get("size"), info.get("sha256")
            if type(size) is not int or not 0 < size <= max_file_bytes:
                rejected.append(Rejection(name, f"size must be 1-{max_file_bytes} bytes"))
                continue
            if not isinstance(sha, str) or not _SHA256.match(sha):
                rejected.append(Rejection(name, "sha256 must be 64 lowercase hex digits"))
                continue
        files.append(FileSpec(name, size, sha))
    return files, rejected


def url_answer(
    serial: str,
    request_id: str | None,
    grants: Iterable[tuple[str, str, str, dict[str, str]]],
    verified: Iterable[str] = (),
    rejected: Iterable[Rejection] = (),
    expires_in: int = URL_EXPIRES_S,
    error: str | None = None,
) -> dict[str, Any]:
    """The getURL payload; `grants` are (filename, key, post_url, post_fields)."""
    answer: dict[str, Any] = {"device-serialID": serial}
    if request_id:
        answer["request-id"] = request_id
    answer["files"] = [
        {"filename": name, "key": key, "url": {"url": url, "fields": dict(fields)}}
        for name, key, url, fields in grants
    ]
    answer["verified"] = list(verified)
    answer["rejected"] = [{"filename": r.filename, "reason": r.reason} for r in rejected]
    answer["expires-in"] = int(expires_in)
    if error:
        answer["error"] = error
    return answer


def verification_message(name: str) -> bytes:
    """Plain JSON, which the seed's ast.literal_eval parser also accepts."""
    return json.dumps({"file": name}).encode()


# ---------------------------------------------------------------------------------------
# Cloud side: verifying what was uploaded
# ---------------------------------------------------------------------------------------


@dataclass
class Grant:
    """One presigned POST handed out, waiting for its object."""

    serial: str
    name: str
    key: str
    max_bytes: int
    expires_at: float  # wall-clock seconds; the URL stops working then
    request_id: str | None = None
    declared_size: int | None = None
    declared_sha256: str | None = None
    bucket: str | None = None  # None: the signer's own bucket

    @property
    def capture_name(self) -> str:
        """The captures row's device_capture_id: the key's basename (`key_name(name)`,
        or the reuse key's)."""
        return self.key.rsplit("/", 1)[1]

    @property
    def reuses_name(self) -> bool:
        """A new image under a name delivered before, granted its own key."""
        return self.capture_name != key_name(self.name)

    @property
    def renamed(self) -> bool:
        """The device's name is not the captures row's: kept in its metadata."""
        return self.capture_name != self.name


class Verdict(Enum):
    VERIFIED = "verified"
    MISSING = "missing"  # not uploaded (yet)
    SIZE = "size"
    CHECKSUM = "checksum"


def judge_upload(grant: Grant, size: int | None, sha256: str | None) -> tuple[Verdict, str]:
    """Whether the stored object (size and SHA-256 as read back) satisfies the grant.

    The object store is not trusted to have enforced the POST policy (some S3-compatible
    servers do not): the size bound is checked here again.
    """
    if size is None:
        return Verdict.MISSING, "object not found"
    if not 0 < size <= grant.max_bytes:
        return Verdict.SIZE, f"stored size {size} outside 1-{grant.max_bytes}"
    if grant.declared_size is not None and size != grant.declared_size:
        return Verdict.SIZE, f"stored size {size} != declared {grant.declared_size}"
    if grant.declared_sha256 is not None and sha256 != grant.declared_sha256:
        return Verdict.CHECKSUM, "stored SHA-256 differs from the declared one"
    return Verdict.VERIFIED, "ok"


@dataclass(frozen=True)
class Publish:
    """Publish a verification {"file": name} for serial."""

    serial: str
    name: str


class VerificationQueue:
    """Holds verifications until they may be published.

    Checked requests publish each file as soon as it is verified. Unchecked (seed)
    requests publish all of a request's verifications together, LEGACY_SETTLE_S after
    its last file was resolved (verified, failed or expired).
    """

    def __init__(self, settle_s: float = LEGACY_SETTLE_S) -> None:
        self.settle_s = settle_s
        # (serial, request key) -> {"open": set of names, "done": [names], "ready_at"}
        self._groups: dict[tuple[str, str], dict[str, Any]] = {}

    def open_request(self, serial: str, group: str, names: Iterable[str], now: float) -> None:
        """A new request; names it re-requests leave the device's earlier requests."""
        names = set(names)
        for (other_serial, other), entry in self._groups.items():
            if other_serial == serial and other != group and entry["open"] & names:
                entry["open"] -= names
                if not entry["open"]:
                    entry["ready_at"] = now + self.settle_s
        self._groups[(serial, group)] = {"open": names, "done": [], "ready_at": None}

    def resolved(
        self, serial: str, group: str | None, name: str, ok: bool, now: float
    ) -> list[Publish]:
        """A file was verified (ok) or given up; returns what to publish now."""
        if group is None:
            return [Publish(serial, name)] if ok else []
        entry = self._groups.get((serial, group))
        if entry is None:
            return [Publish(serial, name)] if ok else []
        entry["open"].discard(name)
        if ok:
            entry["done"].append(name)
        if not entry["open"]:
            entry["ready_at"] = now + self.settle_s
        return []

    def due(self, now: float) -> list[Publish]:
        out: list[Publish] = []
        for group_key in list(self._groups):
            entry = self._groups[group_key]
            if entry["ready_at"] is not None and entry["ready_at"] <= now:
                out += [Publish(group_key[0], name) for name in entry["done"]]
                del self._groups[group_key]
        return out

    def next_due(self) -> float | None:
        times = [e["ready_at"] for e in self._groups.values() if e["ready_at"] is not None]
        return min(times) if times else None


# ---------------------------------------------------------------------------------------
# Device side: one batch
# ---------------------------------------------------------------------------------------


class FileState(Enum):
    BUFFERED = "buffered"  # in bufferStorage/, not yet asked for
    REQUESTED = "requested"  # named in a request, no URL yet
    URL_RECEIVED = "url_received"
    UPLOADED = "uploaded"  # the POST answered 2xx
    VERIFIED = "verified"  # the cloud confirmed it: may be deleted
    DELETED = "deleted"
    FAILED = "failed"  # this run gives up on it; it stays in bufferStorage/
    REFUSED = "refused"  # the cloud rejected the name: it stays, and is reported


@dataclass
class LocalFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Upload:
    """POST the file `name` to `url` with `fields` (the presigned POST)."""

    name: str
    url: str
    fields: dict[str, str]


@dataclass(frozen=True)
class Delete:
    name: str


@dataclass
class DeviceBatch:
    """One transaction: request URLs, upload, collect verifications, delete.

    Feed it `on_answer` (getURL payloads), `on_uploaded` (POST results) and
    `on_verification` (fileUploaded payloads); it answers with Upload/Delete actions.
    A payload that is not for this batch (another request-id, unknown names) is ignored,
    so stale answers from an earlier, crashed run cannot confuse it.
    """

    serial: str
    bucket_name: str
    files: list[LocalFile]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    states: dict[str, FileState] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)  # the latest URL per file
    url_deadline: float | None = None
    verify_deadline: float | None = None
    attempts: int = 0

    def __post_init__(self) -> None:
        for f in self.files:
            self.states.setdefault(f.name, FileState.BUFFERED)

    # -- requesting -------------------------------------------------------------------

    def request(self, now: float, url_timeout: float = URL_TIMEOUT_S) -> bytes:
        """The request payload for every file still without a URL; starts the clock."""
        wanted = [
            f
            for f in self.files
            if self.states[f.name] in (FileState.BUFFERED, FileState.REQUESTED)
        ]
        for f in wanted:
            self.states[f.name] = FileState.REQUESTED
        self.attempts += 1
        self.url_deadline = now + url_timeout
        body = {
            "device-serialID": self.serial,
            "bucket-name": self.bucket_name,
            "files": [f.name for f in wanted],
            "request-id": self.request_id,
            "checksums": {f.name: {"size": f.size, "sha256": f.sha256} for f in wanted},
        }
        return json.dumps(body).encode()

    def waiting_for_urls(self) -> bool:
        return any(s is FileState.REQUESTED for s in self.states.values())

    def on_answer(self, payload: bytes) -> list[Upload] | None:
        """A getURL payload: the uploads to make, or None when it is not ours."""
        try:
            body = _load_payload(payload, MAX_ANSWER_BYTES)
        except RequestRefused:
            return None
        if not isinstance(body, dict):
            return None
        # A seed-style cloud sends no request-id: its answer is matched by file name
        # (only files still waiting for a URL take one). Another request's id: not ours.
        if "request-id" in body and body.get("request-id") != self.request_id:
            return None
        entries = body.get("files")
        if not isinstance(entries, list):
            return None
        uploads: list[Upload] = []
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            name, post = entry.get("filename"), entry.get("url")
            if not isinstance(name, str) or not isinstance(post, dict):
                continue
            if self.states.get(name) is not FileState.REQUESTED:
                continue
            url, fields = post.get("url"), post.get("fields")
            if not isinstance(url, str) or not isinstance(fields, dict):
                continue
            self.states[name] = FileState.URL_RECEIVED
            upload = Upload(name, url, {str(k): str(v) for k, v in fields.items()})
            self.uploads[name] = upload
            uploads.append(upload)
        verified = body.get("verified")
        for name in verified if isinstance(verified, list) else []:
            if isinstance(name, str) and self.states.get(name) is FileState.REQUESTED:
                # Already stored; its {"file"} message follows on the verification topic.
                self.states[name] = FileState.UPLOADED
        rejected = body.get("rejected")
        for entry in rejected if isinstance(rejected, list) else []:
            name = entry.get("filename") if isinstance(entry, dict) else None
            if isinstance(name, str) and self.states.get(name) is FileState.REQUESTED:
                self.states[name] = FileState.REFUSED
                self.reasons[name] = _printable(entry.get("reason", "refused"), 200)
        if isinstance(body.get("error"), str) and "request-id" in body:
            # Only an answer to our own request may refuse its files: an error without
            # a request-id could be another client's, and seed clouds never send one.
            for name, state in self.states.items():
                if state is FileState.REQUESTED:
                    self.states[name] = FileState.REFUSED
                    self.reasons[name] = _printable(body["error"], 200)
        if not self.waiting_for_urls():
            self.url_deadline = None
        return uploads

    def give_up_urls(self) -> None:
        for name, state in self.states.items():
            if state is FileState.REQUESTED:
                self.states[name] = FileState.FAILED
                self.reasons[name] = "no URL received"
        self.url_deadline = None

    # -- uploading --------------------------------------------------------------------

    def needs_urls(self) -> bool:
        return any(s in (FileState.BUFFERED, FileState.REQUESTED) for s in self.states.values())

    def to_upload(self) -> list[str]:
        return [n for n, s in self.states.items() if s is FileState.URL_RECEIVED]

    def on_uploaded(self, name: str, ok: bool, reason: str = "") -> None:
        """A POST finished: 2xx (ok), or failed and may be retried with the same URL."""
        if self.states.get(name) is not FileState.URL_RECEIVED:
            return
        if ok:
            self.states[name] = FileState.UPLOADED
            self.reasons.pop(name, None)
        else:
            self.reasons[name] = reason or "upload failed"

    def on_url_refused(self, name: str, reason: str = "") -> None:
        """The store refused the URL (expired, policy): the next request asks anew."""
        if self.states.get(name) is FileState.URL_RECEIVED:
            self.states[name] = FileState.BUFFERED
            self.reasons[name] = reason or "URL refused by the store"

    def give_up_uploads(self) -> None:
        for name, state in self.states.items():
            if state in (FileState.URL_RECEIVED, FileState.BUFFERED):
                self.states[name] = FileState.FAILED
                self.reasons.setdefault(name, "not uploaded")

    def start_verify_clock(self, now: float, timeout: float = VERIFY_TIMEOUT_S) -> None:
        self.verify_deadline = now + timeout

    # -- verification -----------------------------------------------------------------

    def on_verification(self, payload: bytes) -> list[Delete]:
        """A {"file": name} message; a Delete for a file of this batch awaiting it.

        A verification may overtake the POST's own answer (the cloud sees the object
        before the device reads the HTTP response), so URL_RECEIVED files count too.
        """
        try:
            body = _load_payload(payload, MAX_VERIFICATION_BYTES)
        except RequestRefused:
            return []
        name = body.get("file") if isinstance(body, dict) else None
        if isinstance(name, str) and self.states.get(name) in (
            FileState.URL_RECEIVED,
            FileState.UPLOADED,
            FileState.REQUESTED,
            FileState.FAILED,
        ):
            self.states[name] = FileState.VERIFIED
            self.reasons.pop(name, None)
            return [Delete(name)]
        return []

    def waiting_for_verification(self) -> bool:
        return any(s is FileState.UPLOADED for s in self.states.values())

    def give_up_verification(self) -> None:
        for name, state in self.states.items():
            if state is FileState.UPLOADED:
                self.states[name] = FileState.FAILED
                self.reasons[name] = "no verification received"

    def on_deleted(self, name: str) -> None:
        if self.states.get(name) is FileState.VERIFIED:
            self.states[name] = FileState.DELETED

    # -- summary ----------------------------------------------------------------------

    def count(self, *states: FileState) -> int:
        return sum(1 for s in self.states.values() if s in states)

    def summary(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "files": len(self.files),
            "deleted": self.count(FileState.DELETED),
            "verified_not_deleted": self.count(FileState.VERIFIED),
            "left_for_next_run": self.count(
                FileState.BUFFERED,
                FileState.REQUESTED,
                FileState.URL_RECEIVED,
                FileState.UPLOADED,
                FileState.FAILED,
                FileState.REFUSED,
            ),
            "reasons": dict(self.reasons),
        }
