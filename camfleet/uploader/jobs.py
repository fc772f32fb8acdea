"""What an event package in `pending_upload/` is, decided without any I/O.

An event package is `[event_id].json` (the trigger) plus `[event_id].mp4`, written by
the analyzer (seed 001, Module B). This module turns what the scanner saw (names,
sizes, mtimes, the JSON bytes) and the current time into one decision per package:

- `Job`: ready to upload, with its metadata and the remote paths it will get;
- `Wait`: not yet (a file is still being written, or the video has not appeared yet);
  nothing is touched and the next scan looks again;
- `Reject`: can never succeed (bad JSON, unsafe name, empty video, ...); the package is
  moved aside with the reason next to it rather than retried forever or deleted.

Everything a device wrote is untrusted: names, sizes and JSON are checked here before
anything reaches a remote path, a SQL parameter or a log line.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

from camfleet.keys import MAX_ID_LEN, BadName, safe_id

JSON_SUFFIX = ".json"
VIDEO_SUFFIX = ".mp4"

# Event metadata is a few kilobytes (detections, timestamps, device info). A megabyte
# is far beyond any real event and keeps a hostile or corrupt file from costing more
# than that much memory: the scanner never reads past this limit.
MAX_JSON_BYTES = 1024 * 1024
# Real metadata nests a handful of levels; a deeper document is an attack on the JSON
# parser's recursion (and on jsonb), not an event.
MAX_JSON_DEPTH = 32
# A file modified within this many seconds may still be being written (the analyzer
# copies a video for seconds); it is left alone until it has settled.
DEFAULT_SETTLE_SECONDS = 5.0
# A JSON whose video has not appeared after an hour will not get one: the writer
# crashed or wrote it elsewhere. The package is moved aside instead of waiting forever.
DEFAULT_ORPHAN_SECONDS = 3600.0
# Keys the analyzer may use for the event id inside the JSON (seed 001 calls it eventId);
# without either, the file name is the event id.
EVENT_ID_KEYS = ("eventId", "event_id")


class BadInput(ValueError):
    """An event package that can never be uploaded as it is (moved aside, not retried)."""


@dataclass(frozen=True)
class FileInfo:
    """What lstat() said about a local file."""

    size: int
    mtime: float
    regular: bool = True  # False for symlinks, directories, devices, sockets


@dataclass
class Job:
    """A settled, valid event package, ready for the four phases."""

    event_id: str
    json_name: str
    video_name: str
    metadata: dict[str, Any]
    json_size: int
    video_size: int
    remote_video_path: str
    remote_json_path: str


@dataclass(frozen=True)
class Wait:
    """Not ready yet: leave the files alone and look again on the next scan."""

    json_name: str
    reason: str
    event_id: str | None = None


@dataclass(frozen=True)
class Reject:
    """Can never succeed: move the package aside with this reason next to it."""

    json_name: str
    reason: str
    event_id: str | None = None
    video_name: str | None = None


@dataclass(frozen=True)
class Reconcile:
    """A crash between moving the video and moving the JSON to `uploaded/`.

    The video is already archived, which happens only after the row was marked
    completed; the JSON only needs to follow it.
    """

    json_name: str
    event_id: str


@dataclass
class ScanResult:
    ready: list[Job] = field(default_factory=list)
    waiting: list[Wait] = field(default_factory=list)
    rejected: list[Reject] = field(default_factory=list)
    reconciled: list[Reconcile] = field(default_factory=list)


def is_candidate(name: str) -> bool:
    """A directory entry that announces a job: `*.json`, not hidden (temp files are)."""
    return name.endswith(JSON_SUFFIX) and not name.startswith(".")


def event_id_from_name(json_name: str) -> str:
    """The event id a `[event_id].json` file name carries, or BadInput."""
    if not is_candidate(json_name):
        raise BadInput(f"{json_name!r} is not an [event_id].json file name")
    stem = json_name[: -len(JSON_SUFFIX)]
    try:
        return safe_id(stem, "event id")
    except BadName as exc:
        raise BadInput(
            f"file name is not a usable event id ({exc}); event ids are 1-{MAX_ID_LEN} "
            "characters of A-Z a-z 0-9 _ . : - starting with a letter or digit"
        ) from None


def check_files(
    json_name: str,
    json_info: FileInfo,
    video_info: FileInfo | None,
    now: float,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    orphan_seconds: float = DEFAULT_ORPHAN_SECONDS,
) -> Wait | Reject | None:
    """Decide from names and lstat() results alone; None means "read the JSON next"."""
    try:
        event_id = event_id_from_name(json_name)
    except BadInput as exc:
        return Reject(json_name, str(exc))
    video_name = event_id + VIDEO_SUFFIX
    if not json_info.regular:
        return Reject(json_name, "JSON is not a regular file (symlinks are refused)", event_id)
    if now - json_info.mtime < settle_seconds:
        return Wait(json_name, f"JSON modified less than {settle_seconds:g}s ago", event_id)
    if video_info is None:
        if now - json_info.mtime >= orphan_seconds:
            return Reject(
                json_name, f"video {video_name} missing for over {orphan_seconds:g}s", event_id
            )
        return Wait(json_name, f"video {video_name} missing", event_id)
    if not video_info.regular:
        return Reject(
            json_name, "video is not a regular file (symlinks are refused)", event_id, video_name
        )
    if now - video_info.mtime < settle_seconds:
        return Wait(json_name, f"video modified less than {settle_seconds:g}s ago", event_id)
    if json_info.size == 0:
        return Reject(json_name, "JSON file is empty", event_id, video_name)
    if json_info.size > MAX_JSON_BYTES:
        return Reject(json_name, f"JSON larger than {MAX_JSON_BYTES} bytes", event_id, video_name)
    if video_info.size == 0:
        return Reject(json_name, "video file is empty", event_id, video_name)
    return None


def parse_metadata(event_id: str, raw: bytes) -> dict[str, Any]:
    """The JSON object of an event package, checked against its file name."""
    if len(raw) > MAX_JSON_BYTES:
        raise BadInput(f"JSON larger than {MAX_JSON_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("JSON is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadInput(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise BadInput(f"JSON does not parse: {exc.args[0] if exc.args else exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"JSON must be an object, not {type(data).__name__}")
    _check_json_value(data, depth=0)
    # Seed 001 identifies an event by its file name; the id inside the JSON is optional
    # (an analyzer that omits it is uploaded under the file name), but one that is
    # there must agree with the name, or the package is not what it claims to be.
    for value in (data[k] for k in EVENT_ID_KEYS if k in data):
        if value != event_id:
            raise BadInput(f"JSON event id does not match the file name {event_id + JSON_SUFFIX!r}")
    return data


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (jsonb refuses it)")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _check_json_value(value: Any, depth: int) -> None:
    """Refuse what PostgreSQL's jsonb cannot store (NUL) and absurd nesting."""
    if depth > MAX_JSON_DEPTH:
        raise BadInput(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise BadInput("JSON contains a NUL character (\\u0000), which jsonb cannot store")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json_value(k, depth + 1)
            _check_json_value(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json_value(v, depth + 1)


def remote_path(remote_dir: str, name: str) -> str:
    """`remote_dir/name`, refusing any name that would land outside `remote_dir`."""
    if not posixpath.isabs(remote_dir):
        raise BadInput(f"remote directory must be an absolute path: {remote_dir!r}")
    if not name or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
        raise BadInput(f"unsafe remote file name {name!r}")
    base = posixpath.normpath(remote_dir)
    path = posixpath.join(base, name)
    if posixpath.dirname(posixpath.normpath(path)) != base:
        raise BadInput(f"remote file name {name!r} escapes {remote_dir!r}")
    return path


def make_job(
    json_name: str,
    json_info: FileInfo,
    video_info: FileInfo,
    raw_json: bytes,
    remote_video_dir: str,
    remote_json_dir: str,
) -> Job:
    """A ready Job from settled files and their JSON bytes; BadInput otherwise."""
    event_id = event_id_from_name(json_name)
    metadata = parse_metadata(event_id, raw_json)
    video_name = event_id + VIDEO_SUFFIX
    return Job(
        event_id=event_id,
        json_name=json_name,
        video_name=video_name,
        metadata=metadata,
        json_size=len(raw_json),
        video_size=video_info.size,
        remote_video_path=remote_path(remote_video_dir, video_name),
        remote_json_path=remote_path(remote_json_dir, json_name),
    )
