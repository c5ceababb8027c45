"""Detector speed and latency, FaceHub against the typical implementation.

Frames are decoded once (the capture stage is timed on that pass), resized to
the resolution under test and then fed from memory to both detectors, so both
see the same frames and neither is timed on the codec. Each face is published
to a real local broker: FaceHub's JPEG crops at QoS 1 after duplicate
suppression, the typical implementation's PNG crops at QoS 0, every frame.

Two measurements:

* *throughput* (:func:`run_facehub`, :func:`run_baseline`): frames fed flat
  out, the full search inline, so every search is paid for: frames per second
  and time per stage;
* *latency at camera rate* (:func:`paced_facehub`, :func:`paced_baseline`):
  frames delivered at a camera's rate by :func:`camera`, which, like a camera
  with a one-frame buffer, skips frames the detector is too busy to take;
  capture-to-published time per face.

"One thread" rows run on one core (CPU affinity), not just with one OpenCV
thread, so a background thread cannot borrow the second core.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from facehub import mqtt
from facehub.config import BrokerConfig, Config, DetectorConfig, opencv_threads
from facehub.edge.detector import FaceFinder, FacePublisher, search_in_background
from facehub.runtime import Runtime, percentiles
from facehub.dev.bench import baseline

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

    def record(self, detected: int, sent: int, *stage_seconds: float) -> None:
        """One frame: its faces and the seconds of detect, crop+encode and publish."""
        self.frames += 1
        self.detected += detected
        self.sent += sent
        for stage, seconds in zip(STAGES[1:], stage_seconds):
            self.seconds[stage] += seconds

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


def crowd_clip(photo: Path, out: Path, frames: int = 150, rate: float = 30.0) -> Path:
    """A 640x480 clip of a busy scene: a slow pan over ``photo`` enlarged to 800x600, with sensor noise.

    Made at bench time from the labelled photos (never stored in the project),
    so the detector is also measured where many faces are in view at once.
    """
    image = cv2.resize(cv2.imread(str(photo)), (800, 600))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), rate, (640, 480))
    noise = np.random.default_rng(1)
    for index in range(frames):
        x = int(160 * index / max(1, frames - 1))
        y = int(60 * (0.5 + 0.5 * np.sin(index / 20)))
        frame = image[y:y + 480, x:x + 640]
        writer.write(cv2.add(frame, noise.integers(0, 6, frame.shape, dtype=np.uint8)))
    writer.release()
    return out


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
        run.record(len(detections), len(faces), t1 - t0, t2 - t1, t3 - t2)
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
        run.record(len(boxes), len(crops), t1 - t0, t2 - t1, t3 - t2)
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


# -- latency at camera rate --------------------------------------------------------------------


@contextmanager
def on_cores(count: int) -> Iterator[None]:
    """Run this thread, and the threads it starts meanwhile, on ``count`` CPUs (all when 0)."""
    before = os.sched_getaffinity(0)
    if count:
        os.sched_setaffinity(0, sorted(before)[:count])
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Latency:
    """Capture-to-published times of one paced run."""

    name: str
    cores: int
    frames: int = 0
    skipped: int = 0
    faces: int = 0
    ms: dict = field(default_factory=dict)


def camera(frames: list[np.ndarray], rate: float, run: Latency) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(frame, captured_ms)`` as a camera delivering ``rate`` frames/s with a one-frame buffer.

    A frame is captured at its due time; when the consumer comes back later
    than the next frame's due time, the frames it missed are skipped (counted)
    and it gets the newest one, stamped with when that one was captured.
    """
    started = time.time()
    index = 0
    while index < len(frames):
        due = started + index / rate
        now = time.time()
        if now < due:
            time.sleep(due - now)  # the camera has not produced this frame yet
        else:
            newest = min(len(frames) - 1, int((now - started) * rate))
            run.skipped += newest - index
            index = newest
            due = started + index / rate
        run.frames += 1
        yield frames[index], int(due * 1000)
        index += 1


def paced_facehub(frames: list[np.ndarray], cfg: DetectorConfig, port: int, rate: float, cores: int,
                  name: str) -> Latency:
    """FaceHub's detector and real publisher (QoS 1, acknowledged) on frames delivered at ``rate``."""
    config = Config(device_id="bench-paced")
    config.local.port = port
    config.detector = cfg
    run = Latency(name, cores)
    runtime = Runtime("bench-paced")
    with on_cores(cores):
        cv2.setNumThreads(opencv_threads(cfg.threads))
        finder = FaceFinder(cfg, "bench", background=search_in_background(cfg))
        publisher = FacePublisher(config, runtime, client_id=f"bench-paced-{name}-{cores}")
        publisher.start()
        publisher.state.connected.wait(10)
        for number, (frame, captured_ms) in enumerate(camera(frames, rate, run), 1):
            detections = finder.locate(frame)
            faces, _ = finder.select(detections, frame, number, captured_ms, captured_ms / 1000)
            for face in faces:
                publisher.put(face)
        finder.close()
        publisher.wait_idle(runtime)
        publisher.close()
    run.faces = runtime.stats["faces_published"]
    run.ms = percentiles(runtime.samples.get("publish_latency_ms", ()))
    return run


def paced_baseline(frames: list[np.ndarray], publisher: Publisher, rate: float, cores: int) -> Latency:
    """The typical implementation on frames delivered at ``rate``: time until each PNG is handed to paho."""
    run = Latency("typical", cores)
    detector = baseline.TypicalDetector()
    samples = []
    with on_cores(cores):
        cv2.setNumThreads(max(cores, 1))
        for frame, captured_ms in camera(frames, rate, run):
            for crop in baseline.encode_all(frame, detector.detect(frame)):
                publisher.publish(crop, 0)
                samples.append(time.time() * 1000 - captured_ms)
    run.faces = len(samples)
    run.ms = percentiles(samples)
    return run


def latency_table(runs: list[Latency], rate: float) -> str:
    lines = [f"| detector | cores | frames delivered | frames skipped | faces published "
             f"| capture->published ms p50/p95/p99 (max) at {rate:g} fps |", "|---|---|---|---|---|---|"]
    for r in runs:
        ms = r.ms
        figures = f"{ms['p50']:.0f}/{ms['p95']:.0f}/{ms['p99']:.0f} ({ms['max']:.0f})" if ms.get("count") else "n/a"
        lines.append(f"| {r.name} | {r.cores} | {r.frames} | {r.skipped} | {r.faces} | {figures} |")
    return "\n".join(lines)


def latency_runs(frames: list[np.ndarray], cfg: DetectorConfig, port: int, publisher: Publisher,
                 rate: float, cores: list[int]) -> list[Latency]:
    """The typical implementation and FaceHub's search modes at camera rate, on 1 and 2 cores."""
    runs = []
    for count in cores:
        runs.append(paced_baseline(frames, publisher, rate, count))
        settings = [("facehub inline search, every detection", "inline", 0.0),
                    ("facehub background search, every detection", "background", 0.0),
                    ("facehub background search, defaults", "background", cfg.dedup_interval)]
        for name, search, interval in settings:
            paced = dataclasses.replace(cfg, search=search, dedup_interval=interval, threads=count)
            runs.append(paced_facehub(frames, paced, port, rate, count, name))
    return runs
