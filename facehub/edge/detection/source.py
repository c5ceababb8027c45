"""Open the configured video source: camera, video file, network stream or GStreamer pipeline.

``detector.source`` is one string:

* ``"0"``, ``"1"``... a camera index; ``/dev/video0`` a camera device;
* a path to a video file (``detector.loop`` plays it again when it ends);
* ``rtsp://``, ``http://``... a network stream, read through FFmpeg with open
  and read timeouts so a dead camera is noticed instead of blocking forever;
* anything containing ``!`` is a GStreamer pipeline (Jetson CSI cameras:
  ``nvarguscamerasrc ! ... ! appsink``), read with ``cv2.CAP_GSTREAMER``;
* ``sample``: the built-in sample clip.

Failures become :class:`SourceError` with a reason a person can act on; the
detector logs it, counts it and retries with backoff.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2

from facehub.config.schema import redact_credentials

SAMPLE_CLIP = Path(__file__).resolve().parents[2] / "samples" / "astronaut.mp4"
STREAM_TIMEOUT_MS = 10_000

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The source cannot be opened or read; the message says why."""


@dataclass(frozen=True)
class Source:
    """What kind of thing ``detector.source`` names, and how OpenCV should open it."""

    kind: str  # "camera", "file", "stream" or "gstreamer"
    target: str | int
    label: str

    @property
    def ends(self) -> bool:
        """A file has an end; a camera or a stream that stops delivering has failed."""
        return self.kind == "file"


def parse_source(spec: str) -> Source:
    """Classify the configured source string (no I/O)."""
    spec = spec.strip()
    if spec == "sample":
        return Source("file", str(SAMPLE_CLIP), f"sample clip {SAMPLE_CLIP}")
    if spec.isdigit():
        return Source("camera", int(spec), f"camera {spec}")
    if "!" in spec:
        return Source("gstreamer", spec, f"GStreamer pipeline '{_short(redact_credentials(spec))}'")
    if "://" in spec:
        return Source("stream", spec, f"stream {redact_credentials(spec)}")
    if spec.startswith("/dev/"):
        return Source("camera", spec, f"camera {spec}")
    return Source("file", spec, f"video file {spec}")


def open_source(spec: str, width: int = 0, height: int = 0, fps: float = 0.0) -> tuple[cv2.VideoCapture, Source]:
    """An opened capture for ``spec`` with the requested size and rate, or :class:`SourceError`."""
    source = parse_source(spec)
    if source.kind == "file":
        path = Path(str(source.target))
        if not path.is_file():
            raise SourceError(f"{source.label}: no such file")
        if not os.access(path, os.R_OK):
            raise SourceError(f"{source.label}: not readable (permissions)")
    if source.kind == "camera" and isinstance(source.target, str) and not Path(source.target).exists():
        raise SourceError(f"{source.label}: no such device (is the camera connected and passed through?)")
    capture = _capture(source)
    if not capture.isOpened():
        capture.release()
        raise SourceError(f"{source.label}: OpenCV cannot open it ({_hint(source)})")
    if source.kind in ("camera", "stream"):
        if width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps:
            capture.set(cv2.CAP_PROP_FPS, fps)
    return capture, source


def describe(capture: cv2.VideoCapture) -> str:
    """The capture's actual frame size and rate, for the log."""
    w = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    h = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    rate = capture.get(cv2.CAP_PROP_FPS)
    return f"{w}x{h} at {rate:.3g} fps" if rate > 0 else f"{w}x{h}"


def _capture(source: Source) -> cv2.VideoCapture:
    if source.kind == "gstreamer":
        return cv2.VideoCapture(source.target, cv2.CAP_GSTREAMER)
    if source.kind == "stream":
        return cv2.VideoCapture(source.target, cv2.CAP_FFMPEG,
                                [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                                 cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS])
    return cv2.VideoCapture(source.target)


def _hint(source: Source) -> str:
    if source.kind == "camera":
        return "no camera at that index or device, or it is busy"
    if source.kind == "file":
        return "not a video OpenCV can decode"
    if source.kind == "stream":
        return "unreachable, refused, or a format FFmpeg cannot read"
    if not _has_gstreamer():
        return "this OpenCV build has no GStreamer support"
    return "the pipeline failed to start; test it with gst-launch-1.0"


def _has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


