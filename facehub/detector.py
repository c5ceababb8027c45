"""The detector component: camera frames in, one MQTT message per face out.

Four stages, each a small function or method a benchmark can time alone:

1. *capture*: :class:`FrameReader` reads frames from the configured source
   (camera, file, stream, GStreamer pipeline) and reopens it with exponential
   backoff when it cannot be opened or stops delivering; a video file that is
   not looped simply ends the component (exit 0, so it is not restarted).
2. *detect*: :meth:`FaceFinder.locate` runs a full search of a downscaled
   grey copy every ``detect_every`` frames (on the frame itself, or on a
   background thread so no frame waits for it), and on every other frame only
   re-finds the faces it is tracking, near their last boxes.
3. *crop + encode*: :meth:`FaceFinder.select` links detections into tracks,
   applies duplicate suppression (at most one crop per face per
   ``dedup_interval``, chosen by ``dedup_policy``) and JPEG-encodes the crops
   to send, cut from the full-resolution colour frame with a margin.
4. *publish*: :class:`FacePublisher` sends each face on ``<prefix>/<device>``
   with its metadata as MQTT v5 properties, from its own thread and a bounded
   queue, so a slow or absent broker never stalls capture: when the queue is
   full the oldest face is dropped and counted.

Counters: ``frames`` (processed), ``frames_skipped`` (too late to process),
``faces_detected``, ``faces_published`` (acknowledged by the broker at QoS >=
1), ``faces_suppressed``, ``faces_dropped``, ``source_errors``; percentiles of
``publish_latency_ms`` (capture to acknowledgement) and of ``search_ms`` (one
full search: how long a new face can go unnoticed beyond ``detect_every``
frames).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from paho.mqtt.enums import MQTTErrorCode

from . import mqtt
from .config import Config, DetectorConfig, opencv_threads
from .detection import SAMPLE_CLIP, Detection, SourceError, Tracker, make_backend
from .detection.crop import crop, encode_jpeg, same_face
from .detection.source import Source, describe, open_source, parse_source
from .messages import Face
from .runtime import Runtime

__all__ = ["SAMPLE_CLIP", "FaceFinder", "FacePublisher", "FrameReader", "detect_command", "run"]

log = logging.getLogger(__name__)

PUBLISH_WINDOW = 100  # faces handed to the MQTT client and not yet acknowledged
CLOSE_TIMEOUT = 3.0  # seconds to finish sending queued faces when stopping
DROP_LOG_INTERVAL = 10.0
SEARCH_NICE = 10  # the background search yields the CPU to the per-frame work


def run(config: Config, runtime: Runtime) -> None:
    """The detector component: capture, detect, publish until stopped or a non-looped file ends."""
    cfg = config.detector
    quiet_opencv()
    cv2.setNumThreads(opencv_threads(cfg.threads))
    try:
        finder = FaceFinder(cfg, config.device_id, background=search_in_background(cfg))
    except ValueError as error:
        log.error("detector cannot start: %s", error)
        raise SystemExit(1) from None
    publisher = FacePublisher(config, runtime)
    publisher.start()
    reader = FrameReader(cfg, runtime)
    log.info("detector: %s backend, full search %s, publishing on %s at QoS %d", finder.backend.name,
             "in the background" if finder.background else "inline", config.topic, config.local.qos)
    try:
        for frame, number, captured_ms, clock in reader.frames():
            runtime.count("frames")
            detections = finder.locate(frame)
            faces, suppressed = finder.select(detections, frame, number, captured_ms, clock)
            if detections:
                runtime.count("faces_detected", len(detections))
            if suppressed:
                runtime.count("faces_suppressed", suppressed)
            for face in faces:
                publisher.put(face)
            while finder.search_ms:
                runtime.observe("search_ms", finder.search_ms.pop())
            runtime.beat()
        held = finder.close()
        if held:
            runtime.count("faces_suppressed", held)
        if reader.ended:
            log.info("detector: %s ended; sending the last faces", reader.source_label)
            publisher.wait_idle(runtime)
    finally:
        publisher.close(CLOSE_TIMEOUT)
        runtime.gauge("queue_depth", 0)
        runtime.flush()


# -- capture ---------------------------------------------------------------------------------


class FrameReader:
    """Frames from the configured source, reopening it with exponential backoff when it fails.

    :meth:`frames` yields ``(frame, number, captured_ms, clock)``: ``number``
    counts frames since the component started, ``captured_ms`` is the wall-clock
    time the frame was captured, and ``clock`` is the time duplicate suppression
    uses: the video's own time for files (so a file gives the same faces however
    fast it is read), a monotonic clock for live sources.

    The detector never works on a stale frame: a live source is read by a
    :class:`LatestFrame` thread that keeps only the newest frame, and a file
    played at ``fps`` skips the frames that are already overdue. Either way the
    frames not taken are counted as ``frames_skipped``.
    """

    def __init__(self, cfg: DetectorConfig, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime
        self.ended = False
        self.source_label = cfg.source
        self._delay = cfg.reopen_min
        self._number = 0
        self._file_frames = 0  # frames read from files, across loops: the video clock

    def frames(self) -> Iterator[tuple[np.ndarray, int, int, float]]:
        replay = False  # a looped file starting again: not worth an INFO line each time
        while not self.runtime.stop.is_set():
            try:
                capture, source = open_source(self.cfg.source, self.cfg.width, self.cfg.height, self.cfg.fps)
            except SourceError as error:
                self._failed(str(error))
                replay = False
                continue
            log.log(logging.DEBUG if replay else logging.INFO, "detector: reading %s (%s)", source.label,
                    describe(capture))
            self.source_label, replay = source.label, False
            if source.ends:
                try:
                    read = yield from self._read_file(capture)
                finally:
                    capture.release()
            else:
                read = yield from self._read_live(capture)  # the reading thread releases the capture
            if self.runtime.stop.is_set():
                return
            if source.ends and read:
                self._delay = self.cfg.reopen_min
                if not self.cfg.loop:
                    self.ended = True
                    log.info("detector: %s ended after %d frames", source.label, read)
                    return
                log.debug("detector: %s ended after %d frames; playing it again", source.label, read)
                replay = True
                continue
            if read:
                self._delay = self.cfg.reopen_min
            self._failed(f"{source.label}: no frame could be read" if not read
                         else f"{source.label}: stopped delivering frames after {read}")

    def _read_file(self, capture: cv2.VideoCapture):
        """Yield a file's frames, in real time when ``fps`` is set; returns how many were read or skipped."""
        rate = capture.get(cv2.CAP_PROP_FPS)
        rate = rate if 0 < rate < 1000 else 25.0
        pace = self.cfg.fps
        started = time.monotonic()
        read = 0
        while not self.runtime.stop.is_set():
            if pace:
                read += self._skip_overdue(capture, int((time.monotonic() - started) * pace) - read)
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            read += 1
            self._number += 1
            self._file_frames += 1
            yield frame, self._number, now_ms(), self._file_frames / rate
            if pace:
                self.runtime.stop.wait(max(0.0, started + read / pace - time.monotonic()))
        return read

    def _skip_overdue(self, capture: cv2.VideoCapture, overdue: int) -> int:
        """Pass over ``overdue`` frames without decoding them, as a camera drops frames nobody took."""
        skipped = 0
        while skipped < overdue and capture.grab():
            skipped += 1
        if skipped:
            self._number += skipped
            self._file_frames += skipped
            self.runtime.count("frames_skipped", skipped)
        return skipped

    def _read_live(self, capture: cv2.VideoCapture):
        """Yield the newest frame of a live source each time; returns how many were taken."""
        latest = LatestFrame(capture)
        taken = 0
        try:
            while (item := latest.take(self.runtime.stop)) is not None:
                frame, captured_ms, skipped = item
                if skipped:
                    self._number += skipped
                    self.runtime.count("frames_skipped", skipped)
                taken += 1
                self._number += 1
                yield frame, self._number, captured_ms, time.monotonic()
        finally:
            latest.close()
        return taken

    def _failed(self, reason: str) -> None:
        """Log and count a source failure, then wait (beating) before the next attempt."""
        self.runtime.count("source_errors")
        log.warning("detector: %s; retrying in %.1fs", reason, self._delay)
        deadline = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.cfg.reopen_max)
        while not self.runtime.stop.is_set():
            self.runtime.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.runtime.stop.wait(min(left, 0.5))


class LatestFrame:
    """Reads a live capture on its own thread and keeps only the newest frame.

    Cameras and streams buffer frames: a detector that falls behind for a
    moment would otherwise work through stale frames for seconds, and their
    age would not show in any latency figure. Reading continuously and keeping
    one frame means :meth:`take` always returns the newest, stamped with the
    time it was read, and says how many were replaced before anyone took them.
    The thread owns the capture and releases it when it ends.
    """

    def __init__(self, capture: cv2.VideoCapture):
        self._capture = capture
        self._cond = threading.Condition()
        self._newest: tuple[np.ndarray, int] | None = None
        self._replaced = 0
        self._ended = False
        self._closing = False
        self._thread = threading.Thread(target=self._read, name="facehub-capture", daemon=True)
        self._thread.start()

    def take(self, stop: threading.Event) -> tuple[np.ndarray, int, int] | None:
        """``(frame, captured_ms, frames skipped before it)``; None once the source ends or ``stop`` is set.

        Blocks while the source delivers nothing: a camera that hangs stops the
        heartbeat, and the supervisor restarts the detector.
        """
        with self._cond:
            while self._newest is None and not self._ended and not stop.is_set():
                self._cond.wait(0.1)
            if self._newest is None:
                return None
            (frame, captured_ms), self._newest = self._newest, None
            skipped, self._replaced = self._replaced, 0
            return frame, captured_ms, skipped

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
        self._thread.join(timeout)

    def _read(self) -> None:
        try:
            while not self._closing:
                try:
                    ok, frame = self._capture.read()
                except cv2.error as error:  # a driver or decoder failure: the source has failed, reopen it
                    log.warning("detector: reading the source failed: %s", error)
                    break
                with self._cond:
                    if not ok or frame is None:
                        break
                    if self._newest is not None:
                        self._replaced += 1
                    self._newest = (frame, now_ms())
                    self._cond.notify()
        finally:
            self._capture.release()
            with self._cond:
                self._ended = True
                self._cond.notify_all()


def now_ms() -> int:
    return int(time.time() * 1000)


def read_frame(capture: cv2.VideoCapture) -> np.ndarray | None:
    """One frame, or None at the end or on failure (the capture stage, for benchmarks)."""
    ok, frame = capture.read()
    return frame if ok else None


# -- detect, track, crop + encode --------------------------------------------------------------


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

    * *inline*: on every ``detect_every``-th frame itself, which then waits for
      it: the same faces however fast frames come, the right thing for a file
      read as fast as possible;
    * *background*: on a thread of its own (OpenCV releases the GIL, so it runs
      on another core when there is one) while every frame only follows the
      tracked faces. When a search ends, the faces it found that are not
      tracked yet are looked for again, near where they were, in the frame at
      hand: their first crop comes from the newest frame, not from one a search
      old, and no frame waits for a search. A face the quick re-find misses is
      used at the position the search found.
    """

    def __init__(self, cfg: DetectorConfig, device_id: str, background: bool = False):
        self.cfg = cfg
        self.device_id = device_id
        self.backend = make_backend(cfg)
        self.tracker = Tracker(cfg.track_iou, cfg.dedup_interval, cfg.track_timeout, cfg.dedup_policy)
        self._until_detect = 0
        self.search_ms: list[float] = []  # how long each full search took, until the caller takes them
        # OpenCV's detectors keep per-image state: the search thread gets a backend of its own
        self.searcher = BackgroundSearch(make_backend(cfg), self.search_ms) if background else None

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
        tracked = self.tracker.boxes()
        found = [d for d in self.searcher.take() if not any(same_face(d, box) for box in tracked)]
        self._until_detect -= 1
        if self._until_detect <= 0 and self.searcher.submit(frame):
            self._until_detect = self.cfg.detect_every
        boxes = tracked + [d.box for d in found]
        located = self.backend.follow(frame, boxes) if boxes else []
        missed = [d for d in found if not any(same_face(d, hit) for hit in located)]
        return located + missed

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

    def take(self) -> list[Detection]:
        """The faces of the last search if it has ended (once), else nothing; re-raises its error."""
        if self._running is None or not self._running.done():
            return []
        found, self._running = self._running.result(), None
        return found

    def wait(self, timeout: float | None = None) -> None:
        """Block until the running search (if any) has ended: lets a test step frames deterministically."""
        if self._running is not None:
            self._running.exception(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._running = None


def timed_search(backend, frame: np.ndarray, durations: list[float]) -> list[Detection]:
    """``backend.detect(frame)``, noting how long it took (list.append is atomic across threads)."""
    started = time.perf_counter()
    found = backend.detect(frame)
    durations.append((time.perf_counter() - started) * 1000)
    return found


def lower_priority(nice: int = None) -> None:
    """Make the calling thread nicer (Linux schedules threads one by one); harmless where unsupported."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SEARCH_NICE if nice is None else nice)
    except (AttributeError, OSError) as error:
        log.debug("detector: cannot lower the search thread's priority: %s", error)


def search_in_background(cfg: DetectorConfig) -> bool:
    """``detector.search``: "auto" searches in the background unless frames come from a file read flat out."""
    if cfg.search != "auto":
        return cfg.search == "background"
    return not (parse_source(cfg.source).ends and cfg.fps <= 0)


# -- publish -----------------------------------------------------------------------------------


class FacePublisher:
    """Publishes faces from a bounded queue on its own thread.

    ``put`` never blocks: capture goes on while the broker is away, and when the
    queue is full the oldest face is dropped and counted (``faces_dropped``).
    The thread hands faces to the MQTT client only while connected and while
    fewer than :data:`PUBLISH_WINDOW` await acknowledgement, so memory stays
    bounded by the queue size. A face counts as published when the broker
    acknowledges it (QoS 1/2) or it was written to the socket (QoS 0).
    """

    def __init__(self, config: Config, runtime: Runtime, client_id: str | None = None):
        self.broker = config.local
        self.topic = config.topic
        self.qos = config.local.qos
        self.capacity = config.detector.queue_size
        self.runtime = runtime
        self.queue: deque[Face] = deque()
        self.inflight: dict[int, Face] = {}
        self._acked_early: dict[int, object] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._abandon = False
        self._last_drop_log = 0.0
        self.client = mqtt.make_client(self.broker, client_id or f"facehub-detector-{config.device_id}")
        self.state = mqtt.ConnectionState("detector -> local broker")
        self.state.attach(self.client)
        self.client.on_publish = self._on_publish
        self._thread = threading.Thread(target=self._run, name="facehub-publisher", daemon=True)

    def start(self) -> None:
        mqtt.start(self.client, self.broker, persistent=True)
        self._thread.start()

    def put(self, face: Face) -> None:
        """Queue a face for publishing; drops (and counts) the oldest when the queue is full."""
        with self._cond:
            if len(self.queue) >= self.capacity:
                self.queue.popleft()
                self.runtime.count("faces_dropped")
                self._log_drop()
            self.queue.append(face)
            self._cond.notify()
        self.runtime.gauge("queue_depth", len(self.queue))

    def pending(self) -> int:
        """Faces queued or awaiting acknowledgement."""
        with self._cond:
            return len(self.queue) + len(self.inflight)

    def wait_idle(self, runtime: Runtime) -> None:
        """Wait (beating) until every queued face is acknowledged, or until stopped."""
        while self.pending() and not runtime.stop.is_set():
            runtime.beat()
            runtime.stop.wait(0.1)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what can be sent within ``timeout``, then disconnect; what is left is counted dropped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self.queue or self.inflight) and self.state.connected.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
            self._abandon = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        mqtt.stop(self.client)
        with self._cond:
            lost = len(self.queue) + len(self.inflight)
            self.queue.clear()
            self.inflight.clear()
        if lost:
            self.runtime.count("faces_dropped", lost)
            log.warning("detector: %d faces not confirmed by the broker at shutdown (counted as dropped)", lost)

    def publish_one(self, face: Face) -> MQTTErrorCode:
        """Hand one face to the MQTT client (the publish stage, for benchmarks)."""
        info = self.client.publish(self.topic, face.image, qos=self.qos, properties=face.properties())
        with self._cond:
            taken = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
                info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.qos > 0)  # kept and resent by paho
            if taken:
                reason = self._acked_early.pop(info.mid, None)
                if reason is None:
                    self.inflight[info.mid] = face
                else:
                    self._done(face, reason)
            else:
                self.queue.appendleft(face)
        return info.rc

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready():
                    if self._abandon or (self._closing and not self.queue):
                        return
                    self._cond.wait(0.1)
                face = self.queue.popleft()
            if self.publish_one(face) not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                time.sleep(0.05)  # the client refused it (queue full, bad state): back off briefly

    def _ready(self) -> bool:
        return bool(self.queue) and self.state.connected.is_set() and len(self.inflight) < PUBLISH_WINDOW \
            and not self._abandon

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            face = self.inflight.pop(mid, None)
            if face is None:
                self._acked_early[mid] = reason_code
                return
            self._done(face, reason_code)
            self._cond.notify_all()

    def _done(self, face: Face, reason_code) -> None:
        if getattr(reason_code, "is_failure", False):
            self.runtime.count("faces_dropped")
            log.warning("detector: broker refused face %s: %s", face.face_id, reason_code)
            return
        self.runtime.count("faces_published")
        self.runtime.observe("publish_latency_ms", time.time() * 1000 - face.captured_ms)

    def _log_drop(self) -> None:
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.warning("detector: publish queue full (%d faces; broker unreachable?): dropping the oldest",
                        self.capacity)


# -- facehub detect ------------------------------------------------------------------------------


def detect_command(config: Config, paths: Sequence[str]) -> int:
    """``facehub detect IMAGE...``: one JSON line per image with the boxes the configured detector finds.

    Boxes are ``[x, y, w, h]`` in the image's own pixels. An unreadable image
    gives a line with an ``error`` key and exit code 1; the others are still done.
    """
    quiet_opencv()
    cv2.setNumThreads(opencv_threads(config.detector.threads))
    try:
        backend = make_backend(config.detector)
    except ValueError as error:
        print(json.dumps({"error": str(error)}), flush=True)
        return 2
    status = 0
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            reason = "no such file" if not Path(path).exists() else "not an image OpenCV can read"
            print(json.dumps({"file": path, "error": reason}), flush=True)
            status = 1
            continue
        faces = backend.detect(image)
        print(json.dumps({"file": path, "faces": [[d.x, d.y, d.w, d.h] for d in faces]}), flush=True)
    return status


def quiet_opencv() -> None:
    """Keep OpenCV's own warnings (failed camera probes...) out of the log: we log the reason ourselves."""
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass
