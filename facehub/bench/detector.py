"""Detector speed: frames per second and time per stage, FaceHub against the typical implementation.

Frames are decoded once (the capture stage is timed on that pass), resized to
the resolution under test and then fed from memory to both detectors, so both
see the same frames and neither is timed on the codec. Each face is published
to a real local broker: FaceHub's JPEG crops at QoS 1 after duplicate
suppression, the typical implementation's PNG crops at QoS 0, every frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from .. import mqtt
from ..config import BrokerConfig, DetectorConfig, opencv_threads
from ..detector import FaceFinder
from . import baseline

STAGES = ("capture", "detect", "crop+encode", "publish")


@dataclass
class Run:
    """One detector run over a list of frames."""

    name: str
    width: int
    height: int
    threads: int
    frames: int = 0
    detected: int = 0
    sent: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def fps(self) -> float:
        busy = sum(v for k, v in self.seconds.items() if k != "capture")
        return self.frames / busy if busy else 0.0

    def ms_per_frame(self, stage: str) -> float:
        return 1000 * self.seconds[stage] / self.frames if self.frames else 0.0


def read_frames(source: str, limit: int = 0) -> tuple[list[np.ndarray], float]:
    """Decode up to ``limit`` frames (0 = all); returns them and the seconds spent per frame."""
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise ValueError(f"cannot open source {source!r}")
    frames, started = [], time.perf_counter()
    while not limit or len(frames) < limit:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    if not frames:
        raise ValueError(f"source {source!r} gave no frames")
    return frames, (time.perf_counter() - started) / len(frames)


def at_resolution(frames: list[np.ndarray], width: int, height: int, minimum: int = 300) -> list[np.ndarray]:
    """The frames resized to width x height, repeated until there are at least ``minimum``."""
    sized = [f if f.shape[1::-1] == (width, height) else cv2.resize(f, (width, height)) for f in frames]
    while len(sized) < minimum:
        sized += sized[: minimum - len(sized)]
    return sized


class Publisher:
    """A real MQTT client on a local broker, to time the publish stage."""

    def __init__(self, port: int):
        broker = BrokerConfig(port=port)
        self.client = mqtt.make_client(broker, f"bench-detector-{port}")
        state = mqtt.ConnectionState("bench-detector")
        state.attach(self.client)
        mqtt.start(self.client, broker, persistent=False)
        state.connected.wait(10)
        self.pending = []

    def publish(self, payload: bytes, qos: int, properties=None) -> None:
        info = self.client.publish("faces/bench", payload, qos, properties=properties)
        if qos:
            self.pending.append(info)

    def drain(self) -> None:
        for info in self.pending:
            info.wait_for_publish(30)
        self.pending.clear()

    def close(self) -> None:
        self.drain()
        mqtt.stop(self.client)


def run_facehub(frames: list[np.ndarray], cfg: DetectorConfig, publisher: Publisher | None, fps: float,
                capture_s: float) -> Run:
    """FaceHub's detector: downscaled detection, tracking, duplicate suppression, JPEG at QoS 1."""
    height, width = frames[0].shape[:2]
    cv2.setNumThreads(opencv_threads(cfg.threads))
    finder = FaceFinder(cfg, "bench")
    run = Run("facehub", width, height, opencv_threads(cfg.threads))
    run.seconds["capture"] = capture_s * len(frames)
    for number, frame in enumerate(frames):
        t0 = time.perf_counter()
        detections = finder.locate(frame)
        t1 = time.perf_counter()
        faces, _ = finder.select(detections, frame, number, int(number * 1000 / fps), number / fps)
        t2 = time.perf_counter()
        if publisher:
            for face in faces:
                publisher.publish(face.image, 1, face.properties())
        t3 = time.perf_counter()
        run.frames += 1
        run.detected += len(detections)
        run.sent += len(faces)
        for stage, seconds in zip(STAGES[1:], (t1 - t0, t2 - t1, t3 - t2)):
            run.seconds[stage] += seconds
    if publisher:
        started = time.perf_counter()
        publisher.drain()
        run.seconds["publish"] += time.perf_counter() - started
    return run


def run_baseline(frames: list[np.ndarray], threads: int, publisher: Publisher | None, capture_s: float) -> Run:
    """The typical implementation on the same frames."""
    height, width = frames[0].shape[:2]
    cv2.setNumThreads(threads)
    detector = baseline.TypicalDetector()
    run = Run("typical", width, height, threads)
    run.seconds["capture"] = capture_s * len(frames)
    for frame in frames:
        t0 = time.perf_counter()
        boxes = detector.detect(frame)
        t1 = time.perf_counter()
        crops = baseline.encode_all(frame, boxes)
        t2 = time.perf_counter()
        if publisher:
            for crop in crops:
                publisher.publish(crop, 0)
        t3 = time.perf_counter()
        run.frames += 1
        run.detected += len(boxes)
        run.sent += len(crops)
        for stage, seconds in zip(STAGES[1:], (t1 - t0, t2 - t1, t3 - t2)):
            run.seconds[stage] += seconds
    return run


def table(runs: list[Run]) -> str:
    """The runs as a Markdown table."""
    lines = ["| detector | resolution | threads | frames | fps | capture ms | detect ms | crop+encode ms "
             "| publish ms | faces detected | faces sent | sent per frame |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.width}x{r.height} | {r.threads} | {r.frames} | {r.fps:.1f} | "
                     f"{r.ms_per_frame('capture'):.2f} | {r.ms_per_frame('detect'):.2f} | "
                     f"{r.ms_per_frame('crop+encode'):.2f} | {r.ms_per_frame('publish'):.2f} | {r.detected} | "
                     f"{r.sent} | {r.sent / r.frames:.2f} |")
    return "\n".join(lines)
