"""What every detection backend shares: the detection image, box mapping, re-finding tracked faces.

A backend finds faces in a BGR frame and returns :class:`Detection` boxes in
full-resolution frame pixels. It works on a resized copy: frames wider than
``detect_width`` are shrunk to it (detection cost grows with the pixel count,
and faces in a camera frame are rarely small), and frames narrower than it are
enlarged by up to ``upscale`` (small faces in small photos reach the size the
detector needs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

from facehub.edge.detection.crop import clip_box, expand_box, iou, same_face, scale_box

FOLLOW_MARGIN = 0.4  # search 0.4 face widths around the last box: faces move less than that per frame
FOLLOW_FACE = 32  # the search window is resampled so the face is this many pixels wide (cheap, size-independent)
FOLLOW_RANGE = 1.3  # a re-found face is within this factor of its last size...
FOLLOW_IOU = 0.2  # ...and still overlaps its last box this much


class Detection(NamedTuple):
    """A face box in frame pixels, with the backend's confidence when it has one."""

    x: int
    y: int
    w: int
    h: int
    score: float | None = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)


class Backend:
    """Base class: subclasses implement :meth:`prepare`, :meth:`find` and optionally :meth:`accept`."""

    name = "backend"
    follow_face = FOLLOW_FACE
    follow_iou = FOLLOW_IOU

    def __init__(self, detect_width: int = 640, upscale: float = 1.0):
        self.detect_width = detect_width
        self.upscale = upscale

    # -- to implement ----------------------------------------------------------------------

    def prepare(self, frame: np.ndarray, factor: float) -> np.ndarray:
        """The image the backend searches: ``frame`` resized by ``factor`` (grey or colour)."""
        raise NotImplementedError

    def find(self, image: np.ndarray, min_size: int = 0, max_size: int = 0) -> list[tuple]:
        """Candidate boxes ``(x, y, w, h, score|None)`` in ``image`` pixels, optionally size-bounded."""
        raise NotImplementedError

    def find_near(self, window: np.ndarray, min_size: int, max_size: int) -> list[tuple]:
        """:meth:`find` for re-finding a tracked face in a small window; may trade precision for speed."""
        return self.find(window, min_size, max_size)

    def accept(self, image: np.ndarray, boxes: list[tuple]) -> list[tuple]:
        """Filter full-frame candidates (a second opinion); the default keeps them all."""
        return boxes

    # -- shared ----------------------------------------------------------------------------

    def factor_for(self, width: int) -> float:
        """Frame pixels -> detection pixels for a frame ``width`` pixels wide."""
        target = self.detect_width
        if target and width > target:
            return target / width
        if self.upscale > 1:
            return min(self.upscale, target / width) if target else self.upscale
        return 1.0

    def find_all(self, image: np.ndarray, still: bool) -> list[tuple]:
        """Candidates in a whole image; ``still`` asks for a finer search where the backend has one."""
        return self.find(image)

    def detect(self, frame: np.ndarray, still: bool = False) -> list[Detection]:
        """Every face in ``frame``, boxes in frame pixels.

        ``still``: ``frame`` is a single image (a photo), searched once, so a
        backend may search it more finely than a camera frame, whose faces are
        searched for again a few frames later.
        """
        factor = self.factor_for(frame.shape[1])
        image = self.prepare(frame, factor)
        boxes = self.accept(image, self.find_all(image, still))
        return self.to_frame(boxes, factor, frame.shape)

    def follow(self, frame: np.ndarray, boxes: Sequence[Sequence[int]]) -> list[Detection]:
        """Re-find already tracked faces near their last ``boxes``: much cheaper than :meth:`detect`.

        Each face is searched for only in a window around its last box, resampled
        so the face is ``follow_face`` pixels wide, and only at sizes close to
        its last size; a face not re-found is left out.
        """
        if not boxes:
            return []
        factor = self.factor_for(frame.shape[1])
        image = self.prepare(frame, factor)
        height, width = image.shape[:2]
        found = []
        for box in boxes:
            last = [v * factor for v in box[:4]]
            x, y, w, h = expand_box(last, FOLLOW_MARGIN, width, height)
            size = max(last[2], last[3])
            if w < 8 or h < 8 or size < 4:
                continue
            scale = self.follow_face / size
            window = resize(image[y:y + h, x:x + w], scale)
            hits = self.find_near(window, int(self.follow_face / FOLLOW_RANGE), int(self.follow_face * FOLLOW_RANGE) + 1)
            hits = [(x + hx / scale, y + hy / scale, hw / scale, hh / scale, *rest)
                    for hx, hy, hw, hh, *rest in hits]
            best = max(hits, key=lambda hit: iou(hit, last), default=None)
            if best is not None:
                best = self.settle(best, last)
            if best is not None and iou(best, last) >= self.follow_iou and not any(same_face(best, f) for f in found):
                found.append(best)  # two tracks converging on one face: the first (older) keeps it
        return self.to_frame(found, factor, frame.shape)

    def settle(self, found: tuple, last: Sequence[float]) -> tuple:
        """The box a re-find reports for a face last seen at ``last``; the backend's own box by default."""
        return found

    def to_frame(self, boxes: list[tuple], factor: float, shape: tuple) -> list[Detection]:
        """Boxes measured on an image resized by ``factor`` as detections in a frame of ``shape``, clipped."""
        height, width = shape[:2]
        result = []
        for box in boxes:
            x, y, w, h = clip_box(scale_box(box, factor), width, height)
            if w > 0 and h > 0:
                score = box[4] if len(box) > 4 else None
                result.append(Detection(x, y, w, h, None if score is None else float(score)))
        return result


def resize(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` scaled by ``factor`` (area averaging when shrinking, bilinear when enlarging)."""
    if factor == 1.0:
        return image
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)


def grey(frame: np.ndarray) -> np.ndarray:
    """A single-channel copy of a BGR, BGRA or already grey frame."""
    if frame.ndim == 2:
        return frame
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
