"""The detector component: camera frames in, one MQTT message per face out.

Four stages, each a small function or method a benchmark can time alone:

1. *capture* (``detection/capture.py``): :class:`FrameReader` reads frames from the configured source
   (camera, file, stream, GStreamer pipeline) and reopens it with exponential
   backoff when it cannot be opened or stops delivering; a video file that is
   not looped simply ends the component (exit 0, so it is not restarted).
2. *detect* (``detection/finder.py``): :meth:`FaceFinder.locate` runs a full search of a downscaled
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
frames). Gauges: ``queue_depth`` and ``local_down_since`` (when the edge broker went
out of reach, for ``facehub health --delivery``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import cv2
from paho.mqtt.enums import MQTTErrorCode

from facehub import mqtt
from facehub.config import Config, opencv_threads
from facehub.edge.detection import SAMPLE_CLIP, make_backend
from facehub.edge.detection.capture import FrameReader, LatestFrame, read_frame
from facehub.edge.detection.finder import BackgroundSearch, FaceFinder, search_in_background
from facehub.messages import Face
from facehub.runtime import Runtime

__all__ = ["SAMPLE_CLIP", "BackgroundSearch", "FaceFinder", "FacePublisher", "FrameReader", "LatestFrame",
           "detect_command", "read_frame", "run", "search_in_background"]

log = logging.getLogger(__name__)

PUBLISH_WINDOW = 100  # faces handed to the MQTT client and not yet acknowledged
CLOSE_TIMEOUT = 3.0  # seconds to finish sending queued faces when stopping
DROP_LOG_INTERVAL = 10.0


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
    log.info("detector: %s backend (%s), full search %s, publishing on %s at QoS %d", finder.backend.name,
             cfg.detection()[1], "in the background" if finder.background else "inline", config.topic,
             config.local.qos)
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
                self._report_connection()
                while not self._ready():
                    if self._abandon or (self._closing and not self.queue):
                        return
                    self._cond.wait(0.1)
                    self._report_connection()
                face = self.queue.popleft()
            if self.publish_one(face) not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                time.sleep(0.05)  # the client refused it (queue full, bad state): back off briefly

    def _report_connection(self) -> None:
        self.runtime.gauge_since("local_down_since", self.state.down_for())

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
        faces = backend.detect(image, still=True)
        print(json.dumps({"file": path, "faces": [[d.x, d.y, d.w, d.h] for d in faces]}), flush=True)
    return status


def quiet_opencv() -> None:
    """Keep OpenCV's own warnings (failed camera probes...) out of the log: we log the reason ourselves."""
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass
