"""Motion quality: what a detector sends from a moving camera, scored against the true box of every face in every frame.

Clips are made at bench time from the labelled photos (never stored in the
project): the photos of a split are laid side by side on one strip and a
640x480 camera pans across it, or zooms in and out of its first photo, at a
given speed in pixels per frame, with sensor noise. The labelled boxes are
carried into every frame by the same transform, so every published crop can be
judged in its own frame:

* a crop whose box overlaps a face's true box at IoU >= 0.4 *captures* it;
* a crop that overlaps a face less than that is *off-centre* (cut at a stale
  or wrong position: it shows part of a face);
* a crop that overlaps no face is *false*.

*Coverage* is the share of the faces fully in view at some point that were
captured at least once; *crops per face* is all crops over those faces.

Frames are delivered at camera pace by :func:`facehub.dev.bench.detector.camera`
(30 fps, a one-frame buffer: frames a busy detector misses are skipped), so a
slow search costs what it costs on a camera. Each detector setting runs in a
worker process of its own, which :class:`QuarterCore` can put in a cgroup
limited to a quarter of one core.

The labelled photos are split in two: ``tuned`` (the ones the defaults were
chosen on) and ``held-back`` (only ever reported); ``dogs.jpg`` (no face) is
cut in two, its left half with the tuned photos, its right half with the
held-back ones.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from facehub.dev.bench.quality import MATCH_IOU, NEGATIVE, SPLITS, labelled_photos
from facehub.edge.detection.crop import clip_box, intersection, iou

WIDTH, HEIGHT = 640, 480
RATE = 30.0
SCENE_HEIGHT = 528  # the strip is a little taller than a frame: pans also move up and down
BACKGROUND = 114  # grey around the strip
ZOOM_RANGE = 1.6  # a zoom clip goes from 1x to this and back
ZOOM_RADIUS = 400.0  # a frame corner's distance from the centre: it moves ``speed`` px per frame

Box = tuple[int, int, int, int]


# -- clips -------------------------------------------------------------------------------------


@dataclass
class Clip:
    """A camera moving over a scene: one ``(scale, tx, ty)`` per frame maps scene pixels into the frame."""

    name: str
    scene: np.ndarray
    faces: list[tuple[float, float, float, float]]  # true boxes in scene pixels; the index is the face's id
    moves: list[tuple[float, float, float]]

    def __len__(self) -> int:
        return len(self.moves)

    def frame(self, index: int) -> np.ndarray:
        scale, tx, ty = self.moves[index]
        matrix = np.float32([[scale, 0, tx], [0, scale, ty]])
        frame = cv2.warpAffine(self.scene, matrix, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(BACKGROUND,) * 3)
        noise = np.random.default_rng(index).integers(0, 6, frame.shape, dtype=np.uint8)
        return cv2.add(frame, noise)

    def frames(self) -> list[np.ndarray]:
        return [self.frame(index) for index in range(len(self))]

    def truth(self, index: int) -> list[tuple[float, float, float, float]]:
        """Every face's true box in frame ``index`` (unclipped: it may reach out of the frame)."""
        scale, tx, ty = self.moves[index]
        return [(x * scale + tx, y * scale + ty, w * scale, h * scale) for x, y, w, h in self.faces]

    def in_view(self) -> set[int]:
        """The faces fully inside the frame in at least one frame."""
        seen = set()
        for index in range(len(self)):
            for face, (x, y, w, h) in enumerate(self.truth(index)):
                if x >= 0 and y >= 0 and x + w <= WIDTH and y + h <= HEIGHT:
                    seen.add(face)
        return seen


def strip(folder: Path, split: str) -> tuple[np.ndarray, list, list[tuple[int, int]]]:
    """The split's photos side by side at :data:`SCENE_HEIGHT`, then its half of ``dogs.jpg``.

    Returns the scene, the true face boxes in scene pixels and each photo's (left, width).
    """
    labels = labelled_photos(folder)
    parts, faces, places, left = [], [], [], 0
    for name in SPLITS[split]:
        image = cv2.imread(str(Path(folder) / name))
        scale = SCENE_HEIGHT / image.shape[0]
        image = cv2.resize(image, (round(image.shape[1] * scale), SCENE_HEIGHT), interpolation=cv2.INTER_AREA)
        faces += [(x * scale + left, y * scale, w * scale, h * scale) for x, y, w, h in labels[name]]
        parts.append(image)
        places.append((left, image.shape[1]))
        left += image.shape[1]
    dogs = cv2.imread(str(Path(folder) / NEGATIVE))
    if dogs is not None:
        half = dogs.shape[1] // 2
        dogs = dogs[:, :half] if split == "tuned" else dogs[:, half:]
        parts.append(cv2.resize(dogs, (round(dogs.shape[1] * SCENE_HEIGHT / dogs.shape[0]), SCENE_HEIGHT),
                                interpolation=cv2.INTER_AREA))
    return np.hstack(parts), faces, places


def make_clip(folder: Path, split: str, motion: str) -> Clip:
    """``motion`` is ``pan:SPEED`` (across the strip) or ``zoom:SPEED`` (into the first photo and out)."""
    kind, _, speed_text = motion.partition(":")
    speed = float(speed_text or 2)
    scene, faces, places = strip(folder, split)
    if kind == "pan":
        travel = scene.shape[1] - WIDTH
        rise = (SCENE_HEIGHT - HEIGHT) / 2
        moves = [(1.0, -min(travel, speed * i), -rise * (1 + math.sin(i * speed / 40))) for i in
                 range(int(travel / speed) + 1)]
    elif kind == "zoom":
        left, width = places[0]
        cx, cy = left + width / 2, SCENE_HEIGHT / 2
        steps = int(math.log(ZOOM_RANGE) / math.log(1 + speed / ZOOM_RADIUS))
        scales = [(1 + speed / ZOOM_RADIUS) ** i for i in range(steps + 1)]
        scales += scales[-2::-1]
        moves = [(s, WIDTH / 2 - s * cx, HEIGHT / 2 - s * cy) for s in scales]
    else:
        raise ValueError(f"unknown motion {motion!r}: pan:SPEED or zoom:SPEED")
    return Clip(f"{kind} {speed:g} px/frame", scene, faces, moves)


# -- scoring -----------------------------------------------------------------------------------


@dataclass
class MotionScore:
    faces: int = 0  # fully in view at some point
    captured: int = 0
    crops: int = 0
    false: int = 0
    off_centre: int = 0
    frames: int = 0  # delivered to the detector
    skipped: int = 0  # missed while it was busy

    @property
    def coverage(self) -> float:
        return self.captured / self.faces if self.faces else 1.0

    @property
    def false_share(self) -> float:
        return self.false / self.crops if self.crops else 0.0

    @property
    def off_centre_share(self) -> float:
        return self.off_centre / self.crops if self.crops else 0.0

    @property
    def per_face(self) -> float:
        return self.crops / self.faces if self.faces else 0.0

    def __add__(self, other: MotionScore) -> MotionScore:
        return MotionScore(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def score(clip: Clip, crops: list[tuple[int, Box]]) -> MotionScore:
    """Judge ``(frame index, box)`` crops against the true boxes of their own frames."""
    in_view = clip.in_view()
    captured: set[int] = set()
    result = MotionScore(faces=len(in_view), crops=len(crops))
    for index, box in crops:
        truth = [clip_box(face, WIDTH, HEIGHT) for face in clip.truth(index)]
        overlaps = [(iou(box, face), number) for number, face in enumerate(truth) if face[2] and face[3]]
        best, face = max(overlaps, default=(0.0, -1))
        if best >= MATCH_IOU:
            captured.add(face)
        elif any(intersection(box, other) for other in truth):
            result.off_centre += 1
        else:
            result.false += 1
    result.captured = len(captured & in_view)
    return result


# -- running a detector over a clip at camera pace ---------------------------------------------


@dataclass
class Setting:
    """A row of the table: the typical implementation, or FaceHub with some detector settings."""

    name: str
    overrides: dict = field(default_factory=dict)  # DetectorConfig fields over ``base``
    typical: bool = False
    base: object = None  # the DetectorConfig the overrides apply to (None: the built-in defaults)


def settings(model: Path | None, base=None) -> list[Setting]:
    """The typical implementation, then each backend in each search mode (YuNet when ``model`` exists)."""
    rows = [Setting("typical: Haar detectMultiScale(gray, 1.3, 5), every frame", typical=True)]
    backends = [("haar", {"backend": "haar"})]
    if model is not None and Path(model).is_file():
        backends.append(("yunet", {"backend": "yunet", "model_path": str(model)}))
    for name, overrides in backends:
        for search in ("background", "inline"):
            rows.append(Setting(f"facehub {name}, search {search}", {**overrides, "search": search}, base=base))
    return rows


def run(clip: Clip, frames: list[np.ndarray], setting: Setting, rate: float) -> tuple[list, MotionScore]:
    """The crops ``setting`` publishes from ``frames`` delivered at ``rate`` (0 = every frame, unpaced)."""
    import dataclasses

    from facehub.config import DetectorConfig, opencv_threads
    from facehub.dev.bench import baseline
    from facehub.dev.bench.detector import Latency, camera
    from facehub.edge.detection.finder import FaceFinder

    pace = Latency(setting.name, 0)
    indices = camera(list(range(len(frames))), rate, pace) if rate > 0 else ((i, 0) for i in range(len(frames)))
    crops: list[tuple[int, Box]] = []
    if setting.typical:
        cv2.setNumThreads(opencv_threads(0))
        detector = baseline.TypicalDetector()
        for index, _ in indices:
            crops += [(index, tuple(box)) for box in detector.detect(frames[index])]
    else:
        cfg = dataclasses.replace(setting.base or DetectorConfig(), **setting.overrides)
        cv2.setNumThreads(opencv_threads(cfg.threads))
        finder = FaceFinder(cfg, "bench", background=cfg.search == "background")
        try:
            for index, _ in indices:
                frame = frames[index]
                faces, _ = finder.select(finder.locate(frame), frame, index, int(index * 1000 / RATE), index / RATE)
                crops += [(face.frame, tuple(face.box)) for face in faces]
        finally:
            finder.close()
    if rate <= 0:
        pace.frames = len(frames)
    result = score(clip, crops)
    result.frames, result.skipped = pace.frames, pace.skipped
    return crops, result


def run_worker(folder: str, split: str, motions: tuple[str, ...], setting: Setting, rate: float,
               cgroup: str | None) -> list[MotionScore]:
    """In a worker process: make the clips, join ``cgroup`` (if any), run ``setting`` over each clip."""
    clips = [make_clip(Path(folder), split, motion) for motion in motions]
    rendered = [clip.frames() for clip in clips]
    if cgroup:
        QuarterCore.join(cgroup)
    return [run(clip, frames, setting, rate)[1] for clip, frames in zip(clips, rendered)]


# -- a quarter of one core -------------------------------------------------------------------


class CgroupError(RuntimeError):
    pass


class QuarterCore:
    """A cgroup limited to a quarter of one CPU (25 ms of every 100 ms, on one cpuset CPU), removed on exit.

    cgroup v2 (``/sys/fs/cgroup/cgroup.controllers``) or v1 (``cpu`` and
    ``cpuset`` hierarchies); creating one needs root. A process joins it with
    :meth:`join`, writing its own pid.
    """

    ROOT = Path("/sys/fs/cgroup")
    QUOTA, PERIOD = 25000, 100000

    def __init__(self, name: str = ""):
        self.name = name or f"facehub-bench-{os.getpid()}"
        self.cpu = sorted(os.sched_getaffinity(0))[-1]
        self.paths: list[Path] = []

    def __enter__(self) -> QuarterCore:
        if os.geteuid() != 0:
            raise CgroupError("a quarter-core cgroup needs root (it creates a group under /sys/fs/cgroup)")
        try:
            if (self.ROOT / "cgroup.controllers").is_file():
                self._make_v2()
            elif (self.ROOT / "cpu").is_dir() and (self.ROOT / "cpuset").is_dir():
                self._make_v1()
            else:
                raise CgroupError(f"no cpu and cpuset cgroup controllers under {self.ROOT}")
        except OSError as error:
            self.__exit__(None, None, None)
            raise CgroupError(f"cannot create the quarter-core cgroup: {error}") from None
        return self

    def _make_v2(self) -> None:
        controllers = (self.ROOT / "cgroup.controllers").read_text().split()
        if not {"cpu", "cpuset"} <= set(controllers):
            raise CgroupError(f"cgroup v2 at {self.ROOT} lacks the cpu or cpuset controller ({controllers})")
        (self.ROOT / "cgroup.subtree_control").write_text("+cpu +cpuset")
        path = self.ROOT / self.name
        path.mkdir()
        self.paths.append(path)
        (path / "cpu.max").write_text(f"{self.QUOTA} {self.PERIOD}")
        (path / "cpuset.cpus").write_text(str(self.cpu))

    def _make_v1(self) -> None:
        cpu, cpuset = self.ROOT / "cpu" / self.name, self.ROOT / "cpuset" / self.name
        cpu.mkdir()
        self.paths.append(cpu)
        (cpu / "cpu.cfs_period_us").write_text(str(self.PERIOD))
        (cpu / "cpu.cfs_quota_us").write_text(str(self.QUOTA))
        cpuset.mkdir()
        self.paths.append(cpuset)
        (cpuset / "cpuset.cpus").write_text(str(self.cpu))
        (cpuset / "cpuset.mems").write_text((self.ROOT / "cpuset" / "cpuset.mems").read_text().strip())

    @property
    def procs(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to."""
        return [str(path / "cgroup.procs") for path in self.paths]

    @staticmethod
    def join(procs: str) -> None:
        """Move the calling process into the group (``procs``: its ``cgroup.procs`` files, comma-separated)."""
        for path in procs.split(","):
            Path(path).write_text(str(os.getpid()))

    def __exit__(self, *exc) -> None:
        for path in reversed(self.paths):
            for _ in range(50):  # a worker that just exited may take a moment to leave
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self.paths.clear()


def measure(folder: Path, split: str, motions: tuple[str, ...], rows: list[Setting], rate: float = RATE,
            quarter_core: bool = False) -> dict[str, list[MotionScore]]:
    """Each setting over the split's clips, each in a fresh worker process (in a quarter-core cgroup if asked)."""
    results = {}
    for setting in rows:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            if quarter_core:
                with QuarterCore() as group:
                    future = pool.submit(run_worker, str(folder), split, motions, setting, rate, ",".join(group.procs))
                    results[setting.name] = future.result()
                    pool.shutdown(wait=True)
            else:
                results[setting.name] = pool.submit(run_worker, str(folder), split, motions, setting, rate,
                                                    None).result()
    return results


def table(results: dict[str, list[MotionScore]], motions: tuple[str, ...]) -> str:
    """One Markdown row per setting and clip, and one over all clips."""
    lines = ["| detector | clip | frames delivered / skipped | faces in view | captured | coverage | crops "
             "| false | off-centre | false + off-centre | crops per face |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, scores in results.items():
        for motion, s in [*zip(motions, scores), ("all", sum(scores, MotionScore()))]:
            label = f"**{motion}**" if motion == "all" else motion
            lines.append(f"| {name} | {label} | {s.frames} / {s.skipped} | {s.faces} | {s.captured} | "
                         f"{s.coverage:.2f} | {s.crops} | {s.false_share:.0%} | {s.off_centre_share:.0%} | "
                         f"{s.false_share + s.off_centre_share:.0%} | {s.per_face:.2f} |")
    return "\n".join(lines)


def trail_cost(folder: Path, faces: int = 7, kept: int = 30, repeats: int = 5) -> tuple[float, float]:
    """What carrying costs at 640x480 on one OpenCV thread: ms to keep a frame, ms per kept frame to carry ``faces``."""
    from facehub.edge.detection.trail import Trail

    clip = make_clip(folder, "tuned", "pan:2")
    frames = [clip.frame(index) for index in range(kept + 1)]
    boxes = sorted(clip.truth(0), key=lambda box: box[0])[:faces]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    keep = carry = float("inf")
    trail = Trail()
    try:
        for _ in range(repeats):
            trail.start(frames[0])
            started = time.perf_counter()
            for frame in frames[1:]:
                trail.add(frame)
            middle = time.perf_counter()
            trail.carry(boxes)
            ended = time.perf_counter()
            keep, carry = min(keep, (middle - started) / kept), min(carry, (ended - middle) / kept)
    finally:
        cv2.setNumThreads(threads)
    return keep * 1000, carry * 1000


def search_cost(folder: Path, model: Path | None, frames: int = 20) -> dict[str, float]:
    """Median ms of one full search of a 640x480 frame of the tuned pan clip, one thread pinned to one core."""
    import dataclasses
    import statistics

    from facehub.config import DetectorConfig
    from facehub.dev.bench import baseline
    from facehub.dev.bench.detector import on_cores
    from facehub.edge.detection import make_backend

    clip = make_clip(folder, "tuned", "pan:10")
    sample = [clip.frame(index) for index in range(0, len(clip), max(1, len(clip) // frames))]
    detectors = {"typical": baseline.TypicalDetector().detect,
                 "haar": make_backend(DetectorConfig(backend="haar")).detect}
    if model is not None and Path(model).is_file():
        detectors["yunet"] = make_backend(dataclasses.replace(DetectorConfig(), backend="yunet",
                                                              model_path=str(model))).detect
    threads = cv2.getNumThreads()
    costs = {}
    with on_cores(1):
        cv2.setNumThreads(1)
        try:
            for name, detect in detectors.items():
                detect(sample[0])  # warm up
                times = []
                for frame in sample:
                    started = time.perf_counter()
                    detect(frame)
                    times.append((time.perf_counter() - started) * 1000)
                costs[name] = statistics.median(times)
        finally:
            cv2.setNumThreads(threads)
    return costs
