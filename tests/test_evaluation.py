"""Capture evaluation: Pillow scores on real images, batches against PostgreSQL + storage."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image, ImageDraw, ImageFilter

from camfleet import db
from camfleet.storage import open_store
from flows.evaluation import evaluate_batch
from tasks.images import NotAnImage, inspect_image, score_image
from tests.test_api_commands_helpers import add_device, fetch


def _scene(size=(640, 480)) -> Image.Image:
    """A high-contrast synthetic scene: bars, circles and text-like strokes."""
    img = Image.new("RGB", size, (90, 110, 130))
    draw = ImageDraw.Draw(img)
    for x in range(0, size[0], 40):
        draw.rectangle([x, 0, x + 18, size[1] // 2], fill=(230, 220, 200))
    for i in range(12):
        draw.ellipse([30 + i * 50, 300, 70 + i * 50, 340], outline=(10, 10, 10), width=3)
    for y in range(360, 470, 12):
        draw.line([20, y, size[0] - 20, y + 5], fill=(20, 20, 20), width=2)
    return img


def _jpeg(img: Image.Image, fmt="JPEG") -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, quality=92) if fmt == "JPEG" else img.save(out, fmt)
    return out.getvalue()


def test_scores_a_sharp_well_exposed_scene_ok():
    result = score_image(_jpeg(_scene()))
    assert result["decodes"] and result["verdict"] == "ok"
    assert (result["width"], result["height"]) == (640, 480)
    assert 40 < result["brightness"] < 220 and result["sharpness"] > 60


@pytest.mark.parametrize(
    ("make", "verdict"),
    [
        (lambda: _scene().filter(ImageFilter.GaussianBlur(8)), "blurry"),
        (lambda: Image.new("RGB", (320, 240), (3, 3, 3)), "covered"),
        (lambda: Image.new("RGB", (320, 240), (200, 200, 200)), "blank"),
        (lambda: _scene().point(lambda v: v // 6), "dark"),
        (lambda: _scene().point(lambda v: min(255, 140 + v)), "bright"),
    ],
)
def test_flags_blur_covered_lens_blank_and_exposure(make, verdict):
    assert score_image(_jpeg(make()))["verdict"] == verdict


def test_undecodable_and_refused_inputs():
    assert score_image(b"\xff\xd8\xff\xd9")["verdict"] == "undecodable"
    truncated = _jpeg(_scene())[:2000]
    assert score_image(truncated)["decodes"] is False
    with pytest.raises(NotAnImage, match="not accepted"):
        inspect_image(_jpeg(_scene(), "GIF"))
    with pytest.raises(NotAnImage):
        inspect_image(b"GIF89a" + b"\x00" * 20)
    # a header declaring 100,000 x 100,000 pixels is refused before decoding
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    data = bytearray(bomb.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width/height (CRC now wrong)
    with pytest.raises(NotAnImage):
        inspect_image(bytes(data))
    assert inspect_image(_jpeg(_scene(), "PNG")).content_type == "image/png"


def test_evaluate_batch_scores_pending_captures_and_records_failures(database_url, tmp_path):
    store = open_store((tmp_path / "objects").as_uri())
    add_device(database_url, "EV1")
    images = {
        "good": _jpeg(_scene()),
        "covered": _jpeg(Image.new("RGB", (100, 100), (0, 0, 0))),
        "broken": b"\xff\xd8\xff\xd9",
    }
    with db.transaction(database_url) as conn:
        for name, data in images.items():
            key = f"captures/EV1/{name}.jpg"
            store.put(key, data, "image/jpeg")
            db.queries.triggers_insert_capture(
                conn,
                device_id="EV1",
                device_capture_id=name,
                captured_at=None,
                image_bytes=len(data),
                content_type="image/jpeg",
                storage_path=key,
                sha256="x",
                trigger_id=None,
                trigger_label=None,
                metadata={},
            )
        db.queries.triggers_insert_capture(
            conn,
            device_id="EV1",
            device_capture_id="gone",
            captured_at=None,
            image_bytes=1,
            content_type="image/jpeg",
            storage_path="captures/EV1/gone.jpg",
            sha256="x",
            trigger_id=None,
            trigger_label=None,
            metadata={},
        )
    counts = evaluate_batch(database_url, store, limit=2)
    assert counts["scored"] == 2
    counts = evaluate_batch(database_url, store, limit=10)
    assert counts["scored"] == 2
    assert evaluate_batch(database_url, store, limit=10)["scored"] == 0  # none left pending
    rows = dict(
        (name, (status, result))
        for name, status, result in fetch(
            database_url,
            "SELECT device_capture_id, evaluation_status, evaluation_result FROM captures",
        )
    )
    assert rows["good"][0] == "completed" and rows["good"][1]["verdict"] == "ok"
    assert rows["covered"][0] == "completed" and rows["covered"][1]["covered"] is True
    assert rows["broken"][0] == "failed" and rows["broken"][1]["verdict"] == "undecodable"
    assert rows["gone"][0] == "failed" and rows["gone"][1]["verdict"] == "unreadable"
    json.dumps(rows["good"][1])
