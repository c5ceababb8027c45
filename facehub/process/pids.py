"""Is a pid what we think it is? For pid files and status files.

``kill(pid, 0)`` succeeds on a zombie (a killed process not yet reaped) and on
an unrelated process that reused the pid, so neither a pid file nor a status
file is trusted on that alone: the process must be running (not a zombie) and
its command line must be a facehub supervisor of the same role
(``... facehub ... run <role>``).
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a process that has not exited (zombies and dead ones are not)."""
    if pid <= 0:
        return False
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    # the state letter follows the command name, which is in parentheses and may contain spaces
    state = stat.rpartition(")")[2].split()[:1]
    return bool(state) and state[0] not in ("Z", "X", "x")


def command_line(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_supervisor(pid: int, role: str) -> bool:
    """True when ``pid`` is a live facehub supervisor running ``role``."""
    if not pid_alive(pid):
        return False
    args = command_line(pid)
    runs_role = any(args[i] == "run" and args[i + 1] == role for i in range(len(args) - 1))
    return runs_role and any("facehub" in os.path.basename(arg) for arg in args)
