"""Camera sources for the agent: an image file, a directory of images, or OpenCV.

`open_camera(source)` picks by the seed's `--camera-source`: a path to an image file,
a directory (its images in turn, for demos and tests), a webcam index ("0") or a
stream URL ("rtsp://..."). OpenCV is only needed for the last two (the optional
`camera` extra: `pip install 'camfleet[camera]'`). Every source returns JPEG bytes.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

log = logging.getLogger("camfleet.agent.camera")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# JPEG quality of re-encoded frames: the seed's client uses OpenCV's default (95);
# 90 is visually the same at ~30 % fewer bytes over a device's uplink.
JPEG_QUALITY = 90
# A webcam or RTSP stream that fails is reopened after this long, doubling up to the max.
REOPEN_DELAY_SECONDS = 1.0
MAX_REOPEN_DELAY_SECONDS = 30.0


class CameraError(RuntimeError):
    """The camera could not produce a frame; the message says why."""


def parse_resolution(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        w, h = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise CameraError(f"resolution must look like 1920x1080, not {value!r}") from None
    if not (16 <= w <= 10_000 and 16 <= h <= 10_000):
        raise CameraError(f"resolution {value} out of range")
    return w, h


def _to_jpeg(data: bytes, resolution: tuple[int, int] | None) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG" and resolution is None:
            return data
        img = img.convert("RGB")
        if resolution is not None:
            img = img.resize(resolution)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue()


class FileCamera:
    """One image file, read again on every capture (replace it to change the picture)."""

    def __init__(self, path: Path, resolution=None) -> None:
        self.path, self.resolution = path, resolution

    def capture(self) -> bytes:
        try:
            return _to_jpeg(self.path.read_bytes(), self.resolution)
        except OSError as exc:
            raise CameraError(f"cannot read {self.path.name}: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass


class DirectoryCamera:
    """The images of a directory, one per capture, in name order, round and round."""

    def __init__(self, path: Path, resolution=None) -> None:
        self.path, self.resolution, self._next = path, resolution, 0

    def capture(self) -> bytes:
        files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CameraError(f"no images in {self.path}")
        chosen = files[self._next % len(files)]
        self._next += 1
        return FileCamera(chosen, self.resolution).capture()

    def close(self) -> None:
        pass


class OpenCvCamera:
    """A webcam index or stream URL through OpenCV, reopened with backoff after failures."""

    def __init__(self, source: str, backend: str | None, resolution, warmup: int) -> None:
        try:
            import cv2
        except ImportError:
            raise CameraError(
                "webcam and RTSP sources need OpenCV: pip install 'camfleet[camera]'"
            ) from None
        self.cv2 = cv2
        self.source = int(source) if source.isdigit() else source
        self.backend = backend
        self.resolution = resolution
        self.warmup = warmup
        self._cap = None
        self._delay = REOPEN_DELAY_SECONDS
        self._retry_at = 0.0

    def _open(self):
        cv2 = self.cv2
        api = getattr(cv2, f"CAP_{self.backend.upper()}", cv2.CAP_ANY) if self.backend else 0
        cap = cv2.VideoCapture(self.source, api) if api else cv2.VideoCapture(self.source)
        if not cap.isOpened():
            raise CameraError("camera did not open")
        if self.resolution:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.resolution[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.resolution[1])
        return cap

    def capture(self) -> bytes:
        if self._cap is None:
            if time.monotonic() < self._retry_at:
                raise CameraError("camera unavailable; waiting to reopen")
            try:
                self._cap = self._open()
                self._delay = REOPEN_DELAY_SECONDS
            except CameraError:
                self._retry_at = time.monotonic() + self._delay
                self._delay = min(self._delay * 2, MAX_REOPEN_DELAY_SECONDS)
                raise
        for _ in range(max(self.warmup, 0)):
            self._cap.read()
        ok, frame = self._cap.read()
        if not ok:
            self.close()
            raise CameraError("camera returned no frame; it will be reopened")
        ok, buf = self.cv2.imencode(".jpg", frame, [self.cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise CameraError("frame could not be encoded as JPEG")
        return buf.tobytes()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def open_camera(
    source: str, backend: str | None = None, resolution: str | None = None, warmup: int = 2
):
    res = parse_resolution(resolution)
    path = Path(source).expanduser()
    if source.isdigit() or "://" in source:
        return OpenCvCamera(source, backend, res, warmup)
    if path.is_dir():
        return DirectoryCamera(path, res)
    if path.is_file():
        return FileCamera(path, res)
    raise CameraError(f"camera source {source!r} is not a file, directory, index or URL")
