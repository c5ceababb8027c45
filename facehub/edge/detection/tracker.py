"""Follow faces across frames and decide which sightings are worth sending.

A face that stays in view is seen on every frame; sending each sighting would
publish the same face thirty times a second. :class:`Tracker` links
detections across frames into tracks (greedy intersection-over-union
matching: a detection continues the track whose last box it overlaps most)
and applies a duplicate-suppression policy. In every policy the first
sighting of a new track is sent at once, so a face reaches the broker within
a frame of being *confirmed* (seen in ``confirm`` frames: a detector's false
positives on clutter rarely last, a face does), and two crops of one track are
at least ``interval`` seconds apart. Sightings of a track not yet confirmed are
counted as suppressed. After the first crop:

* ``"better"`` (the default): a sighting is sent at once, when the interval
  has passed, only if it is larger than every crop already sent for the track
  by :data:`BETTER_AREA` (more pixels of the face; box area is free to
  compare, unlike a sharpness measure). A face that stays put is sent once; a
  face walking towards the camera is sent again as its crops get better.
  Nothing is held, so no crop waits.
* ``"largest"``: the largest sighting of each interval is held and sent when
  the interval since the previous send has passed (even if the face has left
  by then): the best crop per interval, up to an interval late.
* ``"first"``: the first sighting once the interval has passed is sent at
  once: a steady refresh, one crop per interval while the face is in view.

Every other sighting is counted as suppressed. A track not seen for
``timeout`` seconds ends; a best sighting it still holds was preceded by a
sent crop of the same face and is counted as suppressed. ``interval = 0``
sends every sighting. The tracker is pure logic: what it keeps for a sighting
(the crop) is produced by the caller's ``keep`` callback, called only for
sightings that are sent or may be sent, so the hot path does not copy pixels
it will throw away.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from facehub.config import DEDUP_POLICIES as POLICIES
from facehub.edge.detection.crop import iou

BETTER_AREA = 1.25  # "better": a later crop must have a quarter more pixels than the largest one sent


@dataclass
class Track:
    """One face followed across frames."""

    id: int
    box: tuple[int, int, int, int]
    first_seen: float
    last_seen: float
    sightings: int = 1
    last_sent: float | None = None
    best: Any = None
    best_area: int = -1
    sent_area: int = 0  # the largest crop sent so far


@dataclass
class Step:
    """What one frame's detections led to."""

    send: list[tuple[int, Any]] = field(default_factory=list)  # (track id, kept payload), oldest first
    suppressed: int = 0
    matched: list[tuple[int, Any]] = field(default_factory=list)  # (track id, detection) for this frame


class Tracker:
    """Intersection-over-union tracker with per-track duplicate suppression."""

    def __init__(self, iou_threshold: float = 0.3, interval: float = 1.0, timeout: float = 1.0,
                 policy: str = "better", confirm: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"unknown duplicate policy {policy!r}: one of {', '.join(POLICIES)}")
        self.iou_threshold = iou_threshold
        self.interval = interval
        self.timeout = timeout
        self.policy = policy
        self.confirm = confirm
        self.tracks: dict[int, Track] = {}
        self._ids = itertools.count(1)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """The last box of every live track (where to look for them in the next frame)."""
        return [track.box for track in self.tracks.values()]

    def update(self, detections: Sequence[Any], now: float, keep: Callable[[Any], Any]) -> Step:
        """Match this frame's detections to tracks and return what to send now.

        ``detections`` are ``(x, y, w, h, ...)`` tuples; ``keep(detection)``
        returns what to remember for a sighting that is sent or may be sent.
        """
        step = Step()
        for track, detection in self._match(detections, now):
            step.matched.append((track.id, detection))
            self._offer(track, detection, now, keep, step)
        self._release_due(now, step)
        self._expire(now, step)
        return step

    def close(self) -> int:
        """End every track; returns how many held sightings were never sent (count them suppressed)."""
        held = sum(1 for track in self.tracks.values() if track.best is not None)
        self.tracks.clear()
        return held

    # -- internals -------------------------------------------------------------------------

    def _match(self, detections: Sequence[Any], now: float) -> list[tuple[Track, Any]]:
        """Greedy matching by descending IoU; unmatched detections start new tracks."""
        pairs = sorted(((iou(track.box, det), tid, index)
                        for tid, track in self.tracks.items()
                        for index, det in enumerate(detections)), reverse=True)
        used_tracks: set[int] = set()
        used_dets: set[int] = set()
        result = []
        for overlap, tid, index in pairs:
            if overlap < self.iou_threshold:
                break
            if tid in used_tracks or index in used_dets:
                continue
            used_tracks.add(tid)
            used_dets.add(index)
            track = self.tracks[tid]
            track.box = _box(detections[index])
            track.last_seen = now
            track.sightings += 1
            result.append((track, detections[index]))
        for index, det in enumerate(detections):
            if index not in used_dets:
                track = Track(next(self._ids), _box(det), first_seen=now, last_seen=now)
                self.tracks[track.id] = track
                result.append((track, det))
        return result

    def _offer(self, track: Track, detection: Any, now: float, keep: Callable[[Any], Any],
               step: Step) -> None:
        area = int(detection[2]) * int(detection[3])
        if track.sightings < self.confirm:
            step.suppressed += 1
        elif self.interval <= 0 or track.last_sent is None:
            self._send(track, keep(detection), area, now, step)
        elif self.policy == "largest":
            self._hold_if_largest(track, detection, area, keep, step)
        elif now - track.last_sent >= self.interval and (
                self.policy == "first" or area >= BETTER_AREA * track.sent_area):
            self._send(track, keep(detection), area, now, step)
        else:
            step.suppressed += 1

    @staticmethod
    def _send(track: Track, kept: Any, area: int, now: float, step: Step) -> None:
        step.send.append((track.id, kept))
        track.last_sent = now
        track.sent_area = max(track.sent_area, area)

    @staticmethod
    def _hold_if_largest(track: Track, detection: Any, area: int, keep: Callable[[Any], Any],
                         step: Step) -> None:
        if area >= track.best_area:
            if track.best is not None:
                step.suppressed += 1  # the sighting it replaces
            track.best = keep(detection)
            track.best_area = area
        else:
            step.suppressed += 1

    def _release_due(self, now: float, step: Step) -> None:
        for track in self.tracks.values():
            if track.best is not None and now - track.last_sent >= self.interval:
                self._send(track, track.best, track.best_area, now, step)
                track.best, track.best_area = None, -1

    def _expire(self, now: float, step: Step) -> None:
        for tid in [tid for tid, t in self.tracks.items() if now - t.last_seen > self.timeout]:
            track = self.tracks.pop(tid)
            if track.best is not None:
                step.suppressed += 1


def _box(detection: Any) -> tuple[int, int, int, int]:
    return (int(detection[0]), int(detection[1]), int(detection[2]), int(detection[3]))
