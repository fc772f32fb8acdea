"""Real, decodable JPEGs for simulated devices (demo): a scene with the device's name,
the capture time and a frame number drawn on it, so a picture in storage or the UI
says where and when it came from, and evaluation has texture to score."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime

from PIL import Image, ImageDraw

SIZE = (320, 240)


def picture(device: str, index: int, when: datetime | None = None) -> bytes:
    when = when or datetime.now(UTC)
    rnd = random.Random(f"{device}/{index}")
    width, height = SIZE
    sky = (60 + rnd.randrange(60), 100 + rnd.randrange(60), 140 + rnd.randrange(80))
    image = Image.new("RGB", SIZE, sky)
    draw = ImageDraw.Draw(image)
    # a skyline of boxes and a sun whose place changes with the frame number
    for x in range(0, width, 24):
        top = height // 2 + rnd.randrange(-40, 40)
        shade = 40 + rnd.randrange(120)
        draw.rectangle([x, top, x + 20, height], fill=(shade, 130, 70))
    sun_x = 20 + (index * 37) % (width - 60)
    draw.ellipse([sun_x, 16, sun_x + 40, 56], fill=(250, 220, 90))
    draw.rectangle([0, height - 34, width, height], fill=(0, 0, 0))
    draw.text((6, height - 31), device, fill=(255, 255, 255))
    draw.text((6, height - 17), f"{when:%Y-%m-%d %H:%M:%S} UTC  #{index}", fill=(255, 255, 0))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def unique_name(index: int, when: datetime | None = None) -> str:
    """A file name no earlier capture of the device used (devices number from boot)."""
    when = when or datetime.now(UTC)
    return f"img_{when:%Y%m%dT%H%M%S}_{when.microsecond // 1000:03d}_{index}.jpg"
