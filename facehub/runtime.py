"""What a running component is handed: a stop event, a heartbeat and counters.

A component is one callable ``run(config, runtime)`` that works until
``runtime.stop`` is set. The same component runs in the foreground
(``facehub detector``) or as a supervised child process (``facehub run edge``);
only the runtime differs. Components call :meth:`Runtime.beat` from their main
loop: it proves to the supervisor that the loop is not stuck, and it publishes
the component's counters to a small JSON file that ``facehub health`` and the
demo read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

from facehub.files import write_atomic

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"
SAMPLES_KEPT = 10_000
# Histogram bucket bounds for observations in milliseconds (latencies, search times). Percentiles
# cannot be added up across processes (two savers), bucket counts can: /metrics exports these.
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)


class Runtime:
    """The services a component may use, independent of how it is run."""

    def __init__(self, name: str, stop: threading.Event | Any | None = None,
                 state_dir: str | os.PathLike | None = None,
                 heartbeat: Any | None = None, flush_interval: float = 1.0):
        self.name = name
        self.stop = stop if stop is not None else threading.Event()
        self.stats: Counter[str] = Counter()
        self.gauges: dict[str, Any] = {}
        self.samples: dict[str, deque] = {}
        self.histograms: dict[str, Histogram] = {}
        self.last_counted: dict[str, float] = {}  # counter -> wall time it last grew
        self._heartbeat = heartbeat
        self._lock = threading.Lock()
        self._flush_interval = flush_interval
        self._last_flush = 0.0
        self._stats_path = Path(state_dir) / f"{name}{STATS_SUFFIX}" if state_dir else None

    def count(self, key: str, amount: int = 1) -> None:
        """Add to a counter (thread-safe): faces published, rejected, dropped..."""
        with self._lock:
            self.stats[key] += amount
            self.last_counted[key] = time.time()

    def gauge(self, key: str, value: Any) -> None:
        """Set a point-in-time value, such as the spool depth."""
        with self._lock:
            self.gauges[key] = value

    def gauge_since(self, key: str, seconds: float | None) -> None:
        """Set ``key`` to the wall-clock time ``seconds`` ago (None: clear it), e.g. when a broker went down.

        Durations are measured inside the process on the monotonic clock; only
        the file gets a wall-clock time, because it is read by other processes
        (``facehub health --delivery``) that compare it with their own clock.
        The start is derived afresh at every update, so a wall-clock step moves
        it along instead of making an outage look years long.
        """
        self.gauge(key, None if seconds is None else round(time.time() - seconds, 3))

    def observe(self, key: str, value: float) -> None:
        """Record one measurement (a latency, in ms); the last ones are summarised as percentiles,
        and all of them are counted in histogram buckets."""
        with self._lock:
            self.samples.setdefault(key, deque(maxlen=SAMPLES_KEPT)).append(value)
            self.histograms.setdefault(key, Histogram()).add(value)

    def counter(self, key: str) -> int:
        """The current value of a counter (thread-safe): for tests and in-process readers."""
        with self._lock:
            return self.stats[key]

    def gauge_value(self, key: str, default: Any = None) -> Any:
        """The current value of a gauge (thread-safe)."""
        with self._lock:
            return self.gauges.get(key, default)

    def beat(self) -> None:
        """Say "still working" and flush counters at most once per interval.

        The heartbeat is on the monotonic clock (system-wide on Linux, so the
        supervisor can compare it with its own), never stepped by NTP.
        """
        now = time.monotonic()
        if self._heartbeat is not None:
            self._heartbeat.value = now
        if self._stats_path and now - self._last_flush >= self._flush_interval:
            self.flush()

    def flush(self) -> None:
        """Write the counters to ``<state_dir>/<name>.stats.json`` atomically."""
        if not self._stats_path:
            return
        self._last_flush = time.monotonic()
        with self._lock:
            data = {"name": self.name, "pid": os.getpid(), "updated": time.time(),
                    "counters": dict(self.stats), "gauges": dict(self.gauges),
                    "percentiles": {key: percentiles(values) for key, values in self.samples.items()},
                    "histograms": {key: histogram.as_dict() for key, histogram in self.histograms.items()},
                    "last_counted": dict(self.last_counted)}
        try:
            write_json_atomic(self._stats_path, data)
        except OSError as error:
            log.warning("cannot write stats to %s: %s", self._stats_path, error)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` unless stopped; True when stop was requested."""
        return self.stop.wait(seconds)

    def run_until_stopped(self, tick: Callable[[], None] | None = None, interval: float = 0.5) -> None:
        """Beat (and call ``tick``) every ``interval`` until stopped; for callback-driven components."""
        while not self.stop.is_set():
            if tick:
                tick()
            self.beat()
            self.stop.wait(interval)
        self.flush()


class Histogram:
    """Cumulative counts of observations per bucket bound of :data:`BUCKETS_MS`, their sum and count."""

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS_MS)
        self.sum = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for index, bound in enumerate(BUCKETS_MS):
            if value <= bound:
                self.counts[index] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": [[bound, count] for bound, count in zip(BUCKETS_MS, self.counts)],
                "sum": round(self.sum, 3), "count": self.count}


def percentiles(values) -> dict[str, float]:
    """count, p50, p95, p99 and max of the values (nearest-rank)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))], 3)

    return {"count": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99),
            "max": round(ordered[-1], 3)}


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON so readers never see half a file."""
    write_atomic(path, json.dumps(data, sort_keys=True).encode())


def read_stats(state_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every component's last flushed counters in ``state_dir``, by name."""
    result = {}
    for path in sorted(Path(state_dir).glob(f"*{STATS_SUFFIX}")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        result[data.get("name", path.name[: -len(STATS_SUFFIX)])] = data
    return result
