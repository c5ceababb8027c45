"""The typical implementation of this pipeline, kept only as a yardstick for ``facehub bench``.

It is what most face-capture-over-MQTT projects do: convert the whole
full-size frame to grey, run ``detectMultiScale(gray, 1.3, 5)`` on every
frame, PNG-encode every face found and publish each one. No downscaling, no
tracking, no duplicate suppression. The benchmark runs it on the same frames,
in the same run, as FaceHub's detector, so the comparison is fair.
"""

from __future__ import annotations

import cv2
import numpy as np

SCALE_FACTOR = 1.3
MIN_NEIGHBORS = 5


class TypicalDetector:
    """Haar on the full grey frame with the usual (1.3, 5) settings."""

    def __init__(self):
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def detect(self, frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        return [tuple(map(int, box)) for box in self.cascade.detectMultiScale(gray, SCALE_FACTOR, MIN_NEIGHBORS)]


def encode_all(frame: np.ndarray, boxes) -> list[bytes]:
    """Every face of every frame, PNG-encoded: no suppression of repeats."""
    return [cv2.imencode(".png", frame[y:y + h, x:x + w])[1].tobytes() for (x, y, w, h) in boxes]
