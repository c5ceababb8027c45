"""A small, generic process supervisor: one child process per component, restarted on failure.

It runs any list of :class:`ChildSpec` (``facehub.roles`` says which ones make
the edge and the cloud) and knows nothing about faces. Every child is rebuilt
from its spec when it dies, so a restart gets a fresh process with fresh state.

States follow supervisord's (``supervisor/process.py``), with every change made
by :meth:`Child.set_state` against :data:`TRANSITIONS`::

    WAITING ──▶ STARTING ──startsecs──▶ RUNNING
                   │  ▲                    │ crash / stuck
                   │  └──── BACKOFF ◀──────┤ (stuck: via STOPPING)
                   │         (too many: FATAL, the supervisor exits 3)
                   └──▶ EXITED (exit 0 on purpose: not restarted)
    any live state ──▶ STOPPING ──▶ STOPPED (shutdown)

**The loop never blocks on a child.** A child is asked to stop by closing its
end of a pipe (the child sees EOF; closing never waits on the reader), and is
sent SIGKILL once ``stop_timeout`` has passed, which works on a frozen
(SIGSTOPped) process too. A child stuck in the kernel (D state) just stays
STOPPING until it can die. Restart decisions, status writes and systemd
watchdog pings go on meanwhile for every other child. The pipe also tells a
child that its supervisor is gone: the write end closes with the supervisor.

Heartbeats and every deadline use the monotonic clock (system-wide on Linux),
so a wall-clock step at boot (a Jetson has no real-time clock) kills nothing.
Children log straight to the inherited stderr, tagged with their name.

The supervisor writes its status (states, pids, restarts, heartbeats, counters)
to ``<state_dir>/supervisor-<role>.json`` every ``status_interval``;
``facehub health`` reads it. With ``NOTIFY_SOCKET`` set it speaks systemd's
notify protocol: READY=1 once every child is up, WATCHDOG=1 only while healthy.
"""

from __future__ import annotations

import enum
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from facehub.backoff import Backoff
from facehub.config import Config
from facehub.process import sdnotify
from facehub.process.logs import setup_logging
from facehub.process.statedir import UnsafeStateDir, ensure_private
from facehub.runtime import Runtime, read_stats, write_json_atomic

log = logging.getLogger(__name__)

EXIT_FATAL = 3
EXIT_UNSAFE = 4  # the state folder is not private: nothing started
STARTUP_WAIT = 30.0  # seconds a child waits for its dependency before starting anyway
STUCK_KILL_AFTER = 2.0  # seconds a stuck child gets to stop before SIGKILL
LOOP_INTERVAL = 0.1
_mp = multiprocessing.get_context("spawn")


class State(str, enum.Enum):
    WAITING = "WAITING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"
    STOPPED = "STOPPED"


LIVE = frozenset({State.STARTING, State.RUNNING, State.STOPPING})
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.WAITING}),
    State.WAITING: frozenset({State.STARTING, State.STOPPED}),
    State.STARTING: frozenset({State.RUNNING, State.BACKOFF, State.EXITED, State.FATAL, State.STOPPING}),
    State.RUNNING: frozenset({State.BACKOFF, State.EXITED, State.FATAL, State.STOPPING}),
    State.STOPPING: frozenset({State.BACKOFF, State.FATAL, State.STOPPED}),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED}),
    State.EXITED: frozenset(),
    State.FATAL: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


@dataclass
class ChildSpec:
    """What to run: a name (shown in logs and status) and a ``module:function`` target.

    ``after`` = (other child, gauge): start only once that child reports the gauge
    as true (or after ``STARTUP_WAIT`` seconds).
    """

    name: str
    target: str
    after: tuple[str, str] | None = None


def load_target(spec: str) -> Callable[[Config, Runtime], None]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


# -- inside the child -------------------------------------------------------------------------
def child_main(spec: ChildSpec, config: Config, stop_pipe: Any, heartbeat: Any) -> None:
    """Entry point of a child process: log to stderr, stop on the pipe's EOF, run the component."""
    setup_logging(config.log_level)
    # The supervisor owns the children's lifecycle: a SIGTERM sent to the whole process
    # group (systemd, ``kill -TERM -PGID``) must not stop a child before the supervisor
    # has decided to; it stops them through their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = threading.Event()
    watch_stop_pipe(stop_pipe, stop)
    runtime = Runtime(spec.name, stop=stop, state_dir=config.supervisor.state_dir, heartbeat=heartbeat)
    try:
        load_target(spec.target)(config, runtime)
    except Exception:
        logging.getLogger(spec.name).exception("%s crashed", spec.name)
        runtime.flush()
        sys.exit(1)
    runtime.flush()


def watch_stop_pipe(pipe: multiprocessing.connection.Connection, stop: threading.Event) -> threading.Thread:
    """Set ``stop`` when the supervisor closes its end of the pipe, or dies (same EOF)."""

    def watch() -> None:
        try:
            pipe.recv_bytes()
        except (EOFError, OSError):
            pass
        stop.set()

    thread = threading.Thread(target=watch, name="stop-pipe", daemon=True)
    thread.start()
    return thread


# -- in the supervisor ------------------------------------------------------------------------
@dataclass
class Child:
    """One supervised child and its restart bookkeeping."""

    spec: ChildSpec
    state: State = State.STOPPED
    process: Any = None
    stop_writer: Any = None
    heartbeat: Any = None
    started_at: float = 0.0
    kill_at: float = 0.0
    stop_timeout: float = 0.0
    restart_after_stop: bool = False
    restarts: int = 0
    crashes: deque = field(default_factory=deque)
    backoff: Backoff | None = None
    exitcode: int | None = None
    reason: str = ""

    def set_state(self, new: State, reason: str | None = None) -> None:
        """The one place a state changes; a change the table does not allow is a bug."""
        if new != self.state and new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.spec.name}: {self.state.value} -> {new.value}")
        if new != self.state:
            log.debug("%s: %s -> %s", self.spec.name, self.state.value, new.value)
        self.state = new
        if reason is not None:
            self.reason = reason

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def heartbeat_age(self, now: float) -> float | None:
        return now - self.heartbeat.value if self.heartbeat is not None else None

    def status(self, now: float) -> dict[str, Any]:
        age = self.heartbeat_age(now)
        return {
            "state": self.state.value,
            "pid": self.process.pid if self.alive else None,
            "restarts": self.restarts,
            "exitcode": self.exitcode,
            "heartbeat_age": round(age, 3) if age is not None else None,
            "reason": self.reason,
        }


class Supervisor:
    """Starts, watches and stops the children of one role, from one loop that never blocks."""

    def __init__(self, config: Config, role: str, specs: list[ChildSpec],
                 summary_gauges: tuple[str, ...] = ()):
        self.config = config
        self.policy = config.supervisor
        self.role = role
        self.children = [Child(spec) for spec in specs]
        self.summary_gauges = summary_gauges
        self.status_path = Path(self.policy.state_dir) / f"supervisor-{role}.json"
        self.stopping = False
        self.fatal: str = ""
        self.ready_sent = False
        self.started_at = time.monotonic()
        self.notifier = sdnotify.Notifier()
        self.last_status: dict[str, Any] = {"children": {}}  # what the metrics thread reads
        self.metrics_server: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Supervise until asked to stop, or until a child turns FATAL. Returns the exit code."""
        try:
            ensure_private(self.policy.state_dir)
        except (UnsafeStateDir, OSError) as error:
            log.error("%s", error)
            return EXIT_UNSAFE
        self.serve_metrics()
        for child in self.children:
            if child.spec.after:
                child.set_state(State.WAITING, "waiting for {} to report {}".format(*child.spec.after))
            else:
                self.start_child(child)
        next_status = 0.0
        try:
            while not self.stopping and not self.fatal:
                now = time.monotonic()
                for child in self.children:
                    self.check_child(child, now)
                if now >= next_status:
                    self.report()
                    next_status = now + self.policy.status_interval
                if all(c.state == State.EXITED for c in self.children):
                    log.info("all components exited cleanly")
                    break
                time.sleep(LOOP_INTERVAL)
        finally:
            self.notifier.notify("STOPPING=1")
            self.stop_all()
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
        if self.fatal:
            log.error("giving up: %s", self.fatal)
            return EXIT_FATAL
        return 0

    def serve_metrics(self) -> None:
        """Start ``/metrics`` when ``metrics.port`` is set; a port in use is logged, not fatal."""
        if not self.config.metrics.port:
            return
        from facehub.process import metrics

        try:
            self.metrics_server = metrics.serve(self.config.metrics.port, self.config.metrics.host,
                                                self.policy.state_dir, lambda: self.last_status["children"])
        except OSError as error:
            log.error("cannot serve metrics on %s:%d: %s", self.config.metrics.host, self.config.metrics.port,
                      error)

    def request_stop(self, *_: Any) -> None:
        """Signal handler: only sets a flag; the loop does the stopping."""
        if not self.stopping:
            log.info("stop requested; stopping %d components", len(self.children))
        self.stopping = True

    def start_child(self, child: Child) -> None:
        reader, child.stop_writer = _mp.Pipe(duplex=False)
        child.heartbeat = _mp.Value("d", time.monotonic(), lock=False)
        child.process = _mp.Process(target=child_main, name=child.spec.name,
                                    args=(child.spec, self.config, reader, child.heartbeat))
        child.process.start()
        reader.close()  # only the child reads; the supervisor keeps the write end
        child.started_at = time.monotonic()
        child.exitcode = None
        child.set_state(State.STARTING, "")
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    # -- watching ----------------------------------------------------------------------------
    def check_child(self, child: Child, now: float) -> None:
        """One non-blocking look at a child; at most one state change."""
        if child.state == State.WAITING:
            self.start_when_ready(child, now)
        elif child.state == State.BACKOFF:
            if child.backoff.due:
                child.restarts += 1
                self.start_child(child)
        elif child.state == State.STOPPING:
            self.finish_stopping(child, now)
        elif child.state in (State.STARTING, State.RUNNING):
            if not child.alive:
                self.on_exit(child, now)
                return
            if child.state == State.STARTING and now - child.started_at >= self.policy.startsecs:
                child.set_state(State.RUNNING, "")
            age = child.heartbeat_age(now)
            if age > self.policy.heartbeat_timeout:
                log.error("%s is stuck (no heartbeat for %.0fs); stopping it", child.spec.name, age)
                self.begin_stop(child, now, min(STUCK_KILL_AFTER, self.policy.stop_timeout),
                                reason=f"no heartbeat for {age:.0f}s", restart=True)

    def start_when_ready(self, child: Child, now: float) -> None:
        ready = self.dependency_ready(child.spec.after)
        if ready or now - self.started_at > STARTUP_WAIT:
            if not ready:
                log.warning("%s: %s not ready after %.0fs; starting anyway", child.spec.name,
                            child.spec.after[0], STARTUP_WAIT)
            self.start_child(child)

    def dependency_ready(self, after: tuple[str, str]) -> bool:
        """True once the named child, as it runs now (same pid), reports the gauge as true."""
        name, gauge = after
        child = next((c for c in self.children if c.spec.name == name), None)
        if child is None or child.process is None:
            return child is None
        data = read_stats(self.policy.state_dir).get(name, {})
        return data.get("pid") == child.process.pid and bool(data.get("gauges", {}).get(gauge))

    def on_exit(self, child: Child, now: float) -> None:
        child.process.join(0)
        child.exitcode = child.process.exitcode
        if child.exitcode == 0:
            child.set_state(State.EXITED, "finished")
            log.info("%s finished (exit 0); not restarting", child.spec.name)
            return
        self.on_crash(child, now, describe_exit(child.exitcode))

    def on_crash(self, child: Child, now: float, reason: str) -> None:
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > self.policy.restart_window:
            child.crashes.popleft()
        if len(child.crashes) > self.policy.max_restarts:
            child.set_state(State.FATAL, reason)
            self.fatal = (f"{child.spec.name} failed {len(child.crashes)} times within "
                          f"{self.policy.restart_window:.0f}s (last: {reason})")
            return
        if child.backoff is None:
            child.backoff = Backoff(self.policy.backoff_min, self.policy.backoff_max)
        child.backoff.failures = len(child.crashes) - 1
        delay = child.backoff.next()
        child.set_state(State.BACKOFF, reason)
        log.warning("%s %s; restarting in %.1fs", child.spec.name, reason, delay)

    # -- stopping ----------------------------------------------------------------------------
    def begin_stop(self, child: Child, now: float, timeout: float, reason: str = "",
                   restart: bool = False) -> None:
        """Ask a child to stop (close its pipe) and set when to SIGKILL it; never waits."""
        if child.stop_writer is not None:
            child.stop_writer.close()
            child.stop_writer = None
        child.kill_at = now + timeout
        child.stop_timeout = timeout
        child.restart_after_stop = restart
        child.set_state(State.STOPPING, reason or child.reason)

    def finish_stopping(self, child: Child, now: float) -> None:
        """A STOPPING child: reap it once gone, SIGKILL it once its time is up."""
        if not child.alive:
            child.process.join(0)
            child.exitcode = child.process.exitcode
            if child.restart_after_stop:
                self.on_crash(child, now, child.reason)
            else:
                child.set_state(State.STOPPED)
            return
        if now >= child.kill_at:
            log.warning("%s did not stop within %.0fs; killing it", child.spec.name, child.stop_timeout)
            child.process.kill()  # SIGKILL also ends a frozen (SIGSTOPped) process
            child.kill_at = float("inf")
            child.reason = (child.reason + "; " if child.reason else "") + "killed"

    def stop_all(self) -> None:
        """Stop every child: pipes closed at once, SIGKILL after ``stop_timeout``.

        Status and watchdog keep going while we wait. A child stuck in the kernel
        that outlives SIGKILL by ``stop_timeout`` more is left behind, logged.
        """
        now = time.monotonic()
        for child in self.children:
            if child.state in LIVE and child.state != State.STOPPING:
                self.begin_stop(child, now, self.policy.stop_timeout)
            elif child.state in (State.WAITING, State.BACKOFF):
                child.set_state(State.STOPPED)
        give_up_at = now + 2 * self.policy.stop_timeout + 5
        next_status = 0.0
        while any(c.state == State.STOPPING for c in self.children):
            now = time.monotonic()
            for child in self.children:
                if child.state == State.STOPPING:
                    child.restart_after_stop = False
                    self.finish_stopping(child, now)
            if now >= next_status:
                self.report()
                next_status = now + self.policy.status_interval
            if now > give_up_at:
                for child in self.children:
                    if child.state == State.STOPPING:
                        log.error("%s (pid %d) cannot be killed; leaving it", child.spec.name, child.process.pid)
                break
            time.sleep(LOOP_INTERVAL)
        self.report()

    # -- reporting ---------------------------------------------------------------------------
    def report(self) -> None:
        """Write the status file and tell systemd how things stand."""
        status = self.status(time.monotonic())
        self.last_status = status
        try:
            write_json_atomic(self.status_path, status)
        except OSError as error:
            log.warning("cannot write status %s: %s", self.status_path, error)
        if not self.ready_sent and all(c.state in (State.RUNNING, State.EXITED) for c in self.children):
            self.notifier.notify("READY=1")
            self.ready_sent = True
        if status["healthy"]:
            self.notifier.notify("WATCHDOG=1")
        self.notifier.notify(f"STATUS={status['summary']}")

    def status(self, now: float) -> dict[str, Any]:
        children = {c.spec.name: c.status(now) for c in self.children}
        problems = [f"{name} {info['state']}" + (f" ({info['reason']})" if info["reason"] else "")
                    for name, info in children.items() if info["state"] not in ("RUNNING", "EXITED")]
        if self.fatal:
            problems.insert(0, self.fatal)
        stats = {name: data for name, data in read_stats(self.policy.state_dir).items() if name in children}
        summary = "; ".join(problems) or f"{len(children)} components up"
        for gauge in self.summary_gauges:
            values = [data["gauges"][gauge] for data in stats.values() if gauge in data.get("gauges", {})]
            if values:
                summary += f", {gauge.replace('_', ' ')} {sum(values)}"
        return {
            "role": self.role,
            "pid": os.getpid(),
            "updated": time.time(),
            "interval": self.policy.status_interval,
            "heartbeat_timeout": self.policy.heartbeat_timeout,
            "stopping": self.stopping,
            "healthy": not problems and not self.stopping,
            "summary": summary,
            "children": children,
            "stats": stats,
        }


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "vanished"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def main(config: Config, role: str, specs: list[ChildSpec], daemon: bool = False,
         pidfile: str | None = None, logfile: str | None = None,
         summary_gauges: tuple[str, ...] = ()) -> int:
    """``facehub run ROLE``: supervise in the foreground, or detach first with ``--daemon``."""
    if daemon:
        from facehub.process.daemon import AlreadyRunning, daemon_context

        try:
            with daemon_context(pidfile, logfile, role):
                return _supervise(config, role, specs, summary_gauges)
        except AlreadyRunning as error:
            log.error("%s", error)
            return 1
    return _supervise(config, role, specs, summary_gauges)


def _supervise(config: Config, role: str, specs: list[ChildSpec], summary_gauges: tuple[str, ...]) -> int:
    supervisor = Supervisor(config, role, specs, summary_gauges=summary_gauges)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    return supervisor.run()
