"""Sans-IO core of the ESP32-CAM chunk assembler (seed 002, "GXP MQTT Worker").

In the style of h11's ``_connection.py``: one class, :class:`Assembler`, is fed parsed
messages and the current monotonic time, and answers with *actions* (dataclasses) that
a thin shell turns into MQTT publishes, object-store puts and SQL.  Nothing in this
module touches a socket, a file, a database or Prefect, so every rule below is tested
with hypothesis over arbitrary orders, duplicates, losses and interleavings.

Wire format (unchanged from the seed, deployed firmware depends on it)
----------------------------------------------------------------------
``ESP32CAM/{MAC}/status``  ``{"device_id", "status", "pendingImg"}``
``ESP32CAM/{MAC}/data``    metadata ``{"device_id", "image_name", "image_size",
                           "max_chunks_size", "total_chunk_count", "capture_timeStamp",
                           "location", "error", "temperature", "humidity", "pressure",
                           "gas_resistance"}`` or a chunk ``{"device_id", "image_name",
                           "chunk_id", "max_chunk_size", "payload": base64}``
``ESP32CAM/{MAC}/ack``     worker -> device: ``{"image_name", "ACK_OK": {"next_wake_time"}}``
                           or ``{"image_name", "missing_chunks": [...]}``

Error codes (exactly the seed's table) and what this implementation uses them for
--------------------------------------------------------------------------------
====  ========  ==========================================================================
2101  error     a data-topic message was rejected before assembly: invalid JSON, wrong
                types, missing fields, malformed device id, topic/payload device id
                mismatch, declaration beyond the limits (image bytes, chunk count,
                chunk size), chunk id out of range.  ``details["reason"]`` says which.
      warn      ``reason: normalized``: the message was accepted after values
                PostgreSQL cannot hold were replaced (NaN/Infinity -> null, NUL and
                lone surrogates removed from text, a timestamp outside 2000-2100
                dropped); ``details["fields"]`` names them.
2102  warn      a chunk without (or with an empty) ``payload`` field.
2103  error     base64 decode of a chunk payload failed.
2200  error     the assembly cannot be finalized consistently: two different bodies for
                one chunk id (``conflicting_chunk``), more bytes than any budget allows
                (``too_many_bytes``), no room for another assembly (``capacity``) or
                for a chunk that came before its metadata (``early_buffer_full``, once
                per image; the chunk is recovered by NACK if the metadata follows).
                The service adds ``ingest_backlog``: stores/rows stalled and too many
                assembled bytes are waiting for them.
                The assembly is dropped, no ACK: the device keeps its copy and resends.
2201  error     assembly timeout: chunks still missing ``CAPTURE_TIMEOUT_MS`` after the
                last progress (NACKs were sent at most ``RETRANSMIT_MAX`` times), or
                chunks whose metadata never arrived.  The capture is marked failed.
2202  warn      declared ``image_size`` differs from the assembled byte count.
2203  warn      the image does not start with SOI ``FF D8`` and end with EOI ``FF D9``.
2204  error     storage upload failed after retries (emitted by the shell).
2205  error     the ``captures`` write failed after retries (emitted by the shell).
====  ========  ==========================================================================

Device-reported failures (decision)
-----------------------------------
Metadata whose ``error`` is non-zero is the device saying its capture failed (the seed
sends ``"error": 0``).  Its ``image_size``/``total_chunk_count`` may be 0; it is parsed
into a :class:`DeviceFailure`, the core answers :class:`RecordDeviceFailure` and
remembers the image (late chunks are dropped), and the shell writes an error row with
the device's own code (DEVICE_ERRORS), a ``captures`` row ``failed``, the sensor
reading, and then ACK_OK: the only answer seed firmware knows that lets it move on.

Images failing 2202/2203 (decision)
-----------------------------------
All their chunks arrived, so resending would produce the same bytes: a device that is
not ACKed would retry forever.  They are therefore finalized with ``valid=False``: the
shell stores the bytes exactly as received (nothing is lost), writes the ``captures``
row with ``ingest_status='quarantined'`` plus the 2202/2203 error row, and ACKs, so the
device deletes its copy.  A full Pillow decode is the evaluation flow's job, not this
gate's: the seed's own 4-byte ``FF D8 FF D9`` passes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------
# Limits.  Every value is a default; Limits(...) / Timing(...) override them from settings.
# ---------------------------------------------------------------------------------------

# An OV2640/OV5640 UXGA/QSXGA JPEG at the best quality is well under 2 MB, and the
# ESP32-S3 frame buffer lives in 8 MB PSRAM: 4 MiB is twice the biggest real frame.
MAX_IMAGE_BYTES = 4 * 1024 * 1024

# The firmware sends 1 KiB chunks (seed: "1KB base64-encoded chunks"); 4 KiB leaves room
# for firmware that raises the chunk size without letting one message hold an image.
MAX_CHUNK_BYTES = 4 * 1024

# 4 MiB in 1 KiB chunks.  Also bounds the per-assembly bookkeeping (a list slot and a bit
# per chunk) that is allocated when metadata is accepted.
MAX_CHUNKS = 4096

# A raw MQTT payload on the data topic: a 4 KiB chunk in base64 is ~5.5 KB plus the JSON
# envelope; anything beyond 16 KiB is refused unparsed (json.loads cost stays bounded).
MAX_MESSAGE_BYTES = 16 * 1024

# A device captures and sends one image at a time (pendingImg is a queue on the card);
# two more cover a resend overlapping a new capture.
MAX_ASSEMBLIES_PER_DEVICE = 3

# A fleet of ~1000 devices of which a fraction is mid-image at any moment.
MAX_ASSEMBLIES_TOTAL = 2000

# Upper bound on bytes held by assemblies (declared sizes are reserved when metadata is
# accepted, before any chunk is buffered): 256 MiB keeps the worker inside a small VM.
MAX_INFLIGHT_BYTES = 256 * 1024 * 1024

# Chunks that arrive before their metadata (QoS 1 does not order across retransmits):
# one image's worth of 1 KiB chunks per device, and a global cap.
MAX_EARLY_CHUNKS_PER_DEVICE = 64
MAX_EARLY_BYTES_TOTAL = 32 * 1024 * 1024

# Missing-chunk ids per NACK: the firmware parses the NACK into a fixed buffer; 256 ids
# is ~1.3 KB of JSON, and the next round asks for the rest.
MAX_NACK_IDS = 256

# Image names are echoed back in ACK/NACK and sanitized into a storage key.
MAX_IMAGE_NAME_LEN = 128

# Device ids are the MAC without colons ("AABBCCDDEEFF"); the seed's own test device is
# "TESTMAC123", so any 4-32 ASCII letters/digits are accepted; colons, slashes, dots,
# wildcards (+ #) and everything else are refused.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9]{4,32}$")

# Seed defaults (CAPTURE_TIMEOUT_MS, RETRANSMIT_DELAY_MS, RETRANSMIT_MAX).
CAPTURE_TIMEOUT_MS = 60_000
RETRANSMIT_DELAY_MS = 3_000
RETRANSMIT_MAX = 3

# Held bytes of one early chunk beyond its payload (bytes object header, dict slot, int
# key) and of one early image key (its dict, key tuple, timestamps): what the budget
# counts, so 50,000 one-byte chunks cost what they really cost (measured with
# sys.getsizeof/tracemalloc on CPython 3.12, rounded up).
EARLY_CHUNK_OVERHEAD = 160
EARLY_KEY_OVERHEAD = 700

# Device-reported capture failures: metadata "error" codes (docs/mqtt-ingest.md).
DEVICE_ERRORS = {
    1: "camera init failed",
    2: "capture failed",
    3: "sensor read failed",
    4: "memory allocation failed",
}
DEVICE_ERROR_UNKNOWN = "unknown device error"

# A capture timestamp outside these years is not a camera clock, it is noise (or an
# attack on timestamptz); it is dropped with a 2101 warning.
MIN_CAPTURE_YEAR = 2000
MAX_CAPTURE_YEAR = 2100

# Sensor values beyond this magnitude cannot be real readings; psycopg2 would send a
# huge int as numeric, which double precision refuses.
MAX_SENSOR_ABS = 1e12

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"

SEVERITY = {
    2101: "error",
    2102: "warn",
    2103: "error",
    2200: "error",
    2201: "error",
    2202: "warn",
    2203: "warn",
    2204: "error",
    2205: "error",
}
DESCRIPTION = {
    2101: "Failed to parse JSON from data topic",
    2102: "Chunk missing payload field",
    2103: "Base64 decode failed",
    2200: "Assembly finalization failed",
    2201: "Assembly timeout (missing chunks)",
    2202: "Declared size mismatch",
    2203: "Invalid JPEG signature",
    2204: "Storage upload failed",
    2205: "Capture DB update failed",
}


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    max_chunks: int = MAX_CHUNKS
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_assemblies_per_device: int = MAX_ASSEMBLIES_PER_DEVICE
    max_assemblies_total: int = MAX_ASSEMBLIES_TOTAL
    max_inflight_bytes: int = MAX_INFLIGHT_BYTES
    max_early_chunks_per_device: int = MAX_EARLY_CHUNKS_PER_DEVICE
    max_early_bytes_total: int = MAX_EARLY_BYTES_TOTAL
    max_nack_ids: int = MAX_NACK_IDS


@dataclass(frozen=True)
class Timing:
    capture_timeout: float = CAPTURE_TIMEOUT_MS / 1000
    retransmit_delay: float = RETRANSMIT_DELAY_MS / 1000
    retransmit_max: int = RETRANSMIT_MAX

    @classmethod
    def from_ms(cls, capture_timeout_ms: int, retransmit_delay_ms: int, retransmit_max: int):
        return cls(capture_timeout_ms / 1000, retransmit_delay_ms / 1000, retransmit_max)


# ---------------------------------------------------------------------------------------
# Parsed messages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusMessage:
    device_id: str
    status: str
    pending_count: int | None
    raw: dict[str, Any]
    normalized: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetadataMessage:
    device_id: str
    image_name: str
    image_size: int
    total_chunks: int
    chunk_size: int | None
    metadata: dict[str, Any]  # the validated seed fields (timestamp, location, sensors)
    normalized: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceFailure:
    """Metadata with a non-zero ``error``: the device reports a failed capture."""

    device_id: str
    image_name: str
    device_error: int
    metadata: dict[str, Any]
    normalized: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChunkMessage:
    device_id: str
    image_name: str
    chunk_id: int
    data: bytes


@dataclass(frozen=True)
class AckMessage:
    """Something published on ESP32CAM/{MAC}/ack (our own ACK/NACK echoed, or a device's)."""

    device_id: str
    raw: dict[str, Any] | None


Message = StatusMessage | MetadataMessage | ChunkMessage | AckMessage | DeviceFailure


# ---------------------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendNack:
    device_id: str
    image_name: str
    missing_chunks: list[int]
    round: int

    @property
    def topic(self) -> str:
        return ack_topic(self.device_id)

    def payload(self) -> bytes:
        return encode_nack(self.image_name, self.missing_chunks)


@dataclass(frozen=True)
class SendAck:
    device_id: str
    image_name: str
    next_wake_time: str

    @property
    def topic(self) -> str:
        return ack_topic(self.device_id)

    def payload(self) -> bytes:
        return encode_ack(self.image_name, self.next_wake_time)


@dataclass(frozen=True)
class FinalizeImage:
    device_id: str
    image_name: str  # as sent by the device, echoed in the ACK
    safe_name: str  # sanitized, the only form that may reach a storage key
    data: bytes = field(repr=False)
    sha256: str
    total_chunks: int
    metadata: dict[str, Any]
    valid: bool = True  # False -> quarantined (2202/2203 recorded alongside)
    problems: tuple[int, ...] = ()


@dataclass(frozen=True)
class RecordError:
    code: int
    severity: str
    device_id: str | None
    image_name: str | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordStatus:
    device_id: str
    status: str
    pending_count: int | None


@dataclass(frozen=True)
class CaptureFailed:
    """The assembly was dropped (2200/2201): the shell marks the capture row failed."""

    device_id: str
    image_name: str
    safe_name: str
    code: int
    metadata: dict[str, Any]
    total_chunks: int


@dataclass(frozen=True)
class RecordDeviceFailure:
    """The shell records a device-reported failure (error row, failed capture, sensor
    reading) and then ACKs it."""

    device_id: str
    image_name: str
    device_error: int
    message: str
    metadata: dict[str, Any]


Action = (
    SendNack
    | SendAck
    | FinalizeImage
    | RecordError
    | RecordStatus
    | CaptureFailed
    | RecordDeviceFailure
)


def error(code: int, device_id, image_name, reason: str | None = None, **details) -> RecordError:
    if reason is not None:
        details = {"reason": reason, **details}
    return RecordError(code, SEVERITY[code], device_id, image_name, DESCRIPTION[code], details)


def normalized_warning(device_id: str, image_name: str | None, fields) -> RecordError:
    """2101 as a warning: the message was accepted with these fields normalized."""
    details = {"reason": "normalized", "fields": list(fields)[:32]}
    return RecordError(2101, "warn", device_id, image_name, DESCRIPTION[2101], details)


class ProtocolError(Exception):
    """Raised by the parser; carries the RecordError the shell writes."""

    def __init__(self, record: RecordError):
        super().__init__(f"{record.code} {record.message} {record.details}")
        self.record = record


# ---------------------------------------------------------------------------------------
# Encoding (worker -> device) and topics
# ---------------------------------------------------------------------------------------

TOPIC_PREFIX = "ESP32CAM"


def sensor_reading(metadata: dict) -> dict[str, Any]:
    """The `sensor_readings` columns of an image's metadata (one mapping for the fast
    path and the flow, so both store the same reading)."""
    return {
        "temperature_c": metadata.get("temperature"),
        "humidity_pct": metadata.get("humidity"),
        "pressure_hpa": metadata.get("pressure"),
        "gas_resistance_ohm": metadata.get("gas_resistance"),
        "location": metadata.get("location"),
    }


def ack_topic(device_id: str) -> str:
    return f"{TOPIC_PREFIX}/{device_id}/ack"


def encode_ack(image_name: str, next_wake_time: str) -> bytes:
    msg = {"image_name": image_name, "ACK_OK": {"next_wake_time": next_wake_time}}
    return json.dumps(msg, separators=(",", ":")).encode()


def encode_nack(image_name: str, missing: list[int]) -> bytes:
    msg = {"image_name": image_name, "missing_chunks": missing}
    return json.dumps(msg, separators=(",", ":")).encode()


def sanitize_image_name(name: str) -> str:
    """A storage-safe file name: no directories, no dot-files, [A-Za-z0-9._-] only."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    safe = re.sub(r"\.{2,}", ".", safe)[:MAX_IMAGE_NAME_LEN]
    return safe or "image"


# ---------------------------------------------------------------------------------------
# Parsing (bytes -> Message), no I/O
# ---------------------------------------------------------------------------------------


def split_topic(topic: str) -> tuple[str, str] | None:
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != TOPIC_PREFIX or parts[2] not in ("data", "status", "ack"):
        return None
    return parts[1], parts[2]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:  # a 400-digit int does not fit a float (OverflowError)
        return math.isfinite(float(v))
    except OverflowError:
        return False


_LONE_SURROGATES = re.compile("[\ud800-\udfff]")
# Deeper than any seed message; bounds the walk below (json.loads already refused
# documents deeper than the interpreter's recursion limit).
MAX_JSON_DEPTH = 32


def _clean_text(v: str) -> str | None:
    """Text PostgreSQL can hold (no NUL, no lone surrogate), or None if unchanged."""
    if "\x00" not in v and not _LONE_SURROGATES.search(v):
        return None
    return _LONE_SURROGATES.sub("\ufffd", v.replace("\x00", ""))


def normalize_json(obj: Any) -> tuple[Any, list[str]]:
    """Make a parsed JSON value storable in jsonb/text: NaN/Infinity -> None, NUL and
    lone surrogates removed from strings and keys, nesting beyond MAX_JSON_DEPTH cut.
    Returns the value and the paths changed (iterative: no recursion on hostile depth)."""
    changed: list[str] = []

    def fix(v, path, depth):
        if isinstance(v, float) and not math.isfinite(v):
            changed.append(path)
            return None, False
        if isinstance(v, str):
            c = _clean_text(v)
            if c is not None:
                changed.append(path)
                return c, False
            return v, False
        if isinstance(v, dict | list):
            if depth >= MAX_JSON_DEPTH:
                changed.append(path)
                return None, False
            return v, True
        return v, False

    root, descend = fix(obj, "$", 0)
    stack = [(root, "$", 0)] if descend else []
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict):
            for k in list(node):
                ck = _clean_text(k) if isinstance(k, str) else None
                sub = f"{path}.{(ck if ck is not None else k)[:40]}"
                val, more = fix(node[k], sub, depth + 1)
                if ck is not None:
                    changed.append(sub)
                    del node[k]
                    k = ck
                node[k] = val
                if more:
                    stack.append((val, sub, depth + 1))
        else:
            for i, item in enumerate(node):
                val, more = fix(item, f"{path}[{i}]", depth + 1)
                node[i] = val
                if more:
                    stack.append((val, f"{path}[{i}]", depth + 1))
    return root, changed


def _capture_time_ok(ts: str) -> bool:
    import datetime as _dt

    try:
        value = _dt.datetime.fromisoformat(ts)
    except ValueError:
        return True  # unparsable stays as the device sent it; no captured_at is derived
    return MIN_CAPTURE_YEAR <= value.year <= MAX_CAPTURE_YEAR


_SENSOR_FIELDS = ("temperature", "humidity", "pressure", "gas_resistance")


def parse_message(topic: str, payload: bytes, limits: Limits = Limits()) -> Message:
    """Validate one MQTT message; raises ProtocolError(RecordError) on bad input."""
    st = split_topic(topic)
    if st is None:
        raise ProtocolError(error(2101, None, None, "unknown_topic", topic=topic[:200]))
    topic_device, kind = st
    if not DEVICE_ID_RE.match(topic_device):
        raise ProtocolError(error(2101, None, None, "device_id_format", topic=topic[:200]))
    if len(payload) > limits.max_message_bytes:
        raise ProtocolError(error(2101, topic_device, None, "message_too_large", size=len(payload)))
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: a small message nested thousands of levels deep.
        if kind == "ack":
            return AckMessage(topic_device, None)
        raise ProtocolError(
            error(2101, topic_device, None, "invalid_json", error=str(exc)[:200])
        ) from None
    if kind == "ack":
        return AckMessage(topic_device, obj if isinstance(obj, dict) else None)
    obj, normalized = _checked_object(obj, topic_device)
    dev = obj["device_id"]
    if kind == "status":
        return _parse_status(obj, dev, normalized)
    name = obj.get("image_name")
    if not isinstance(name, str) or not name or len(name) > MAX_IMAGE_NAME_LEN:
        raise ProtocolError(error(2101, dev, None, "schema", field="image_name"))
    if not name.isprintable():
        raise ProtocolError(error(2101, dev, None, "schema", field="image_name"))
    if "chunk_id" in obj:
        return _parse_chunk(obj, dev, name, limits)
    return _parse_metadata(obj, dev, name, limits, normalized)


def _checked_object(obj: Any, topic_device: str) -> tuple[dict, tuple[str, ...]]:
    """The message as a dict whose device_id is the topic's, with the values PostgreSQL
    refuses normalized (here, at the edge, so that no row built from this message can
    poison a batched write later; the 2101 warning names them)."""
    if not isinstance(obj, dict):
        raise ProtocolError(error(2101, topic_device, None, "not_an_object"))
    for f in ("device_id", "image_name"):  # echoed in topics and ACKs: refused, not cleaned
        v = obj.get(f)
        if isinstance(v, str) and _clean_text(v) is not None:
            raise ProtocolError(error(2101, topic_device, None, "schema", field=f))
    obj, normalized = normalize_json(obj)
    dev = obj.get("device_id")
    if not isinstance(dev, str):
        raise ProtocolError(error(2101, topic_device, None, "schema", field="device_id"))
    if dev != topic_device:
        raise ProtocolError(
            error(2101, topic_device, None, "device_id_mismatch", payload_device_id=dev[:64])
        )
    return obj, tuple(normalized)


def _parse_status(obj: dict, dev: str, normalized: tuple[str, ...]) -> StatusMessage:
    status = obj.get("status")
    pending = obj.get("pendingImg")
    if not isinstance(status, str) or len(status) > 64:
        raise ProtocolError(error(2101, dev, None, "schema", field="status"))
    if pending is not None and (not _is_int(pending) or not 0 <= pending < 1_000_000):
        raise ProtocolError(error(2101, dev, None, "schema", field="pendingImg"))
    return StatusMessage(dev, status, pending, obj, normalized)


def _parse_chunk(obj: dict, dev: str, name: str, limits: Limits) -> ChunkMessage:
    cid = obj["chunk_id"]
    if not _is_int(cid):
        raise ProtocolError(error(2101, dev, name, "schema", field="chunk_id"))
    if not 0 <= cid < limits.max_chunks:
        raise ProtocolError(error(2101, dev, name, "chunk_id_out_of_range", chunk_id=cid))
    b64 = obj.get("payload")
    if b64 is None or b64 == "":
        raise ProtocolError(error(2102, dev, name, chunk_id=cid))
    if not isinstance(b64, str):
        raise ProtocolError(error(2103, dev, name, "not_a_string", chunk_id=cid))
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(error(2103, dev, name, chunk_id=cid, error=str(exc)[:200])) from None
    if not data:
        raise ProtocolError(error(2102, dev, name, chunk_id=cid))
    if len(data) > limits.max_chunk_bytes:
        raise ProtocolError(error(2101, dev, name, "chunk_too_large", chunk_id=cid, size=len(data)))
    return ChunkMessage(dev, name, cid, data)


def _parse_metadata(
    obj: dict, dev: str, name: str, limits: Limits, normalized: tuple[str, ...]
) -> MetadataMessage | DeviceFailure:
    """An image's declaration, or the device's report of a failed capture."""
    size = obj.get("image_size")
    total = obj.get("total_chunk_count")
    csize = obj.get("max_chunks_size")
    err = obj.get("error")
    if err is not None and not (_is_int(err) and -(2**31) <= err < 2**31):
        raise ProtocolError(error(2101, dev, name, "schema", field="error"))
    if err:  # the device reports a failed capture: no image follows
        meta, more = _metadata_fields(obj, dev, name)
        meta["error"] = err
        for f, v in (("image_size", size), ("total_chunk_count", total)):
            if _is_int(v) and 0 <= v <= 1 << 31:
                meta[f] = v
        return DeviceFailure(dev, name, err, meta, normalized + more)
    _check_declaration(size, total, csize, dev, name, limits)
    meta, more = _metadata_fields(obj, dev, name)
    if err is not None:
        meta["error"] = err
    meta["image_size"] = size
    meta["total_chunk_count"] = total
    if csize is not None:
        meta["max_chunks_size"] = csize
    return MetadataMessage(dev, name, size, total, csize, meta, normalized + more)


def _check_declaration(
    size: Any, total: Any, csize: Any, dev: str, name: str, limits: Limits
) -> None:
    """An image's declared size and chunk count: integers, within limits, consistent."""
    if not _is_int(size) or not _is_int(total):
        raise ProtocolError(error(2101, dev, name, "schema", field="image_size/total_chunk_count"))
    if csize is not None and not _is_int(csize):
        raise ProtocolError(error(2101, dev, name, "schema", field="max_chunks_size"))
    if size <= 0 or size > limits.max_image_bytes:
        raise ProtocolError(
            error(2101, dev, name, "image_too_large", image_size=size, limit=limits.max_image_bytes)
        )
    if total <= 0 or total > limits.max_chunks:
        raise ProtocolError(
            error(
                2101, dev, name, "too_many_chunks", total_chunk_count=total, limit=limits.max_chunks
            )
        )
    if total > size or size > total * limits.max_chunk_bytes:
        raise ProtocolError(
            error(
                2101,
                dev,
                name,
                "inconsistent_declaration",
                image_size=size,
                total_chunk_count=total,
            )
        )


def _metadata_fields(obj: dict, dev: str, name: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The seed's optional metadata fields, validated; plus the ones normalized away."""
    meta: dict[str, Any] = {}
    more: list[str] = []
    ts = obj.get("capture_timeStamp")
    if ts is not None:
        if not isinstance(ts, str) or len(ts) > 64:
            raise ProtocolError(error(2101, dev, name, "schema", field="capture_timeStamp"))
        if _capture_time_ok(ts):
            meta["capture_timeStamp"] = ts
        else:
            more.append("capture_timeStamp")
    loc = obj.get("location")
    if loc is not None:
        if not isinstance(loc, str) or len(loc) > 128:
            raise ProtocolError(error(2101, dev, name, "schema", field="location"))
        meta["location"] = loc
    for f in _SENSOR_FIELDS:
        v = obj.get(f)
        if v is None:
            continue
        if not _is_num(v):
            raise ProtocolError(error(2101, dev, name, "schema", field=f))
        if abs(v) > MAX_SENSOR_ABS:
            more.append(f)
            continue
        meta[f] = v
    return meta, tuple(more)


# ---------------------------------------------------------------------------------------
# The assembler
# ---------------------------------------------------------------------------------------


def _early_held(buf: dict[int, bytes]) -> int:
    return EARLY_KEY_OVERHEAD + sum(len(d) + EARLY_CHUNK_OVERHEAD for d in buf.values())


class _Assembly:
    __slots__ = (
        "device_id",
        "image_name",
        "safe_name",
        "image_size",
        "total",
        "chunks",
        "missing",
        "received_bytes",
        "reserved",
        "metadata",
        "last_progress",
        "last_nack",
        "nack_rounds",
    )

    def __init__(self, msg: MetadataMessage, now: float):
        self.device_id = msg.device_id
        self.image_name = msg.image_name
        self.safe_name = sanitize_image_name(msg.image_name)
        self.image_size = msg.image_size
        self.total = msg.total_chunks
        self.chunks: list[bytes | None] = [None] * msg.total_chunks
        self.missing = msg.total_chunks  # count of None slots (the "bitset" population)
        self.received_bytes = 0
        self.reserved = msg.image_size
        self.metadata = msg.metadata
        self.last_progress = now
        self.last_nack = now
        self.nack_rounds = 0

    def missing_ids(self, limit: int) -> list[int]:
        out = []
        for i, c in enumerate(self.chunks):
            if c is None:
                out.append(i)
                if len(out) >= limit:
                    break
        return out


class Assembler:
    """Chunk assembly for a whole fleet.  Feed messages from :func:`parse_message` with
    :meth:`receive` (a ProtocolError's record is the caller's to apply) and call
    :meth:`tick` at :meth:`next_deadline`; both return a list of actions.  ``now`` is
    monotonic seconds.
    """

    def __init__(self, limits: Limits = Limits(), timing: Timing = Timing()):
        self.limits = limits
        self.timing = timing
        self._asm: dict[tuple[str, str], _Assembly] = {}
        self._per_device: dict[str, int] = {}
        self._reserved_total = 0
        # (device, name) -> {chunk_id: bytes}, plus arrival time of the first early chunk
        self._early: dict[tuple[str, str], dict[int, bytes]] = {}
        self._early_since: dict[tuple[str, str], float] = {}
        self._early_per_device: dict[str, int] = {}
        self._early_bytes = 0  # payload bytes
        # what early chunks really hold (payload + per-chunk and per-image overhead):
        # the figure max_early_bytes_total bounds
        self._early_held = 0
        # recently finalized/failed (device, name) -> time; late QoS-1 duplicates of a
        # finished image are dropped instead of starting a new assembly
        self._recent: OrderedDict[tuple[str, str], float] = OrderedDict()
        # images whose early chunk was refused (reported once; bounded)
        self._early_refused: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.stats = {
            "chunks": 0,
            "duplicates": 0,
            "early_dropped": 0,
            "restarted": 0,
            "nacks": 0,
            "finalized": 0,
            "errors": 0,
        }

    # -- introspection (tests, metrics) ----------------------------------------------
    @property
    def buffered_bytes(self) -> int:
        return sum(a.received_bytes for a in self._asm.values()) + self._early_bytes

    @property
    def reserved_bytes(self) -> int:
        return self._reserved_total

    @property
    def early_bytes(self) -> int:
        return self._early_bytes

    @property
    def early_held_bytes(self) -> int:
        return self._early_held

    def active(self) -> int:
        return len(self._asm)

    def is_idle(self) -> bool:
        return not self._asm and not self._early

    def in_assembly(self, device_id: str, image_name: str) -> bool:
        """An image of this device whose metadata was seen and that is not finished."""
        return (device_id, image_name) in self._asm

    def devices_in_assembly(self) -> set[str]:
        """Devices with an image in assembly or chunks held before their metadata (a
        set() of a dict is one C-level copy: safe to call from another thread, which may
        see RuntimeError if the dict changed size meanwhile)."""
        return {d for d, _ in set(self._asm)} | {d for d, _ in set(self._early)}

    def forget(self, devices: Callable[[str], bool]) -> int:
        """Drop, with no action, every image in assembly (and chunks held early) of the
        devices for which `devices(device_id)` is true: another replica now serves
        them, from the device's resend. Returns how many images were dropped."""
        dropped = 0
        for key in [k for k in self._asm if devices(k[0])]:
            self._drop(key)
            dropped += 1
        for key in [k for k in self._early if devices(k[0])]:
            self._forget_early(key, self._early.pop(key))
            dropped += 1
        return dropped

    # -- input -------------------------------------------------------------------------
    def receive(self, msg: Message, now: float) -> list[Action]:
        if isinstance(msg, ChunkMessage):
            return self._on_chunk(msg, now)
        out: list[Action] = []
        if getattr(msg, "normalized", ()):
            self.stats["errors"] += 1
            out.append(
                normalized_warning(msg.device_id, getattr(msg, "image_name", None), msg.normalized)
            )
        if isinstance(msg, MetadataMessage):
            return out + self._on_metadata(msg, now)
        if isinstance(msg, StatusMessage):
            return out + [RecordStatus(msg.device_id, msg.status, msg.pending_count)]
        if isinstance(msg, DeviceFailure):
            return out + self._on_device_failure(msg, now)
        return out

    def _on_device_failure(self, msg: DeviceFailure, now: float) -> list[Action]:
        key = (msg.device_id, msg.image_name)
        if self._recently_done(key, now):  # QoS 1 redelivery of the same report
            self.stats["duplicates"] += 1
            return []
        if key in self._asm:  # the device gave up on an image it had started
            self._drop(key)
        early = self._early.pop(key, None)
        if early is not None:
            self._forget_early(key, early)
        self._remember(key, now)
        text = DEVICE_ERRORS.get(msg.device_error, DEVICE_ERROR_UNKNOWN)
        return [
            RecordDeviceFailure(msg.device_id, msg.image_name, msg.device_error, text, msg.metadata)
        ]

    def _forget_early(self, key, buf: dict[int, bytes]) -> None:
        """Release the accounting of an early-chunk buffer already popped from _early."""
        self._early_since.pop(key, None)
        self._early_bytes -= sum(len(d) for d in buf.values())
        self._early_held -= _early_held(buf)
        n = self._early_per_device[key[0]] - len(buf)
        if n:
            self._early_per_device[key[0]] = n
        else:
            del self._early_per_device[key[0]]

    def _recently_done(self, key, now) -> bool:
        t = self._recent.get(key)
        return t is not None and now - t < self.timing.retransmit_delay

    def _on_metadata(self, msg: MetadataMessage, now: float) -> list[Action]:
        key = (msg.device_id, msg.image_name)
        a = self._asm.get(key)
        if a is not None:
            if a.image_size == msg.image_size and a.total == msg.total_chunks:
                a.metadata = msg.metadata  # duplicate or updated metadata, same image
                return []
            # a different declaration: the device started this image over
            self.stats["restarted"] += 1
            self._drop(key)
        elif self._recently_done(key, now):
            self.stats["duplicates"] += 1
            return []
        self._recent.pop(key, None)
        self._early_refused.pop(key, None)
        lim = self.limits
        if (
            self._per_device.get(msg.device_id, 0) >= lim.max_assemblies_per_device
            or len(self._asm) >= lim.max_assemblies_total
            or self._reserved_total + msg.image_size > lim.max_inflight_bytes
        ):
            self.stats["errors"] += 1
            return [
                error(
                    2200,
                    msg.device_id,
                    msg.image_name,
                    "capacity",
                    active_for_device=self._per_device.get(msg.device_id, 0),
                    active_total=len(self._asm),
                    reserved_bytes=self._reserved_total,
                )
            ]
        a = _Assembly(msg, now)
        self._asm[key] = a
        self._per_device[msg.device_id] = self._per_device.get(msg.device_id, 0) + 1
        self._reserved_total += a.reserved
        out: list[Action] = []
        early = self._early.pop(key, None)
        if early is not None:
            self._forget_early(key, early)
            for cid, data in sorted(early.items()):
                if key not in self._asm:
                    break
                out += self._add_chunk(a, cid, data, now)
        return out

    def _on_chunk(self, msg: ChunkMessage, now: float) -> list[Action]:
        self.stats["chunks"] += 1
        key = (msg.device_id, msg.image_name)
        a = self._asm.get(key)
        if a is not None:
            return self._add_chunk(a, msg.chunk_id, msg.data, now)
        if self._recently_done(key, now):
            self.stats["duplicates"] += 1
            return []
        # chunk before its metadata: buffer a bounded number
        lim = self.limits
        buf = self._early.get(key)
        if buf is not None and msg.chunk_id in buf:
            if buf[msg.chunk_id] != msg.data:
                # keep the first; the metadata-time conflict check cannot see the second,
                # so it is reported here
                self.stats["errors"] += 1
                return [
                    error(
                        2200,
                        msg.device_id,
                        msg.image_name,
                        "conflicting_chunk",
                        chunk_id=msg.chunk_id,
                    )
                ]
            self.stats["duplicates"] += 1
            return []
        if (
            self._early_per_device.get(msg.device_id, 0) >= lim.max_early_chunks_per_device
            or self._early_held
            + len(msg.data)
            + EARLY_CHUNK_OVERHEAD
            + (EARLY_KEY_OVERHEAD if buf is None else 0)
            > lim.max_early_bytes_total
        ):
            # recovered by NACK if the metadata arrives; reported once per image so an
            # image whose metadata never comes still ends in a coded error
            self.stats["early_dropped"] += 1
            if key in self._early_refused:
                return []
            self._early_refused[key] = now
            while len(self._early_refused) > self.limits.max_assemblies_total:
                self._early_refused.popitem(last=False)
            self.stats["errors"] += 1
            return [
                error(
                    2200, msg.device_id, msg.image_name, "early_buffer_full", chunk_id=msg.chunk_id
                )
            ]
        if buf is None:
            buf = self._early[key] = {}
            self._early_since[key] = now
        buf[msg.chunk_id] = msg.data
        self._early_per_device[msg.device_id] = self._early_per_device.get(msg.device_id, 0) + 1
        self._early_bytes += len(msg.data)
        self._early_held += (
            len(msg.data) + EARLY_CHUNK_OVERHEAD + (EARLY_KEY_OVERHEAD if len(buf) == 1 else 0)
        )
        return []

    def _add_chunk(self, a: _Assembly, cid: int, data: bytes, now: float) -> list[Action]:
        key = (a.device_id, a.image_name)
        if cid >= a.total:
            self.stats["errors"] += 1
            return [
                error(
                    2101,
                    a.device_id,
                    a.image_name,
                    "chunk_id_out_of_range",
                    chunk_id=cid,
                    total_chunk_count=a.total,
                )
            ]
        prev = a.chunks[cid]
        if prev is not None:
            if prev == data:
                self.stats["duplicates"] += 1
                return []
            return self._fail(key, 2200, "conflicting_chunk", now, chunk_id=cid)
        new_bytes = a.received_bytes + len(data)
        if new_bytes > a.reserved:
            grow = new_bytes - a.reserved
            if (
                new_bytes > self.limits.max_image_bytes
                or self._reserved_total + grow > self.limits.max_inflight_bytes
            ):
                return self._fail(
                    key,
                    2200,
                    "too_many_bytes",
                    now,
                    received_bytes=new_bytes,
                    image_size=a.image_size,
                )
            a.reserved += grow
            self._reserved_total += grow
        a.chunks[cid] = data
        a.missing -= 1
        a.received_bytes = new_bytes
        a.last_progress = now
        if a.missing == 0:
            return self._finalize(key, now)
        return []

    def _finalize(self, key, now) -> list[Action]:
        a = self._asm[key]
        data = b"".join(a.chunks)  # type: ignore[arg-type]
        self._drop(key)
        self._remember(key, now)
        out: list[Action] = []
        problems = []
        if len(data) != a.image_size:
            problems.append(2202)
            out.append(
                error(
                    2202,
                    a.device_id,
                    a.image_name,
                    "size_mismatch",
                    declared=a.image_size,
                    received=len(data),
                )
            )
        if not (data.startswith(JPEG_SOI) and data.endswith(JPEG_EOI) and len(data) >= 4):
            problems.append(2203)
            out.append(
                error(
                    2203,
                    a.device_id,
                    a.image_name,
                    "jpeg_signature",
                    head=data[:2].hex(),
                    tail=data[-2:].hex(),
                )
            )
        self.stats["finalized"] += 1
        self.stats["errors"] += len(problems)
        out.insert(
            0,
            FinalizeImage(
                device_id=a.device_id,
                image_name=a.image_name,
                safe_name=a.safe_name,
                data=data,
                sha256=hashlib.sha256(data).hexdigest(),
                total_chunks=a.total,
                metadata=a.metadata,
                valid=not problems,
                problems=tuple(problems),
            ),
        )
        return out

    def _fail(self, key, code: int, reason: str, now: float, **details) -> list[Action]:
        a = self._asm[key]
        self._drop(key)
        self._remember(key, now)
        self.stats["errors"] += 1
        return [
            error(code, a.device_id, a.image_name, reason, **details),
            CaptureFailed(a.device_id, a.image_name, a.safe_name, code, a.metadata, a.total),
        ]

    def _drop(self, key) -> None:
        a = self._asm.pop(key)
        self._reserved_total -= a.reserved
        n = self._per_device[a.device_id] - 1
        if n:
            self._per_device[a.device_id] = n
        else:
            del self._per_device[a.device_id]

    def _remember(self, key, now) -> None:
        self._recent[key] = now
        self._recent.move_to_end(key)
        # bounded: a finished key is only useful for one retransmit delay
        while len(self._recent) > self.limits.max_assemblies_total * 4:
            self._recent.popitem(last=False)

    # -- time --------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        t = self.timing
        deadlines = []
        for a in self._asm.values():
            if a.nack_rounds < t.retransmit_max:
                deadlines.append(max(a.last_progress, a.last_nack) + t.retransmit_delay)
            deadlines.append(a.last_progress + t.capture_timeout)
        for since in self._early_since.values():
            deadlines.append(since + t.capture_timeout)
        return min(deadlines) if deadlines else None

    def tick(self, now: float) -> list[Action]:
        t = self.timing
        out: list[Action] = []
        for key, a in list(self._asm.items()):
            # compare against the very expressions next_deadline() returns, so that
            # tick(next_deadline()) always acts (no float drift, no busy loop)
            if now >= a.last_progress + t.capture_timeout:
                missing = a.missing_ids(self.limits.max_nack_ids)
                out += self._fail(
                    key,
                    2201,
                    "timeout",
                    now,
                    missing_chunks=missing,
                    received=a.total - a.missing,
                    total=a.total,
                    nack_rounds=a.nack_rounds,
                )
            elif (
                a.nack_rounds < t.retransmit_max
                and now >= max(a.last_progress, a.last_nack) + t.retransmit_delay
            ):
                a.nack_rounds += 1
                a.last_nack = now
                self.stats["nacks"] += 1
                out.append(
                    SendNack(
                        a.device_id,
                        a.image_name,
                        a.missing_ids(self.limits.max_nack_ids),
                        a.nack_rounds,
                    )
                )
        for key, since in list(self._early_since.items()):
            if now >= since + t.capture_timeout:
                buf = self._early.pop(key)
                self._forget_early(key, buf)
                self.stats["errors"] += 1
                out.append(
                    error(
                        2201,
                        key[0],
                        key[1],
                        "metadata_never_arrived",
                        chunks_received=sorted(buf)[:64],
                    )
                )
        while self._recent:
            k, ts = next(iter(self._recent.items()))
            if now - ts < t.retransmit_delay:
                break
            self._recent.popitem(last=False)
        return out
