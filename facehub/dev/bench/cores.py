"""Two cores for the full search: OpenCV's own threads against a pool of processes.

The full search is the detector's one expensive step, so it is the one worth
spreading over cores. Two ways are measured on the same frames:

* *OpenCV threads*: ``cv2.setNumThreads(n)``, one process; OpenCV splits each
  search across its threads (what the detector does, with ``threads = 0``);
* *process pool*: ``n`` worker processes, one OpenCV thread each, searching
  different frames at once. Frames are not pickled: they sit in one
  ``multiprocessing.shared_memory`` block and a worker is sent only a frame's
  index; only the boxes come back.

Both are reported as full searches per second, beside one thread on one core.
The pool keeps both cores busy on whole frames, so it can win on throughput,
but each frame still takes a whole single-thread search (latency), and frames
must be copied into shared memory first (that copy is timed too).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context, shared_memory

import cv2
import numpy as np

from facehub.config import DetectorConfig
from facehub.edge.detection import make_backend

_worker: dict = {}  # per worker process: the backend and the shared frames


@dataclass
class CoresRun:
    name: str
    searches: int
    seconds: float
    faces: int  # found over all searches: the ways must agree
    copy_ms: float = 0.0  # per frame, into shared memory

    @property
    def rate(self) -> float:
        return self.searches / self.seconds if self.seconds else 0.0


def one_process(frames: list[np.ndarray], cfg: DetectorConfig, threads: int) -> CoresRun:
    """Full searches, one after the other, with ``threads`` OpenCV threads."""
    cv2.setNumThreads(threads)
    backend = make_backend(cfg)
    backend.detect(frames[0])  # warm up: allocations, OpenCV's thread pool
    started = time.perf_counter()
    faces = sum(len(backend.detect(frame)) for frame in frames)
    name = "one thread" if threads == 1 else f"OpenCV threads ({threads})"
    return CoresRun(name, len(frames), time.perf_counter() - started, faces)


def process_pool(frames: list[np.ndarray], cfg: DetectorConfig, workers: int) -> CoresRun:
    """Full searches spread over ``workers`` processes reading the frames from shared memory."""
    stack = np.stack(frames)
    block = shared_memory.SharedMemory(create=True, size=stack.nbytes)
    try:
        shared = np.ndarray(stack.shape, stack.dtype, buffer=block.buf)
        started = time.perf_counter()
        shared[:] = stack
        copy_ms = (time.perf_counter() - started) * 1000 / len(frames)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                 initargs=(block.name, stack.shape, cfg)) as pool:
            list(pool.map(_search, range(workers)))  # every worker loaded and warm
            started = time.perf_counter()
            found = list(pool.map(_search, range(len(frames))))
            seconds = time.perf_counter() - started
        del shared
    finally:
        block.close()
        block.unlink()
    return CoresRun(f"process pool ({workers}, shared memory)", len(found), seconds, sum(map(len, found)), copy_ms)


def _start_worker(name: str, shape: tuple, cfg: DetectorConfig) -> None:
    cv2.setNumThreads(1)
    block = shared_memory.SharedMemory(name=name)
    _worker.update(block=block, frames=np.ndarray(shape, np.uint8, buffer=block.buf), backend=make_backend(cfg))


def _search(index: int) -> list[tuple[int, int, int, int]]:
    return [d.box for d in _worker["backend"].detect(_worker["frames"][index])]


def compare(frames: list[np.ndarray], cfg: DetectorConfig, cores: int = 2) -> list[CoresRun]:
    return [one_process(frames, cfg, 1), one_process(frames, cfg, cores), process_pool(frames, cfg, cores)]


def table(runs: list[CoresRun]) -> str:
    base = runs[0].rate
    lines = ["| full search on | searches | faces found | seconds | searches/s | speed-up "
             "| copy into shared memory ms/frame |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        copy = f"{r.copy_ms:.2f}" if r.copy_ms else "-"
        lines.append(f"| {r.name} | {r.searches} | {r.faces} | {r.seconds:.1f} | {r.rate:.1f} | {r.rate / base:.2f}x | {copy} |")
    return "\n".join(lines)
