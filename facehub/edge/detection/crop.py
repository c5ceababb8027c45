"""Box arithmetic and the crop + encode stage.

Boxes are ``(x, y, w, h)`` in pixels of the full-resolution frame. Detection
runs on a smaller grey copy of the frame; :func:`scale_box` maps its boxes back,
and :func:`crop` cuts the face, with a margin, out of the full-resolution colour
frame, so the published crop has all the detail the camera delivered.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

Box = tuple[int, int, int, int]
SAME_FACE_OVERLAP = 0.5  # a box covering half of another is the same face


def scale_box(box: Sequence[float], factor: float) -> Box:
    """A box measured on an image resized by ``factor``, in the original image's pixels."""
    x, y, w, h = box[:4]
    return (int(round(x / factor)), int(round(y / factor)), int(round(w / factor)), int(round(h / factor)))


def expand_box(box: Sequence[float], margin: float, width: int, height: int) -> Box:
    """The box grown by ``margin`` x its size on every side, clipped to a ``width`` x ``height`` image.

    A margin of 0.2 adds a fifth of the face's width left and right (and of its
    height above and below), which keeps hair and chin in the crop.
    """
    x, y, w, h = box[:4]
    dx, dy = w * margin, h * margin
    x0, y0 = max(0, int(x - dx)), max(0, int(y - dy))
    x1, y1 = min(width, int(round(x + w + dx))), min(height, int(round(y + h + dy)))
    return (x0, y0, max(0, x1 - x0), max(0, y1 - y0))


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    """The part of ``box`` inside a ``width`` x ``height`` image (zero size when outside)."""
    return expand_box(box, 0.0, width, height)


def crop(frame: np.ndarray, box: Sequence[float], margin: float) -> np.ndarray:
    """The face with its margin, as a view into ``frame`` (copy it to keep it past the frame)."""
    height, width = frame.shape[:2]
    x, y, w, h = expand_box(box, margin, width, height)
    return frame[y:y + h, x:x + w]


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of ``image``; raises ``ValueError`` for an empty image or a failed encode."""
    if image.size == 0:
        raise ValueError("cannot encode an empty crop")
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV could not encode the crop as JPEG")
    return encoded.tobytes()


def intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Area shared by two ``(x, y, w, h)`` boxes (0 when they do not touch)."""
    ix = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    iy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return ix * iy if ix > 0 and iy > 0 else 0.0


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes (0 when they do not touch)."""
    inter = intersection(a, b)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0


def same_face(a: Sequence[float], b: Sequence[float]) -> bool:
    """Do two boxes show the same face? Yes when either covers half of the other (nested boxes count)."""
    return overlap_of_smaller(a, b) >= SAME_FACE_OVERLAP


def overlap_of_smaller(a: Sequence[float], b: Sequence[float]) -> float:
    """The share of the smaller box covered by the other (1 when one box holds the other)."""
    inter = intersection(a, b)
    return inter / min(a[2] * a[3], b[2] * b[3]) if inter else 0.0
