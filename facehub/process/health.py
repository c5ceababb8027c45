"""What "healthy" means, for ``facehub health`` (Docker HEALTHCHECK, Kubernetes probes).

Healthy: a supervisor status file exists in the state folder, is owned by this
user, is fresh (rewritten within three status intervals, so a hung or dead
supervisor turns unhealthy), its pid is a live facehub supervisor of that role
(not a zombie, not a reused pid: ``/proc/<pid>/cmdline``), and every child is RUNNING (or
EXITED on purpose) with a recent heartbeat. The answer is an exit code (0 or
1) and one line saying why.
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


def main(config: Config, as_json: bool = False) -> int:
    healthy, reason, statuses = check(config.supervisor.state_dir)
    if as_json:
        print(json.dumps({"healthy": healthy, "reason": reason, "statuses": statuses}, indent=2))
    else:
        print(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if healthy else 1
