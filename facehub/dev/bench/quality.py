"""Precision and recall of a detector on box-labelled photos (dlib's XML format).

A detection matches a labelled face when their intersection-over-union is at
least 0.4; matching is greedy and one-to-one. Used by ``facehub bench quality``
and by the detection tests, so both score the same way.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2

from facehub.edge.detection.crop import iou

MATCH_IOU = 0.4
Box = Sequence[float]


@dataclass
class Score:
    hits: int
    false: int
    labelled: int

    @property
    def recall(self) -> float:
        return self.hits / self.labelled if self.labelled else 0.0

    @property
    def precision(self) -> float:
        found = self.hits + self.false
        return self.hits / found if found else 1.0


def labelled_photos(folder: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    """{file name: [(x, y, w, h), ...]} from ``training.xml`` (``<box top left width height>``)."""
    root = ET.parse(Path(folder) / "training.xml").getroot()
    return {image.get("file"): [(int(b.get("left")), int(b.get("top")), int(b.get("width")), int(b.get("height")))
                                for b in image.iter("box")]
            for image in root.iter("image")}


def match(found: Sequence[Box], labels: Sequence[Box]) -> tuple[int, int]:
    """(hits, false detections) of ``found`` against ``labels``."""
    unmatched = list(labels)
    hits = false = 0
    for box in found:
        label = next((label for label in unmatched if iou(box, label) >= MATCH_IOU), None)
        if label is None:
            false += 1
        else:
            unmatched.remove(label)
            hits += 1
    return hits, false


def score(detect: Callable, folder: Path) -> Score:
    """Score ``detect(bgr_image) -> boxes`` (anything with x, y, w, h first) on a labelled folder."""
    total = Score(0, 0, 0)
    for name, labels in labelled_photos(folder).items():
        found = [tuple(box[:4]) for box in detect(cv2.imread(str(Path(folder) / name)))]
        hits, false = match(found, labels)
        total.hits += hits
        total.false += false
        total.labelled += len(labels)
    return total
