"""Tiny components with known behaviour for the supervisor tests."""

import logging
import os
import time

log = logging.getLogger("test-component")


def steady(config, runtime):
    """Works and beats until stopped; logs its pid once so tests can see tagging."""
    log.info("steady component up in pid %d", os.getpid())
    runtime.count("started")
    runtime.run_until_stopped(interval=0.1)


def finishes(config, runtime):
    """Does its job and returns: a clean exit that must not be restarted."""
    runtime.beat()


def crashes(config, runtime):
    """Fails straight away, every time."""
    runtime.beat()
    raise RuntimeError("boom")


def hangs_after_start(config, runtime):
    """Beats for a moment, then stops beating while staying alive (a stuck loop)."""
    marker = os.path.join(config.supervisor.state_dir, "hang-starts")
    with open(marker, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    for _ in range(5):
        runtime.beat()
        time.sleep(0.1)
    while True:
        time.sleep(1)


def ignores_stop(config, runtime):
    """Beats forever and ignores the stop request: only SIGKILL ends it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        runtime.beat()
        time.sleep(0.1)


def ready_later(config, runtime):
    """Reports the gauge ``up`` once the test creates ``<state_dir>/go``, noting when; then works until stopped."""
    go = os.path.join(config.supervisor.state_dir, "go")
    while not os.path.exists(go):
        runtime.beat()
        if runtime.wait(0.05):
            return
    with open(os.path.join(config.supervisor.state_dir, "ready-at"), "w") as handle:
        handle.write(f"{time.time()}\n")
    runtime.gauge("up", True)
    runtime.flush()
    runtime.run_until_stopped(interval=0.1)


def notes_start(config, runtime):
    """Notes when it started, then works until stopped."""
    with open(os.path.join(config.supervisor.state_dir, "started-at"), "w") as handle:
        handle.write(f"{time.time()}\n")
    runtime.run_until_stopped(interval=0.1)


def steady_with_stepped_clock(config, runtime):
    """Like ``steady``, but its wall clock jumps a day ahead after a second, as after an NTP step."""
    real, started = time.time, time.monotonic()
    time.time = lambda: real() + (86400.0 if time.monotonic() - started > 1.0 else 0.0)
    runtime.count("started")
    runtime.run_until_stopped(interval=0.1)
