"""Where Haar's ``verify_score`` comes from: a logistic regression on the tuned half, checked on the held-back one.

Every plausible proposal (nested boxes dropped, contrast gate passed) of a
split's photos in their 8 variants, and of frames of its motion clips, is
labelled a face or not (IoU >= 0.4 with a true box) and described by each
verifying cascade's hits (:meth:`HaarBackend.hit_counts`). A logistic
regression on ``log(1 + hits)`` of the tuned proposals gives each cascade a
weight; its boundary, with the weights averaged, is a geometric mean of
``(1 + hits)``, the score :meth:`HaarBackend.agreement` computes. Then each
threshold near it is scored on the photos of both splits, with the same
one-to-one matching as ``facehub bench quality``. On the tuned half the
scores of thresholds 18-28 are nearly alike, so the held-back rows chose the
default among them (and are a validation score for it, not an untouched one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facehub.config import DetectorConfig
from facehub.dev.bench import motion, quality
from facehub.edge.detection.crop import clip_box, iou
from facehub.edge.detection.haar import HaarBackend, geometric_mean

MOTION_CLIPS = ("pan:5", "zoom:4")
MOTION_EVERY = 15  # one frame in this many of each clip: neighbouring frames say nearly the same
THRESHOLDS = (12, 16, 18, 20, 22, 24, 28, 32)


@dataclass
class Picture:
    """One image's plausible proposals, each with the verifying cascades' hits, and its true boxes."""

    source: str  # "photo" or "motion"
    labels: list
    boxes: list
    counts: list


def collect(backend: HaarBackend, folder: Path, split: str) -> list[Picture]:
    """The split's photos (8 variants each) and frames of its clips, searched as still images."""
    pictures = []
    for _, image, labels in quality.split_photos(folder, split):
        for _, shown, truth in quality.variants(image, labels):
            pictures.append(describe(backend, "photo", shown, truth))
    for clip_name in MOTION_CLIPS:
        clip = motion.make_clip(folder, split, clip_name)
        for index in range(0, len(clip), MOTION_EVERY):
            frame = clip.frame(index)
            truth = [clip_box(face, frame.shape[1], frame.shape[0]) for face in clip.truth(index)]
            pictures.append(describe(backend, "motion", frame, truth))
    return pictures


def describe(backend: HaarBackend, source: str, frame: np.ndarray, truth: list) -> Picture:
    factor = backend.factor_for(frame.shape[1])
    image = backend.prepare(frame, factor)
    boxes = backend.plausible(image, backend.find_all(image, still=True))
    counts = [list(backend.hit_counts(image, box))[-1] for box in boxes]
    return Picture(source, list(truth), [[v / factor for v in box[:4]] for box in boxes], counts)


def is_face(box, labels) -> bool:
    return any(iou(box, label) >= quality.MATCH_IOU for label in labels)


def fit(pictures: list[Picture], steps: int = 5000, rate: float = 0.1, l2: float = 0.01) -> tuple[np.ndarray, float]:
    """Logistic regression weights (per cascade, on ``log(1 + hits)``) and bias, by plain gradient descent."""
    features = np.array([[math.log1p(c) for c in counts] for p in pictures for counts in p.counts])
    truth = np.array([is_face(box, p.labels) for p in pictures for box in p.boxes], dtype=float)
    mean, spread = features.mean(axis=0), features.std(axis=0) + 1e-9
    scaled = (features - mean) / spread
    weights, bias = np.zeros(scaled.shape[1]), 0.0
    for _ in range(steps):
        error = 1 / (1 + np.exp(-(scaled @ weights + bias))) - truth
        weights -= rate * (scaled.T @ error / len(truth) + l2 * weights)
        bias -= rate * error.mean()
    weights = weights / spread
    return weights, bias - float(weights @ mean)


def boundary(weights: np.ndarray, bias: float) -> float:
    """The geometric mean of (1 + hits) where the fitted model, its weights averaged, says 50 %."""
    return math.exp(-bias / (len(weights) * float(weights.mean())))


def score_at(pictures: list[Picture], threshold: float) -> quality.Score:
    """What ``verify_score = threshold`` finds in the photos, matched as ``facehub bench quality`` does."""
    total = quality.Score(0, 0, 0)
    for picture in (p for p in pictures if p.source == "photo"):
        kept = [box for box, counts in zip(picture.boxes, picture.counts) if geometric_mean(counts) >= threshold]
        hits, false = quality.match(kept, picture.labels)
        total.hits += hits
        total.false += false
        total.labelled += len(picture.labels)
    return total


def main(folder: Path, config: DetectorConfig) -> None:
    backend = HaarBackend(config)
    if not backend.verifiers:
        print("\n(verify_score = 0: no verification to fit)")
        return
    splits = {split: collect(backend, folder, split) for split in quality.SPLITS}
    weights, bias = fit(splits["tuned"])
    print("\n## Haar verification threshold (fitted on the tuned half, photos searched as still images)\n")
    print("Logistic regression on log(1 + hits) of the tuned proposals: weights "
          + ", ".join(f"{w:.2f}" for w in weights) + f", bias {bias:.2f}; boundary at a geometric mean of "
          f"{boundary(weights, bias):.1f} (configured verify_score {backend.verify_score:g}).\n")
    print("| verify_score | tuned recall | tuned precision | held-back recall | held-back precision |")
    print("|---|---|---|---|---|")
    for threshold in sorted({*THRESHOLDS, backend.verify_score}):
        tuned, held = score_at(splits["tuned"], threshold), score_at(splits["held-back"], threshold)
        print(f"| {threshold:g} | {tuned.recall:.2f} | {tuned.precision:.2f} | {held.recall:.2f} | {held.precision:.2f} |")
