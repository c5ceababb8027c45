"""Face detection for the detector component: backends, tracking, crops, sources.

``make_backend(cfg)`` builds the configured backend (Haar or YuNet); every
backend has ``detect(bgr_frame) -> list[Detection]`` with
``Detection(x, y, w, h, score|None)`` in full-frame pixels, and
``follow(frame, boxes)`` to re-find tracked faces near their last boxes.
"""

from __future__ import annotations

from facehub.config import DetectorConfig
from facehub.edge.detection.base import Backend, Detection
from facehub.edge.detection.crop import crop, encode_jpeg, expand_box, iou, scale_box
from facehub.edge.detection.source import SAMPLE_CLIP, Source, SourceError, open_source, parse_source
from facehub.edge.detection.tracker import Step, Track, Tracker

__all__ = [
    "SAMPLE_CLIP",
    "Backend",
    "Detection",
    "Source",
    "SourceError",
    "Step",
    "Track",
    "Tracker",
    "crop",
    "encode_jpeg",
    "expand_box",
    "iou",
    "make_backend",
    "open_source",
    "parse_source",
    "scale_box",
]


def make_backend(cfg: DetectorConfig) -> Backend:
    """The configured detection backend (``cfg.detection()`` says which); ``ValueError`` when its files
    cannot be loaded."""
    if cfg.detection()[0] == "yunet":
        from facehub.edge.detection.yunet import YuNetBackend

        return YuNetBackend(cfg)
    from facehub.edge.detection.haar import HaarBackend

    return HaarBackend(cfg)
