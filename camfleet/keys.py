"""Object keys and names built by camfleet, never taken raw from a device.

A device controls file names, image names and ids; every one of them passes through
`sanitize_name` or `safe_id` before it reaches a storage key, a remote path or a log.
"""

from __future__ import annotations

import re
import unicodedata

# Long enough for any camera's file name (timestamps, counters, extensions), short
# enough that a key built from several parts stays far below S3's 1,024-byte limit.
MAX_NAME_LEN = 128
MAX_ID_LEN = 64

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


class BadName(ValueError):
    """A device-supplied name or id that cannot be made safe."""


def sanitize_name(name: object) -> str:
    """A single safe path component: letters, digits, '.', '_' and '-'.

    Path components, NULs and control characters are refused rather than silently
    flattened, because a name like '../x.jpg' is an attack, not a file name.
    """
    if not isinstance(name, str) or not name:
        raise BadName("name must be a non-empty string")
    if len(name) > MAX_NAME_LEN:
        raise BadName(f"name longer than {MAX_NAME_LEN} characters")
    if "/" in name or "\\" in name or "\x00" in name:
        raise BadName("name must not contain path separators or NUL")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise BadName("name must not contain control characters")
    if name in {".", ".."} or name.startswith("."):
        raise BadName("name must not start with '.'")
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    cleaned = _UNSAFE_CHARS.sub("_", ascii_name).strip("_")
    if not cleaned or cleaned.strip(".") == "":
        raise BadName("name has no usable characters")
    if cleaned.startswith("."):  # cleaning can expose a dot: ":.0" -> ".0"
        raise BadName("name must not start with '.'")
    return cleaned


def safe_id(value: object, what: str = "device id") -> str:
    """A device or event id usable as a key component, or BadName."""
    if not isinstance(value, str) or not value:
        raise BadName(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LEN or not _ID.match(value):
        raise BadName(f"{what} must be 1-{MAX_ID_LEN} of A-Z a-z 0-9 _ . : - ")
    return value


def object_key(*parts: str) -> str:
    """Join already-safe parts into a key; refuses anything that could escape."""
    out = []
    for part in parts:
        for piece in str(part).split("/"):
            if piece in {"", ".", ".."} or "\x00" in piece or "\\" in piece:
                raise BadName(f"unsafe key component {piece!r}")
            out.append(piece)
    if not out:
        raise BadName("empty key")
    return "/".join(out)


def key_within(key: str, prefix: str) -> bool:
    """True when `key` is a well-formed key strictly inside `prefix`."""
    try:
        normal = object_key(key)
    except BadName:
        return False
    prefix = prefix.rstrip("/") + "/"
    return normal == key and key.startswith(prefix) and len(key) > len(prefix)
