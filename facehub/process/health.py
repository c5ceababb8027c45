"""What "healthy" and "delivering" mean, for ``facehub health`` (Docker HEALTHCHECK, Kubernetes probes).

Two questions, two answers, each an exit code (0 or 1) and one line saying why.

**Healthy** (liveness, ``facehub health``): the processes work. A supervisor
status file exists in the state folder, is owned by this user, is fresh
(rewritten within three status intervals, so a hung or dead supervisor turns
unhealthy), its pid is a live facehub supervisor of that role (not a zombie,
not a reused pid: ``/proc/<pid>/cmdline``), and every child is RUNNING (or
EXITED on purpose) with a recent heartbeat. Restarting helps when this fails,
so it is what liveness probes use.

**Delivering** (readiness, ``facehub health --delivery``): healthy, and work is
moving. A process can be perfectly alive while its broker or its storage is
gone; restarting it would not help, but someone should know. The rule is
generic, over the gauges each running child flushes to its stats file (the
supervisor copies them into its status), compared with
``supervisor.delivery_timeout`` (T). A component takes part by naming gauges
by this convention; any other gauge is ignored, and so is a null value:

- ``<what>_down_since``: the wall-clock time (epoch seconds) a connection went
  down, null while it is up. Red when ``now - value > T``.
- ``<what>_failing_since``: the wall-clock time something started failing (and
  has not worked since), null while it works. Red when ``now - value > T``.
- ``oldest_<what>_age``: how many seconds the oldest item not yet handed on had
  waited when the stats were written (their ``updated`` time), null when there
  is none. Red when ``value + (now - updated) > T``.

Only children in state RUNNING whose stats come from their current pid count,
so the last words of a stopped or restarted process (a disconnect on the way
out) are ignored. The reason names the child and the gauge
(``forwarder: cloud down for 75s``). Components measure durations on the
monotonic clock and write wall-clock times derived from them at each flush
(:meth:`facehub.runtime.Runtime.gauge_since`), so a clock step cannot fake an
outage for longer than one flush.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from facehub.config import Config
from facehub.process.pids import is_supervisor

STALE_AFTER_INTERVALS = 3
MIN_STALE_SECONDS = 5.0
SINCE_SUFFIXES = ("_down_since", "_failing_since")
AGE_PREFIX, AGE_SUFFIX = "oldest_", "_age"


def check(state_dir: str, now: float | None = None) -> tuple[bool, str, list[dict[str, Any]]]:
    """(healthy, one-line reason, the status documents read)."""
    now = now or time.time()
    paths = sorted(Path(state_dir).glob("supervisor-*.json"))
    if not paths:
        return False, f"no supervisor status in {state_dir} (not started yet?)", []
    statuses, problems = [], []
    for path in paths:
        if path.stat().st_uid != os.geteuid():
            problems.append(f"{path.name}: not owned by this user; ignored")
            continue
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            problems.append(f"{path.name}: unreadable ({error})")
            continue
        statuses.append(status)
        problem = _problem(status, now)
        if problem:
            problems.append(f"{status.get('role', path.stem)}: {problem}")
    if problems:
        return False, "; ".join(problems), statuses
    summary = ", ".join(f"{s['role']}: {s['summary']}" for s in statuses)
    return True, summary, statuses


def _problem(status: dict[str, Any], now: float) -> str:
    age = now - float(status.get("updated", 0))
    limit = max(MIN_STALE_SECONDS, STALE_AFTER_INTERVALS * float(status.get("interval", 1)))
    pid = int(status.get("pid") or 0)
    if not pid or not is_supervisor(pid, str(status.get("role"))):
        return f"supervisor pid {pid} is not running (no live facehub supervisor of this role)"
    if age > limit:
        return f"status is {age:.0f}s old (supervisor hung?)"
    if not status.get("healthy"):
        return status.get("summary", "unhealthy")
    timeout = float(status.get("heartbeat_timeout", 30))
    for name, child in status.get("children", {}).items():
        beat_age = child.get("heartbeat_age")
        if child.get("state") == "RUNNING" and beat_age is not None and beat_age > timeout:
            return f"{name} has not sent a heartbeat for {beat_age:.0f}s"
    return ""


def check_delivery(state_dir: str, timeout: float,
                   now: float | None = None) -> tuple[bool, str, list[dict[str, Any]]]:
    """(delivering, one-line reason, the status documents read): healthy, and no gauge past ``timeout``."""
    now = now or time.time()
    healthy, reason, statuses = check(state_dir, now)
    if not healthy:
        return False, reason, statuses
    return (*delivery_verdict(statuses, timeout, now, reason), statuses)


def delivery_verdict(statuses: list[dict[str, Any]], timeout: float, now: float,
                     summary: str = "") -> tuple[bool, str]:
    """(delivering, reason) for the status documents of healthy supervisors."""
    problems = [f"{status.get('role')}/{problem}" if len(statuses) > 1 else problem
                for status in statuses for problem in delivery_problems(status, timeout, now)]
    if problems:
        return False, "; ".join(problems) + f" (delivery_timeout {timeout:g}s)"
    return True, summary or "nothing waiting longer than the delivery timeout"


def delivery_problems(status: dict[str, Any], timeout: float, now: float) -> list[str]:
    """``child: what`` for every delivery gauge of a running child that is past ``timeout``."""
    problems = []
    children = status.get("children", {})
    for name, stats in sorted(status.get("stats", {}).items()):
        child = children.get(name, {})
        if child.get("state") != "RUNNING" or not child.get("pid") or stats.get("pid") != child.get("pid"):
            continue
        updated = _number(stats.get("updated"))
        for gauge, value in sorted(stats.get("gauges", {}).items()):
            verdict = judge(gauge, value, now, updated if updated is not None else now)
            if verdict and verdict[0] > timeout:
                problems.append(f"{name}: {verdict[1]}")
    return problems


def judge(gauge: str, value: Any, now: float, updated: float) -> tuple[float, str] | None:
    """(age in seconds, what to say) for a delivery gauge with a value; None for any other gauge."""
    number = _number(value)
    if number is None:
        return None
    for suffix in SINCE_SUFFIXES:
        if gauge.endswith(suffix) and len(gauge) > len(suffix):
            age = max(0.0, now - number)
            what = gauge[: -len("_since")].replace("_", " ")
            return age, f"{what} for {age:.0f}s"
    if gauge.startswith(AGE_PREFIX) and gauge.endswith(AGE_SUFFIX) and len(gauge) > len(AGE_PREFIX + AGE_SUFFIX):
        age = max(0.0, number + max(0.0, now - updated))
        what = gauge[: -len(AGE_SUFFIX)].replace("_", " ")
        return age, f"{what} waiting for {age:.0f}s"
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def main(config: Config, as_json: bool = False, delivery: bool = False) -> int:
    """``facehub health [--delivery] [--json]``: print one line (or the JSON), return the exit code."""
    state_dir, timeout = config.supervisor.state_dir, config.supervisor.delivery_timeout
    now = time.time()
    healthy, reason, statuses = check(state_dir, now)
    delivering, delivery_reason = delivery_verdict(statuses, timeout, now, reason) if healthy else (False, reason)
    ok = delivering if delivery else healthy
    if as_json:
        print(json.dumps({"healthy": healthy, "reason": reason,
                          "delivery": {"delivering": delivering, "reason": delivery_reason, "timeout": timeout},
                          "statuses": statuses}, indent=2))
    elif delivery:
        print(("delivering: " if delivering else "not delivering: ") + delivery_reason)
    else:
        print(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if ok else 1
