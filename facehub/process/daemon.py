"""``--daemon``: detach with python-daemon, guarded by a pid file.

A daemon killed with SIGKILL leaves its pid file behind; the next start must
not refuse to run because of it. So before locking, a pid file whose process
is gone is treated as stale and removed, while a live one is an error.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import daemon
from daemon.pidfile import TimeoutPIDLockFile

from facehub.process.pids import is_supervisor

log = logging.getLogger(__name__)


class AlreadyRunning(RuntimeError):
    pass


def read_pid(path: str | os.PathLike) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def clear_stale_pidfile(path: str | os.PathLike, role: str) -> bool:
    """Remove ``path`` unless it names a live supervisor of ``role``; raise if it does.

    A zombie (killed, not yet reaped) or a process that reused the pid is not "running".
    """
    if not Path(path).exists():
        return False
    pid = read_pid(path)
    if pid is not None and pid != os.getpid() and is_supervisor(pid, role):
        raise AlreadyRunning(f"already running with pid {pid} (pid file {path})")
    Path(path).unlink(missing_ok=True)
    log.warning("removed stale pid file %s (pid %s is not a running %s supervisor)", path, pid, role)
    return True


@contextmanager
def daemon_context(pidfile: str | None, logfile: str | None, role: str) -> Iterator[None]:
    """Detach; logs go to ``logfile`` (appended) since the terminal is gone."""
    if pidfile:
        clear_stale_pidfile(pidfile, role)
        Path(pidfile).parent.mkdir(parents=True, exist_ok=True)
    out = open(logfile, "a", buffering=1) if logfile else None
    context = daemon.DaemonContext(
        pidfile=TimeoutPIDLockFile(pidfile, acquire_timeout=0) if pidfile else None,
        stdout=out,
        stderr=out,
        working_directory=os.getcwd(),
        umask=0o022,
        detach_process=True,
    )
    with context:
        root = logging.getLogger()
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
        yield
