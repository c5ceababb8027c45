"""Carrying the faces a background search found into the frame at hand.

A full search in the background ends frames after the frame it searched; by
then a moving face (or a panning camera) has moved on, and a crop cut at the
search's box would show half a face, or none. :class:`Trail` keeps a small
grey copy of every frame since the search started and, when the search ends,
follows each box it found through those frames with pyramidal Lucas-Kanade
optical flow on a grid of points inside the box: the box moves by the points'
median shift and scales by the median change of their spread, frame by frame,
to the newest frame. A box whose points are mostly lost is dropped (the
finder's next re-find or search finds the face again): nothing is ever cut at
a box from an older frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from facehub.edge.detection.base import grey, resize

TRAIL_WIDTH = 320  # kept frames are shrunk to this width: plenty for optical flow, 77 KB a frame at 4:3
TRAIL_LENGTH = 64  # frames kept at most; beyond it every other one is dropped (flow spans a larger step)
GRID = 4  # points per side of the grid followed in each box...
GRID_SPAN = 0.6  # ...spread over the middle 60 % of the box (the face, not the background beside it)
FLOW_WINDOW = (15, 15)
FLOW_LEVELS = 3  # pyramid levels: shifts of up to ~50 px between two kept frames at TRAIL_WIDTH
MIN_ALIVE = 0.5  # a box is carried only while at least half of its points are tracked
MAX_FLOW_ERROR = 30.0  # LK's mean absolute patch difference above which a point counts as lost


class Trail:
    """Small grey copies of the frames since a search started, and the flow that carries boxes through them."""

    def __init__(self, width: int = TRAIL_WIDTH, length: int = TRAIL_LENGTH):
        self.width = width
        self.length = length
        self.frames: list[np.ndarray] = []
        self.factor = 1.0  # full frame pixels -> trail pixels

    def start(self, frame: np.ndarray) -> None:
        """A search starts on ``frame``: keep it as the first of the trail."""
        self.factor = min(1.0, self.width / frame.shape[1])
        self.frames = [self._small(frame)]

    def add(self, frame: np.ndarray) -> None:
        """A frame seen while the search runs (nothing is kept when no search is running)."""
        if self.frames:
            if len(self.frames) >= self.length:
                self.frames = self.frames[:1] + self.frames[2::2]  # keep the first and every other one
            self.frames.append(self._small(frame))

    def carry(self, boxes: Sequence[Sequence[float]]) -> list[tuple[float, float, float, float] | None]:
        """Each box (full-frame pixels, in the trail's first frame) moved to its last frame; None if lost.

        Empties the trail: the next search starts a new one.
        """
        frames, self.frames = self.frames, []
        if not len(boxes) or not frames:
            return [None] * len(boxes)
        start = np.concatenate([self._grid(box) for box in boxes]).reshape(-1, 1, 2)
        points, alive = start.copy(), np.ones(len(start), bool)
        for before, after in zip(frames, frames[1:]):
            moved, status, error = cv2.calcOpticalFlowPyrLK(before, after, points, None, winSize=FLOW_WINDOW,
                                                           maxLevel=FLOW_LEVELS)
            alive &= (status.ravel() == 1) & (error.ravel() < MAX_FLOW_ERROR)
            points = moved
        carried = []
        for index, box in enumerate(boxes):
            part = slice(index * GRID * GRID, (index + 1) * GRID * GRID)
            carried.append(self._moved(box, start[part, 0], points[part, 0], alive[part]))
        return carried

    # -- internals -------------------------------------------------------------------------

    def _small(self, frame: np.ndarray) -> np.ndarray:
        return resize(grey(frame), self.factor)

    def _grid(self, box: Sequence[float]) -> np.ndarray:
        x, y, w, h = (v * self.factor for v in box[:4])
        steps = np.linspace((1 - GRID_SPAN) / 2, (1 + GRID_SPAN) / 2, GRID)
        xs, ys = np.meshgrid(x + w * steps, y + h * steps)
        return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)

    def _moved(self, box, start: np.ndarray, end: np.ndarray, alive: np.ndarray):
        if alive.sum() < MIN_ALIVE * len(alive):
            return None
        start, end = start[alive], end[alive]
        shift = np.median(end - start, axis=0) / self.factor
        spread_before = np.median(np.abs(start - np.median(start, axis=0)))
        spread_after = np.median(np.abs(end - np.median(end, axis=0)))
        scale = spread_after / spread_before if spread_before > 0 else 1.0
        x, y, w, h = box[:4]
        cx, cy = x + w / 2 + shift[0], y + h / 2 + shift[1]
        w, h = w * scale, h * scale
        return (cx - w / 2, cy - h / 2, w, h)
