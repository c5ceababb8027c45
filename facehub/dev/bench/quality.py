"""Precision and recall of a detector on box-labelled photos (dlib's XML format).

A detection matches a labelled face when their intersection-over-union is at
least 0.4; matching is greedy and one-to-one. Used by ``facehub bench quality``
and by the detection tests, so both score the same way.

The photos are split in two (:data:`SPLITS`): the defaults were chosen on the
``tuned`` ones only, and the ``held-back`` ones say whether that choice carries
over; ``dogs.jpg`` (no face) is cut in two, its left half with the tuned
photos, its right half with the held-back ones. :func:`variants` adds what a
camera does to a picture (scale, light, noise, blur, JPEG), so a setting is not
chosen for four clean photos.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from facehub.edge.detection.crop import iou

MATCH_IOU = 0.4
Box = Sequence[float]
SPLITS = {"tuned": ("2007_007763.jpg", "2008_001009.jpg"),
          "held-back": ("2008_002079.jpg", "2008_001322.jpg")}
NEGATIVE = "dogs.jpg"


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


def still(backend) -> Callable:
    """``backend.detect`` for single images: photos are searched once, as ``facehub detect`` does."""
    return functools.partial(backend.detect, still=True)


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


def split_photos(folder: Path, split: str) -> list[tuple[str, np.ndarray, list]]:
    """``(name, image, labels)`` of a split's photos, then its half of ``dogs.jpg`` (no labels) when present."""
    labels = labelled_photos(folder)
    photos = [(name, cv2.imread(str(Path(folder) / name)), labels[name]) for name in SPLITS[split]]
    dogs = cv2.imread(str(Path(folder) / NEGATIVE))
    if dogs is not None:
        half = dogs.shape[1] // 2
        photos.append((f"{NEGATIVE} {'left' if split == 'tuned' else 'right'} half",
                       dogs[:, :half] if split == "tuned" else dogs[:, half:], []))
    return photos


def variants(image: np.ndarray, labels: Sequence[Box]) -> list[tuple[str, np.ndarray, list]]:
    """The photo as it is and as a camera might deliver it: ``(what, image, labels)``."""
    def scaled(factor: float):
        size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR), \
            [tuple(v * factor for v in box[:4]) for box in labels]

    rng = np.random.default_rng(3)
    noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    dark = (255 * (image / 255.0) ** 1.8).astype(np.uint8)
    bright = cv2.convertScaleAbs(image, alpha=1.25, beta=25)
    jpeg = cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 30])[1], cv2.IMREAD_COLOR)
    same = list(labels)
    return [("original", image, same), ("smaller x0.8", *scaled(0.8)), ("larger x1.3", *scaled(1.3)),
            ("darker", dark, same), ("brighter", bright, same), ("noise", noisy, same),
            ("blur", cv2.GaussianBlur(image, (5, 5), 1.2), same), ("JPEG q30", jpeg, same)]


def score_split(detect: Callable, folder: Path, split: str, augment: bool = True) -> Score:
    """Score ``detect`` on a split's photos (and their :func:`variants` when ``augment``)."""
    total = Score(0, 0, 0)
    for _, image, labels in split_photos(folder, split):
        for _, shown, boxes in (variants(image, labels) if augment else [("original", image, labels)]):
            hits, false = match([tuple(box[:4]) for box in detect(shown)], boxes)
            total.hits += hits
            total.false += false
            total.labelled += len(boxes)
    return total
