"""Image checks and scores with Pillow: pure functions of the image bytes (no I/O).

`inspect_image` is the upload gate (is this an image we accept, how big); `score_image`
is the evaluation: decodes, dimensions, mean brightness, contrast, sharpness and the
verdicts a fleet operator acts on (blank frame, covered lens, blur, exposure).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageStat, UnidentifiedImageError

# Formats a camera uploads; anything else is refused at the API (415).
ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# 50 megapixels is above any camera in the fleet (12 MP phones, 5 MP ESP32 sensors max
# at 2 MP); a header declaring more is a decompression bomb, refused before decoding.
MAX_PIXELS = 50_000_000
# Scores are computed on a copy at most this wide/high: statistics of a 512 px image
# describe exposure and focus as well as the full frame at a fraction of the CPU.
SCORE_MAX_SIDE = 512
# Standard deviation of grey levels under which a frame carries no picture: a lens cap,
# a blank sensor read-out or a uniformly lit wall (real scenes are above ~15).
BLANK_STDDEV = 6.0
# Mean grey level under which a blank frame reads as a covered lens rather than a
# blank (uniform, but bright) one.
COVERED_MEAN = 35.0
# Exposure bounds on mean grey level (0-255): outside them the image is under/over-exposed.
DARK_MEAN = 40.0
BRIGHT_MEAN = 220.0
# Variance of the edge image (FIND_EDGES on the 512 px grey copy, border cropped) under
# which the image is blurred: focused scenes measure in the hundreds to thousands, a
# defocus blur of Gaussian radius 2 px ~50, 4 px ~10 (tests/test_evaluation.py).
BLUR_EDGE_VARIANCE = 40.0


class NotAnImage(ValueError):
    """Bytes that are not an accepted image; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    width: int
    height: int


def inspect_image(data: bytes) -> ImageInfo:
    """Format and size from the header, plus Pillow's integrity check; NotAnImage."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            width, height = img.size
            if fmt not in ALLOWED_FORMATS:
                raise NotAnImage(f"image format {fmt or 'unknown'} not accepted (JPEG, PNG, WebP)")
            if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
                raise NotAnImage(f"image dimensions {width}x{height} outside 1..{MAX_PIXELS} px")
            img.verify()
    except NotAnImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise NotAnImage(f"not a readable image ({type(exc).__name__})") from None
    except Image.DecompressionBombError:
        raise NotAnImage("image too large to decode safely") from None
    return ImageInfo(fmt, ALLOWED_FORMATS[fmt], width, height)


def score_image(data: bytes) -> dict:
    """The evaluation result stored in `captures.evaluation_result` (JSON-ready)."""
    try:
        info = inspect_image(data)
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L", (SCORE_MAX_SIDE, SCORE_MAX_SIDE))  # JPEG: decode scaled down
            grey = img.convert("L")
    except NotAnImage as exc:
        return {"decodes": False, "verdict": "undecodable", "reason": str(exc)}
    except (OSError, ValueError, SyntaxError) as exc:
        return {"decodes": False, "verdict": "undecodable", "reason": type(exc).__name__}
    grey.thumbnail((SCORE_MAX_SIDE, SCORE_MAX_SIDE))
    stat = ImageStat.Stat(grey)
    brightness, contrast = stat.mean[0], stat.stddev[0]
    edges = grey.filter(ImageFilter.FIND_EDGES)
    if edges.width > 2 and edges.height > 2:  # Pillow leaves the 1 px border unfiltered
        edges = edges.crop((1, 1, edges.width - 1, edges.height - 1))
    sharpness = ImageStat.Stat(edges).var[0]
    blank = contrast < BLANK_STDDEV
    covered = blank and brightness < COVERED_MEAN
    exposure = "dark" if brightness < DARK_MEAN else "bright" if brightness > BRIGHT_MEAN else "ok"
    blurry = not blank and sharpness < BLUR_EDGE_VARIANCE
    if covered:
        verdict = "covered"
    elif blank:
        verdict = "blank"
    elif blurry:
        verdict = "blurry"
    elif exposure != "ok":
        verdict = exposure
    else:
        verdict = "ok"
    return {
        "decodes": True,
        "format": info.format,
        "width": info.width,
        "height": info.height,
        "brightness": round(brightness, 2),
        "contrast": round(contrast, 2),
        "sharpness": round(sharpness, 2),
        "exposure": exposure,
        "blank": blank,
        "covered": covered,
        "blurry": blurry,
        "verdict": verdict,
    }
