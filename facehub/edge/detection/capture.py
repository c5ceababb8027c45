"""The capture stage: frames from the configured source, never a backlog of stale ones.

:class:`FrameReader` opens the source (camera, file, stream, GStreamer
pipeline), reopens it with exponential backoff when it cannot be opened or
stops delivering, and plays files flat out or in real time. A live source is
read by :class:`LatestFrame`, a thread that keeps only the newest frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import cv2
import numpy as np

from facehub.backoff import Backoff
from facehub.config import DetectorConfig
from facehub.runtime import Runtime
from facehub.edge.detection.source import SourceError, describe, open_source

log = logging.getLogger(__name__)


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
        self._reopen = Backoff(cfg.reopen_min, cfg.reopen_max)
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
                self._reopen.reset()
                if not self.cfg.loop:
                    self.ended = True
                    log.info("detector: %s ended after %d frames", source.label, read)
                    return
                log.debug("detector: %s ended after %d frames; playing it again", source.label, read)
                replay = True
                continue
            if read:
                self._reopen.reset()
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
        delay = self._reopen.next()
        log.warning("detector: %s; retrying in %.1fs", reason, delay)
        deadline = self._reopen.retry_at
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
