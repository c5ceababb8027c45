"""A small process supervisor: one child process per component, restarted on failure.

Each role is a list of components (``edge``: detector, forwarder, logger;
``cloud``: one or more savers). Every child is rebuilt from its spec when it
dies, so a restart gets a fresh process with fresh state. The states follow
supervisord's: STARTING becomes RUNNING after ``startsecs`` alive; a crash
puts the child in BACKOFF for an exponentially growing delay; more than
``max_restarts`` crashes inside ``restart_window`` makes the child FATAL and
the supervisor exits non-zero so Docker or Kubernetes restart the container.
A child that returns on purpose (exit code 0, e.g. a video file that ended) is
EXITED and left alone. A child whose heartbeat goes stale is alive but stuck:
it is killed and counts as a crash.

Children log through one queue to the parent's handler, each line tagged with
the component name. The supervisor writes its status (states, pids,
restarts, heartbeats, counters) to ``<state_dir>/supervisor-<role>.json``
every ``status_interval``; ``facehub health`` reads it. With ``NOTIFY_SOCKET``
set it speaks systemd's notify protocol.
"""

from __future__ import annotations

import enum
import importlib
import logging
import logging.handlers
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import sdnotify
from .config import Config
from .runtime import Runtime, read_stats, write_json_atomic

log = logging.getLogger(__name__)

COMPONENTS = {
    "detector": "facehub.detector:run",
    "forwarder": "facehub.forwarder:run",
    "logger": "facehub.logger:run",
    "saver": "facehub.saver:run",
}
EXIT_FATAL = 3
STARTUP_WAIT = 30.0
_mp = multiprocessing.get_context("spawn")


class State(str, enum.Enum):
    WAITING = "WAITING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    EXITED = "EXITED"
    FATAL = "FATAL"
    STOPPED = "STOPPED"


@dataclass
class ChildSpec:
    """What to run: a name (shown in logs and status) and a ``module:function`` target.

    ``after`` = (other child, gauge): start only once that child reports the gauge
    as true (or after ``STARTUP_WAIT`` seconds), e.g. the detector waits until the
    forwarder's persistent session is subscribed on the edge broker, so the very
    first faces of a new device are not published before anyone will keep them.
    """

    name: str
    target: str
    after: tuple[str, str] | None = None


def component_target(name: str) -> Callable[[Config, Runtime], None]:
    """Import a component's ``run`` function by component or instance name (``saver-2``)."""
    base = name.split("-")[0] if name not in COMPONENTS else name
    return load_target(COMPONENTS[base])


def load_target(spec: str) -> Callable[[Config, Runtime], None]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def role_specs(config: Config, role: str) -> list[ChildSpec]:
    """The children a role runs."""
    if role == "edge":
        return [ChildSpec("forwarder", COMPONENTS["forwarder"]),
                ChildSpec("logger", COMPONENTS["logger"]),
                ChildSpec("detector", COMPONENTS["detector"], after=("forwarder", "edge_subscribed"))]
    if role == "cloud":
        count = config.saver.instances
        return [ChildSpec(f"saver-{i}", COMPONENTS["saver"]) for i in range(1, count + 1)]
    raise ValueError(f"unknown role {role!r}")


def child_main(spec: ChildSpec, config: Config, stop: Any, heartbeat: Any, log_queue: Any) -> None:
    """Entry point of a child process: logging via the queue, SIGTERM sets stop, run the component."""
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(config.log_level.upper())
    # The supervisor owns the children's lifecycle: it sets ``stop`` and, if need be, kills.
    # A SIGTERM sent to the whole process group (systemd, ``kill -TERM -PGID``) must not reach
    # the child's code: setting a multiprocessing Event from a signal handler while the main
    # thread waits on it deadlocks on the Event's lock.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch_parent(stop)
    runtime = Runtime(spec.name, stop=stop, state_dir=config.supervisor.state_dir, heartbeat=heartbeat)
    try:
        load_target(spec.target)(config, runtime)
    except Exception:
        logging.getLogger(spec.name).exception("%s crashed", spec.name)
        runtime.flush()
        sys.exit(1)
    runtime.flush()


def watch_parent(stop: Any, interval: float = 1.0) -> threading.Thread:
    """Stop this child when its supervisor is gone (killed with SIGKILL), instead of lingering."""
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(interval):
            if os.getppid() != parent:
                logging.getLogger(__name__).warning("supervisor (pid %d) is gone; stopping", parent)
                stop.set()
                return

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


@dataclass
class Child:
    """One supervised child and its restart bookkeeping."""

    spec: ChildSpec
    state: State = State.STOPPED
    process: Any = None
    stop: Any = None
    heartbeat: Any = None
    started_at: float = 0.0
    retry_at: float = 0.0
    restarts: int = 0
    crashes: deque = field(default_factory=deque)
    exitcode: int | None = None
    reason: str = ""

    def status(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "pid": self.process.pid if self.process is not None and self.process.is_alive() else None,
            "restarts": self.restarts,
            "exitcode": self.exitcode,
            "heartbeat_age": round(now - self.heartbeat.value, 3) if self.heartbeat is not None else None,
            "reason": self.reason,
        }


class Supervisor:
    """Starts, watches and stops the children of one role."""

    def __init__(self, config: Config, role: str, specs: list[ChildSpec] | None = None,
                 log_queue: Any | None = None):
        self.config = config
        self.policy = config.supervisor
        self.role = role
        self.children = [Child(spec) for spec in (specs or role_specs(config, role))]
        self.log_queue = log_queue if log_queue is not None else _mp.Queue()
        self.status_path = Path(self.policy.state_dir) / f"supervisor-{role}.json"
        self.stopping = False
        self.fatal: str = ""
        self.ready_sent = False
        self.started_at = time.time()
        self.notifier = sdnotify.Notifier()

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Supervise until asked to stop, or until a child turns FATAL. Returns the exit code."""
        Path(self.policy.state_dir).mkdir(parents=True, exist_ok=True)
        for child in self.children:
            if child.spec.after:
                child.state = State.WAITING
                child.reason = "waiting for {} to report {}".format(*child.spec.after)
            else:
                self.start_child(child)
        next_status = 0.0
        try:
            while not self.stopping and not self.fatal:
                now = time.time()
                for child in self.children:
                    self.check_child(child, now)
                if now >= next_status:
                    self.report(now)
                    next_status = now + self.policy.status_interval
                if all(c.state in (State.EXITED,) for c in self.children):
                    log.info("all components exited cleanly")
                    break
                time.sleep(0.1)
        finally:
            self.notifier.notify("STOPPING=1")
            self.stop_all()
            self.report(time.time())
        if self.fatal:
            log.error("giving up: %s", self.fatal)
            return EXIT_FATAL
        return 0

    def request_stop(self, *_: Any) -> None:
        if not self.stopping:
            log.info("stop requested; stopping %d components", len(self.children))
        self.stopping = True

    def start_child(self, child: Child) -> None:
        child.stop = _mp.Event()
        child.heartbeat = _mp.Value("d", time.time(), lock=False)
        child.process = _mp.Process(
            target=child_main, name=child.spec.name,
            args=(child.spec, self.config, child.stop, child.heartbeat, self.log_queue),
        )
        child.process.start()
        child.started_at = time.time()
        child.state = State.STARTING
        child.exitcode = None
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    # -- watching ----------------------------------------------------------------------------
    def check_child(self, child: Child, now: float) -> None:
        if child.state in (State.EXITED, State.FATAL, State.STOPPED):
            return
        if child.state == State.WAITING:
            if self.dependency_ready(child.spec.after) or now - self.started_at > STARTUP_WAIT:
                if not self.dependency_ready(child.spec.after):
                    log.warning("%s: %s not ready after %.0fs; starting anyway", child.spec.name,
                                child.spec.after[0], STARTUP_WAIT)
                self.start_child(child)
            return
        if child.state == State.BACKOFF:
            if now >= child.retry_at:
                child.restarts += 1
                self.start_child(child)
            return
        if not child.process.is_alive():
            self.on_exit(child, now)
            return
        if child.state == State.STARTING and now - child.started_at >= self.policy.startsecs:
            child.state = State.RUNNING
            child.reason = ""
        if now - child.heartbeat.value > self.policy.heartbeat_timeout:
            child.reason = f"no heartbeat for {now - child.heartbeat.value:.0f}s"
            log.error("%s is stuck (%s); killing it", child.spec.name, child.reason)
            self.terminate(child, timeout=min(2.0, self.policy.stop_timeout))
            self.on_crash(child, now, child.reason)

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
            child.state = State.EXITED
            child.reason = "finished"
            log.info("%s finished (exit 0); not restarting", child.spec.name)
            return
        self.on_crash(child, now, describe_exit(child.exitcode))

    def on_crash(self, child: Child, now: float, reason: str) -> None:
        child.reason = reason
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > self.policy.restart_window:
            child.crashes.popleft()
        if len(child.crashes) > self.policy.max_restarts:
            child.state = State.FATAL
            self.fatal = (f"{child.spec.name} failed {len(child.crashes)} times within "
                          f"{self.policy.restart_window:.0f}s (last: {reason})")
            return
        delay = min(self.policy.backoff_min * 2 ** (len(child.crashes) - 1), self.policy.backoff_max)
        child.state = State.BACKOFF
        child.retry_at = now + delay
        log.warning("%s %s; restarting in %.1fs", child.spec.name, reason, delay)

    # -- stopping ----------------------------------------------------------------------------
    def stop_all(self) -> None:
        """Ask every child to stop, wait up to ``stop_timeout``, then SIGKILL the rest."""
        live = [c for c in self.children if c.process is not None and c.process.is_alive()]
        for child in live:
            child.stop.set()
        deadline = time.time() + self.policy.stop_timeout
        for child in live:
            child.process.join(max(0.0, deadline - time.time()))
        for child in live:
            if child.process.is_alive():
                log.warning("%s did not stop within %.0fs; killing it", child.spec.name,
                            self.policy.stop_timeout)
                child.process.kill()
                child.process.join(5)
            child.exitcode = child.process.exitcode
        for child in self.children:
            if child.state not in (State.FATAL, State.EXITED):
                child.state = State.STOPPED

    def terminate(self, child: Child, timeout: float) -> None:
        child.stop.set()
        child.process.terminate()
        child.process.join(timeout)
        if child.process.is_alive():
            child.process.kill()
            child.process.join(5)
        child.exitcode = child.process.exitcode

    # -- reporting ---------------------------------------------------------------------------
    def report(self, now: float) -> None:
        """Write the status file and tell systemd how things stand."""
        status = self.status(now)
        try:
            write_json_atomic(self.status_path, status)
        except OSError as error:
            log.warning("cannot write status %s: %s", self.status_path, error)
        running = [c for c in self.children if c.state in (State.RUNNING, State.EXITED)]
        if not self.ready_sent and len(running) == len(self.children):
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
        depth = sum(data.get("gauges", {}).get("spool_depth", 0) for data in stats.values())
        if any("spool_depth" in data.get("gauges", {}) for data in stats.values()):
            summary += f", spool depth {depth}"
        return {
            "role": self.role,
            "pid": os.getpid(),
            "updated": now,
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


def main(config: Config, role: str, daemon: bool = False, pidfile: str | None = None,
         logfile: str | None = None, specs: list[ChildSpec] | None = None) -> int:
    """``facehub run ROLE``: supervise in the foreground, or detach first with ``--daemon``."""
    if daemon:
        from .daemonize import AlreadyRunning, daemon_context

        try:
            with daemon_context(pidfile, logfile):
                return _supervise(config, role, specs)
        except AlreadyRunning as error:
            log.error("%s", error)
            return 1
    return _supervise(config, role, specs)


def _supervise(config: Config, role: str, specs: list[ChildSpec] | None) -> int:
    log_queue = _mp.Queue()
    handlers = logging.getLogger().handlers or [logging.StreamHandler(sys.stderr)]
    listener = logging.handlers.QueueListener(log_queue, *handlers, respect_handler_level=True)
    listener.start()
    supervisor = Supervisor(config, role, specs=specs, log_queue=log_queue)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    try:
        return supervisor.run()
    finally:
        listener.stop()
