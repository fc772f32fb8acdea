"""Thumbnails: made once with Pillow, stored beside the object as `<key>.thumb.jpg`.

List pages only ever load thumbnails (a few kB each), never the full image. The first
request for a capture's thumbnail makes and stores it; every later one reads it back.
Two requests racing on a new thumbnail both make it and the last write wins, which is
harmless (same bytes) and cheaper than a lock.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from camfleet import metrics

THUMB_SUFFIX = ".thumb.jpg"
THUMB_SIZE = (320, 240)
THUMB_QUALITY = 75
# A capture larger than this many pixels is refused rather than decoded: cameras in the
# fleet top out far below (a 64 MP still is 64e6); a "capture" above is a decompression
# bomb or a mistake, and would pin a core and hundreds of MB of memory.
MAX_SOURCE_PIXELS = 80_000_000


class NoThumbnail(Exception):
    """The source is missing or is not a picture Pillow can read."""


def thumbnail_key(key: str) -> str:
    return key + THUMB_SUFFIX


def make_thumbnail(data: bytes) -> bytes:
    """JPEG bytes of `data` scaled to fit THUMB_SIZE, upright (EXIF), RGB."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_SOURCE_PIXELS:
                raise NoThumbnail("image too large to thumbnail")
            img.draft("RGB", THUMB_SIZE)  # JPEG: decode at 1/2..1/8 scale, much faster
            img = ImageOps.exif_transpose(img)
            img.thumbnail(THUMB_SIZE)
            out = io.BytesIO()
            img.convert("RGB").save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise NoThumbnail(f"not a readable image ({type(exc).__name__})") from None


def ensure_thumbnail(store, key: str) -> bytes:
    """The stored thumbnail of `key`, made and stored first when missing (blocking)."""
    thumb = thumbnail_key(key)
    try:
        if store.head(thumb) is not None:
            metrics.CONSOLE_THUMBNAILS.labels("cached").inc()
            return store.get(thumb)
        if store.head(key) is None:
            raise NoThumbnail("capture object is missing")
        data = make_thumbnail(store.get(key))
    except NoThumbnail:
        metrics.CONSOLE_THUMBNAILS.labels("failed").inc()
        raise
    store.put(thumb, data, content_type="image/jpeg")
    metrics.CONSOLE_THUMBNAILS.labels("made").inc()
    return data
