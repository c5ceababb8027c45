"""Prometheus ``/metrics`` for a supervised role, served by the supervisor, covering all its children.

Each child already flushes its counters, gauges and histograms to
``<state_dir>/<name>.stats.json`` every second (``facehub.runtime``); a
collector turns those files into metrics at scrape time, so a child needs no
server of its own, a restarted child's counters simply restart (Prometheus
handles counter resets), and two savers' histograms add up. Generic, like the
supervisor: whatever a component counts becomes a metric.

* every counter ``k`` → ``facehub_<k>_total{component}``;
  a counter named ``k:reason`` → ``facehub_<k>_total{component, reason}``;
* every numeric or boolean gauge ``g`` → ``facehub_<g>{component}``;
* every histogram ``h_ms`` → ``facehub_<h>_seconds{component}`` (buckets in seconds);
* ``facehub_seconds_since_last{component, counter}``: time since a counter last grew
  (a camera that went quiet shows here);
* from the supervisor: ``facehub_child_up{component}``, ``facehub_child_restarts_total{component}``.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from facehub.runtime import read_stats

log = logging.getLogger(__name__)

PREFIX = "facehub_"
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(key: str) -> str:
    return PREFIX + _INVALID.sub("_", key)


class StatsCollector:
    """Metrics from the children's stats files and the supervisor's view of its children."""

    def __init__(self, state_dir: str, children: Callable[[], dict[str, dict[str, Any]]]):
        self.state_dir = state_dir
        self.children = children

    def collect(self) -> Iterator[Any]:
        stats = read_stats(self.state_dir)
        children = self.children()
        stats = {name: data for name, data in stats.items() if name in children}
        yield from self._counters(stats)
        yield from self._gauges(stats)
        yield from self._histograms(stats)
        yield from self._children(children)

    @staticmethod
    def _counters(stats: dict[str, dict]) -> Iterator[Any]:
        families: dict[str, CounterMetricFamily] = {}
        since = GaugeMetricFamily(PREFIX + "seconds_since_last", "Seconds since a counter last grew",
                                  labels=["component", "counter"])
        now = time.time()
        for component, data in stats.items():
            for key, value in data.get("counters", {}).items():
                base, _, reason = key.partition(":")
                name = metric_name(base)
                labels = ["component", "reason"] if reason else ["component"]
                family = families.setdefault(f"{name}|{len(labels)}", CounterMetricFamily(
                    name, f"{base} counted by the component", labels=labels))
                family.add_metric([component, reason] if reason else [component], value)
            for key, at in data.get("last_counted", {}).items():
                since.add_metric([component, key], max(0.0, now - at))
        yield from families.values()
        yield since

    @staticmethod
    def _gauges(stats: dict[str, dict]) -> Iterator[Any]:
        families: dict[str, GaugeMetricFamily] = {}
        for component, data in stats.items():
            for key, value in data.get("gauges", {}).items():
                if isinstance(value, bool):
                    value = float(value)
                if not isinstance(value, (int, float)):
                    continue
                name = metric_name(key)
                family = families.setdefault(name, GaugeMetricFamily(name, f"{key} reported by the component",
                                                                     labels=["component"]))
                family.add_metric([component], value)
        yield from families.values()

    @staticmethod
    def _histograms(stats: dict[str, dict]) -> Iterator[Any]:
        families: dict[str, HistogramMetricFamily] = {}
        for component, data in stats.items():
            for key, histogram in data.get("histograms", {}).items():
                base = key[:-3] if key.endswith("_ms") else key
                name = metric_name(base) + "_seconds"
                family = families.setdefault(name, HistogramMetricFamily(
                    name, f"{base} observed by the component, in seconds", labels=["component"]))
                buckets = [(_seconds(bound), count) for bound, count in histogram["buckets"]]
                buckets.append(("+Inf", histogram["count"]))
                family.add_metric([component], buckets, sum_value=histogram["sum"] / 1000.0)
        yield from families.values()

    @staticmethod
    def _children(children: dict[str, dict[str, Any]]) -> Iterator[Any]:
        up = GaugeMetricFamily(PREFIX + "child_up", "1 while the child is running", labels=["component"])
        restarts = CounterMetricFamily(PREFIX + "child_restarts", "Restarts of the child by the supervisor",
                                       labels=["component"])
        for name, child in children.items():
            up.add_metric([name], 1.0 if child.get("state") in ("RUNNING", "STARTING") else 0.0)
            restarts.add_metric([name], child.get("restarts", 0))
        yield up
        yield restarts


def _seconds(bound_ms: float) -> str:
    return repr(bound_ms / 1000.0)


def serve(port: int, host: str, state_dir: str, children: Callable[[], dict[str, dict[str, Any]]]) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(state_dir, children))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("serving metrics on http://%s:%d/metrics", host, port)
    return server
