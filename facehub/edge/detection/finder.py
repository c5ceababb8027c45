"""The detect and crop + encode stages: frames in, faces worth sending out.

:class:`FaceFinder` runs the backend's full search (inline, or on a
:class:`BackgroundSearch` thread), follows tracked faces on every other frame,
links detections into tracks, applies duplicate suppression and JPEG-encodes
the crops to send, cut from the full-resolution colour frame with a margin.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from facehub.config import DetectorConfig
from facehub.messages import Face
from facehub.edge.detection import make_backend
from facehub.edge.detection.base import Detection
from facehub.edge.detection.crop import crop, encode_jpeg, same_face
from facehub.edge.detection.tracker import Tracker
from facehub.edge.detection.trail import Trail

log = logging.getLogger(__name__)

SEARCH_NICE = 10  # the background search yields the CPU to the per-frame work


@dataclass
class Sighting:
    """What is kept of a detection that may be sent: its crop and where it came from."""

    crop: np.ndarray
    box: tuple[int, int, int, int]
    score: float | None
    frame: int
    captured_ms: int


class FaceFinder:
    """Frames in, faces worth sending out: detection, tracking, duplicate suppression, crops.

    The full search is the expensive part (tens of milliseconds a frame), and
    it can run in two places:

    * *inline* (the default): on every ``detect_every``-th frame itself, which
      then waits for it; frames a camera delivers meanwhile are skipped. Its
      faces are cut from the frame searched, at once, and a file read flat out
      gives the same faces on any machine;
    * *background* (on request): on a thread of its own (OpenCV releases the GIL, so it runs
      on another core when there is one) while every frame only follows the
      tracked faces. When a search ends, the faces it found that are not
      tracked yet are carried through the frames seen meanwhile (a
      :class:`Trail` of small grey copies, followed with optical flow) to the
      frame at hand and re-found there (or used where the flow put them):
      their first crop comes from the newest frame, never from one a search
      old, and no frame waits for a search. A face the flow loses is not
      sent; the next search finds it again.
    """

    def __init__(self, cfg: DetectorConfig, device_id: str, background: bool = False):
        self.cfg = cfg
        self.device_id = device_id
        self.backend = make_backend(cfg)
        self.tracker = Tracker(cfg.track_iou, cfg.dedup_interval, cfg.track_timeout, cfg.dedup_policy,
                               cfg.confirm_frames)
        self._until_detect = 0
        self.search_ms: list[float] = []  # how long each full search took, until the caller takes them
        # OpenCV's detectors keep per-image state: the search thread gets a backend of its own
        self.searcher = BackgroundSearch(make_backend(cfg), self.search_ms) if background else None
        self.trail = Trail()  # the frames since the running background search started

    @property
    def background(self) -> bool:
        return self.searcher is not None

    def locate(self, frame: np.ndarray) -> list[Detection]:
        """The detect stage: the faces in ``frame``, from a full search or by following the tracks."""
        if self.searcher is not None:
            return self._locate_with_background_search(frame)
        if self._until_detect <= 0:
            self._until_detect = self.cfg.detect_every - 1
            return timed_search(self.backend, frame, self.search_ms)
        self._until_detect -= 1
        boxes = self.tracker.boxes()
        return self.backend.follow(frame, boxes) if boxes else []

    def _locate_with_background_search(self, frame: np.ndarray) -> list[Detection]:
        self.trail.add(frame)
        found = self.searcher.take()
        carried = [box for box in self.trail.carry(found) if box is not None] if found is not None else []
        tracked = [snap_to_search(box, carried) for box in self.tracker.boxes()]
        new = [box for box in carried if not any(same_face(box, other) for other in tracked)]
        self._until_detect -= 1
        if self._until_detect <= 0 and self.searcher.submit(frame):
            self._until_detect = self.cfg.detect_every
            self.trail.start(frame)
        boxes = tracked + new
        located = self.backend.follow(frame, boxes) if boxes else []
        missed = [box for box in new if not any(same_face(box, hit) for hit in located)]
        return located + self.backend.to_frame(missed, 1.0, frame.shape)

    def select(self, detections: Sequence[Detection], frame: np.ndarray, number: int, captured_ms: int,
               clock: float) -> tuple[list[Face], int]:
        """The crop + encode stage: track, suppress duplicates, encode what is due.

        Returns the faces to publish and how many sightings were suppressed.
        """
        def keep(detection: Detection) -> Sighting:
            return Sighting(crop(frame, detection, self.cfg.margin).copy(), detection.box, detection.score,
                            number, captured_ms)

        step = self.tracker.update(detections, clock, keep)
        return [self.encode(track, sighting) for track, sighting in step.send], step.suppressed

    def encode(self, track: int, sighting: Sighting) -> Face:
        """A sighting as a :class:`Face` message value with a JPEG payload."""
        return Face(image=encode_jpeg(sighting.crop, self.cfg.jpeg_quality), device_id=self.device_id,
                    captured_ms=sighting.captured_ms, frame=sighting.frame, box=sighting.box,
                    score=sighting.score, track=track)

    def close(self) -> int:
        """End all tracks and the search thread; returns the held sightings never sent (count them suppressed)."""
        if self.searcher is not None:
            self.searcher.close()
        return self.tracker.close()


class BackgroundSearch:
    """One full search at a time on a worker thread: submit a frame, take the faces when it is done.

    The worker runs at a lower scheduling priority (:data:`SEARCH_NICE`): on a
    single core it then yields to the per-frame work, so a long search on a busy
    scene delays new faces a little instead of delaying every frame.
    """

    def __init__(self, backend, durations: list[float]):
        self.backend = backend
        self.durations = durations
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facehub-search",
                                        initializer=lower_priority)
        self._running: Future | None = None

    def submit(self, frame: np.ndarray) -> bool:
        """Start searching ``frame`` unless a search is still running; True when started."""
        if self._running is not None:
            return False
        self._running = self._pool.submit(timed_search, self.backend, frame, self.durations)
        return True

    def take(self) -> list[Detection] | None:
        """The faces of the last search once it has ended (once), else None; re-raises its error."""
        if self._running is None or not self._running.done():
            return None
        found, self._running = self._running.result(), None
        return found

    def wait(self, timeout: float | None = None) -> None:
        """Block until the running search (if any) has ended, or ``timeout`` seconds have passed."""
        if self._running is not None:
            wait([self._running], timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._running = None


def snap_to_search(tracked: tuple, found: Sequence[tuple]) -> tuple:
    """A tracked box, or the box a full search just found for the same face: the search has the last word.

    Following only looks near a face's last box and at sizes close to its last
    size, so a track that started on part of a face (the mouth of a face half
    out of view) would stay on that part after the whole face came in; and the
    search's box, nested in it, would count as already tracked and be dropped.
    """
    return next((tuple(box[:4]) for box in found if same_face(box, tracked)), tracked)


def timed_search(backend, frame: np.ndarray, durations: list[float]) -> list[Detection]:
    """``backend.detect(frame)``, noting how long it took (list.append is atomic across threads)."""
    started = time.perf_counter()
    found = backend.detect(frame)
    durations.append((time.perf_counter() - started) * 1000)
    return found


def lower_priority() -> None:
    """Make the calling thread nicer (Linux schedules threads one by one); harmless where unsupported."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SEARCH_NICE)
    except (AttributeError, OSError) as error:
        log.debug("detector: cannot lower the search thread's priority: %s", error)


def search_in_background(cfg: DetectorConfig) -> bool:
    """``detector.search``: "auto" searches inline, on the frame at hand; "background" is there to be chosen.

    Inline, each full search works on the newest frame and its faces are cut
    from that frame at once; the camera's frames during the search are skipped
    (OpenCV spreads one search over the cores it has). In the background the
    frames go on being followed, but a search's faces must be carried to the
    frame at hand, and the longer the search the more are lost on the way: on
    a quarter of one core (an edge-class CPU) a Haar search takes over a
    second, the carried boxes of a panning camera are lost, and every frame
    followed meanwhile takes CPU from the search. Measured with ``facehub bench
    motion --quarter-core`` on the held-back clips: inline captured 32 of 32
    faces with either backend, the background 21 (Haar) and 30 (YuNet); on two
    cores both ways captured as many.
    """
    return cfg.search == "background"
