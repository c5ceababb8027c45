"""The real supervisor in a real process: restarts, clean exits, stuck children, signals, health."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facehub.process import health
from facehub.process.supervisor import EXIT_FATAL
from facehub.dev.servers import wait_for

TESTS = Path(__file__).parent
ROOT = TESTS.parent
FAST_POLICY = {
    "FACEHUB_SUPERVISOR_BACKOFF_MIN": "0.2",
    "FACEHUB_SUPERVISOR_BACKOFF_MAX": "0.5",
    "FACEHUB_SUPERVISOR_STARTSECS": "0.3",
    "FACEHUB_SUPERVISOR_STATUS_INTERVAL": "0.2",
    "FACEHUB_SUPERVISOR_HEARTBEAT_TIMEOUT": "2",
    "FACEHUB_SUPERVISOR_STOP_TIMEOUT": "3",
}


class SupervisorProcess:
    def __init__(self, state_dir: Path, children: list[str], env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None):
        self.state_dir = state_dir
        self.log_path = state_dir.parent / "supervisor.log"
        full_env = {**os.environ, **FAST_POLICY, **(env or {}), "PYTHONPATH": str(ROOT)}
        if "NOTIFY_SOCKET" not in (env or {}):
            full_env.pop("NOTIFY_SOCKET", None)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "facehub_supervised.py"), "run", "test", str(state_dir), *children,
             *(extra_args or [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True)

    def status(self) -> dict:
        try:
            return json.loads((self.state_dir / "supervisor-test.json").read_text())
        except (OSError, ValueError):
            return {}

    def child(self, name: str) -> dict:
        return self.status().get("children", {}).get(name, {})

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.log.close()


@pytest.fixture
def start(tmp_path):
    started = []

    def _start(*children: str, env=None, extra_args=None) -> SupervisorProcess:
        proc = SupervisorProcess(tmp_path / "state", list(children), env, extra_args)
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def running(sup: SupervisorProcess, name: str) -> int | None:
    child = sup.child(name)
    return child.get("pid") if child.get("state") == "RUNNING" else None


def test_killed_child_is_restarted_and_health_follows(start):
    sup = start("a=components:steady", "b=components:steady")
    first_pid = wait_for(lambda: running(sup, "a"), 20, message="a running")
    wait_for(lambda: running(sup, "b"), 20, message="b running")
    assert health.check(str(sup.state_dir))[0]

    os.kill(first_pid, signal.SIGKILL)
    new_pid = wait_for(lambda: (running(sup, "a") or 0) not in (0, first_pid) and running(sup, "a"),
                       20, message="a restarted")
    assert new_pid != first_pid
    assert sup.child("a")["restarts"] == 1
    assert sup.child("b")["restarts"] == 0
    wait_for(lambda: health.check(str(sup.state_dir))[0], 10, message="healthy again")
    assert sup.stop() == 0


def test_sigterm_stops_all_children_cleanly(start):
    sup = start("a=components:steady", "b=components:steady")
    pids = [wait_for(lambda n=n: running(sup, n), 20, message=f"{n} running") for n in ("a", "b")]
    started = time.monotonic()
    assert sup.stop() == 0
    assert time.monotonic() - started < 10
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    final = sup.status()
    assert {c["state"] for c in final["children"].values()} == {"STOPPED"}
    assert "steady component up" in sup.output() and " a INFO" in sup.output()


def test_child_ignoring_stop_is_killed_after_timeout(start):
    sup = start("stubborn=components:ignores_stop", env={"FACEHUB_SUPERVISOR_STOP_TIMEOUT": "1"})
    pid = wait_for(lambda: running(sup, "stubborn"), 20, message="stubborn running")
    assert sup.stop() == 0
    assert "did not stop within" in sup.output()
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 5, message="stubborn child gone")


def test_clean_exit_is_not_restarted(start):
    sup = start("done=components:finishes", "a=components:steady")
    wait_for(lambda: sup.child("done").get("state") == "EXITED", 20, message="done EXITED")
    wait_for(lambda: running(sup, "a"), 20, message="a running")
    assert sup.child("done")["restarts"] == 0
    assert health.check(str(sup.state_dir))[0]
    assert sup.stop() == 0


def test_stuck_child_is_restarted(start):
    sup = start("stuck=components:hangs_after_start")
    marker = sup.state_dir / "hang-starts"
    wait_for(lambda: marker.exists() and len(marker.read_text().split()) >= 2, 30,
             message="stuck child started twice")
    assert "is stuck (no heartbeat" in sup.output()
    assert sup.stop() == 0


def test_crash_loop_turns_fatal_and_exits_nonzero(start):
    sup = start("bad=components:crashes", "a=components:steady",
                env={"FACEHUB_SUPERVISOR_MAX_RESTARTS": "2"})
    assert sup.proc.wait(60) == EXIT_FATAL
    assert sup.child("bad")["state"] == "FATAL"
    assert "bad failed 3 times" in sup.output()
    assert "RuntimeError: boom" in sup.output()
    ok, reason, _ = health.check(str(sup.state_dir))
    assert not ok and "not running" in reason


def test_health_command_exit_codes(start, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACEHUB_SUPERVISOR_STATE_DIR": str(tmp_path / "state")}
    command = [sys.executable, "-m", "facehub.cli", "health"]
    missing = subprocess.run(command, env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "no supervisor status" in missing.stdout

    sup = start("a=components:steady")
    wait_for(lambda: running(sup, "a"), 20, message="a running")
    healthy = subprocess.run(command, env=env, capture_output=True, text=True)
    assert healthy.returncode == 0, healthy.stdout
    assert healthy.stdout.startswith("healthy:")

    sup.proc.kill()
    sup.proc.wait()
    dead = subprocess.run(command, env=env, capture_output=True, text=True)
    assert dead.returncode == 1 and "not running" in dead.stdout


def test_sd_notify_messages(start, tmp_path):
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    sup = start("a=components:steady", env={"NOTIFY_SOCKET": address})
    seen: list[str] = []

    def receive_until(message: str) -> None:
        while message not in seen:
            seen.append(sock.recv(4096).decode())

    receive_until("READY=1")
    receive_until("WATCHDOG=1")
    assert any(m.startswith("STATUS=") for m in seen)
    sup.stop()
    receive_until("STOPPING=1")
    sock.close()


def stale_pid(kind: str) -> tuple[int, subprocess.Popen]:
    """A pid a pid file may hold that is no running supervisor: gone, a zombie, or reused."""
    if kind == "unrelated":
        proc = subprocess.Popen(["sleep", "60"])
        return proc.pid, proc
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    if kind == "dead":
        proc.wait()
    else:  # exited but not reaped: kill(pid, 0) still succeeds on it
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z",
                 10, message="zombie")
    return proc.pid, proc


@pytest.mark.parametrize("kind", ["dead", "zombie", "unrelated"])
def test_daemon_starts_despite_stale_pidfile(start, tmp_path, kind):
    pidfile = tmp_path / "facehub.pid"
    old_pid, old = stale_pid(kind)
    pidfile.write_text(f"{old_pid}\n")
    logfile = tmp_path / "daemon.log"
    try:
        launcher = start("a=components:steady",
                         extra_args=["--daemon", "--pidfile", str(pidfile), "--logfile", str(logfile)])
        assert launcher.proc.wait(20) == 0  # the launching process returns once detached
        daemon_pid = wait_for(lambda: pidfile.exists() and (pidfile.read_text().split() or [None])[0], 20,
                              message="pid file rewritten")
        daemon_pid = int(daemon_pid)
        assert daemon_pid != old_pid
    finally:
        old.kill()
        old.wait()
    try:
        wait_for(lambda: running(launcher, "a"), 20, message="daemon's child running")
        assert "removed stale pid file" in launcher.output()
    finally:
        os.kill(daemon_pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{daemon_pid}").exists(), 20, message="daemon exited")
    assert not pidfile.exists()


def test_running_daemon_refuses_a_second_start(start, tmp_path):
    pidfile = tmp_path / "facehub.pid"
    args = ["--daemon", "--pidfile", str(pidfile), "--logfile", str(tmp_path / "daemon.log")]
    first = start("a=components:steady", extra_args=args)
    assert first.proc.wait(20) == 0
    daemon_pid = int(wait_for(lambda: pidfile.exists() and (pidfile.read_text().split() or [None])[0], 20,
                              message="pid file written"))
    try:
        wait_for(lambda: running(first, "a"), 20, message="daemon's child running")
        second = start("a=components:steady", extra_args=args)
        assert second.proc.wait(20) == 1
        assert "already running" in second.output()
    finally:
        os.kill(daemon_pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{daemon_pid}").exists(), 20, message="daemon exited")


def child_pids(parent: int) -> set[int]:
    """Live child processes of ``parent``, straight from /proc (no status file delay)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            pids.add(int(stat.parent.name))
    return pids


def test_frozen_child_holds_up_nothing(start):
    """One child frozen (SIGSTOP) while another is killed: the killed one is restarted at once,
    the status file stays fresh throughout, and the frozen one is killed and replaced."""
    backoff_min, interval = 0.5, 0.5
    sup = start("frozen=components:steady", "victim=components:steady",
                env={"FACEHUB_SUPERVISOR_BACKOFF_MIN": str(backoff_min), "FACEHUB_SUPERVISOR_BACKOFF_MAX": "1",
                     "FACEHUB_SUPERVISOR_STATUS_INTERVAL": str(interval),
                     "FACEHUB_SUPERVISOR_HEARTBEAT_TIMEOUT": "2"})
    frozen = wait_for(lambda: running(sup, "frozen"), 20, message="frozen running")
    victim = wait_for(lambda: running(sup, "victim"), 20, message="victim running")
    status_path = sup.state_dir / "supervisor-test.json"
    oldest = 0.0

    def status_age() -> float:
        nonlocal oldest
        oldest = max(oldest, time.time() - status_path.stat().st_mtime)
        return oldest

    os.kill(frozen, signal.SIGSTOP)
    try:
        # the supervisor notices the silent heartbeat and starts stopping the frozen child
        wait_for(lambda: status_age() is not None and sup.child("frozen").get("state") != "RUNNING", 20,
                 interval=0.05, message="frozen child noticed")
        before = child_pids(sup.proc.pid)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        new_pid = wait_for(lambda: status_age() is not None and (child_pids(sup.proc.pid) - before), 20,
                           interval=0.02, message="victim restarted")
        restart_delay = time.monotonic() - killed_at
        wait_for(lambda: sup.child("victim").get("pid") in new_pid, 10, message="new pid is the victim's")
        replaced = wait_for(lambda: status_age() is not None and (running(sup, "frozen") or frozen) != frozen
                            and running(sup, "frozen"), 20, interval=0.05, message="frozen child replaced")
    finally:
        with contextlib.suppress(ProcessLookupError):  # normally gone: killed while frozen
            os.kill(frozen, signal.SIGCONT)
    print(f"victim restarted {restart_delay:.2f}s after SIGKILL; oldest status {oldest:.2f}s")
    assert restart_delay <= backoff_min + 1
    assert oldest <= 2 * interval
    assert replaced != frozen
    assert not Path(f"/proc/{frozen}").exists() or "Z" in Path(f"/proc/{frozen}/stat").read_text()
    assert sup.stop() == 0


def test_sigterm_to_the_whole_process_group_stops_cleanly(start):
    """systemd and ``kill -TERM -PGID`` signal every process of the group, children included."""
    sup = start("a=components:steady", "b=components:steady")
    pids = [wait_for(lambda n=n: running(sup, n), 20, message=f"{n} running") for n in ("a", "b")]
    os.killpg(sup.proc.pid, signal.SIGTERM)  # the supervisor leads its own session and group
    assert sup.proc.wait(20) == 0
    for pid in pids:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10, message=f"child {pid} gone")


def test_children_stop_when_the_supervisor_is_killed(start):
    sup = start("a=components:steady")
    pid = wait_for(lambda: running(sup, "a"), 20, message="a running")
    sup.proc.kill()
    sup.proc.wait()
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, message="orphaned child stopped itself")


def test_child_waits_for_its_dependency_to_be_ready(start):
    """The detector's case: start only once the forwarder's session is subscribed."""
    sup = start("later=components:notes_start@first:up", "first=components:ready_later")
    wait_for(lambda: running(sup, "first"), 20, message="first running")
    assert sup.child("later").get("state") == "WAITING"
    started = sup.state_dir / "started-at"
    assert not started.exists()
    (sup.state_dir / "go").touch()  # now first reports ready
    wait_for(started.exists, 30, message="later started")
    ready_at = float((sup.state_dir / "ready-at").read_text())
    assert float(started.read_text()) >= ready_at
    wait_for(lambda: running(sup, "later"), 20, message="later running")
    assert sup.stop() == 0


def test_forged_status_file_is_not_trusted(tmp_path):
    """A status file claiming health for a pid that is no facehub supervisor reports unhealthy."""
    state = tmp_path / "state"
    state.mkdir()
    impostor = subprocess.Popen(["sleep", "60"])
    try:
        (state / "supervisor-cloud.json").write_text(json.dumps({
            "role": "cloud", "pid": impostor.pid, "updated": time.time(), "interval": 1, "healthy": True,
            "summary": "1 components up", "children": {"saver-1": {"state": "RUNNING", "heartbeat_age": 0}}}))
        healthy, reason, _ = health.check(str(state))
    finally:
        impostor.kill()
        impostor.wait()
    assert not healthy
    assert "no live facehub supervisor" in reason


def test_state_dir_behind_a_symlink_is_refused(start, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "state").symlink_to(target)
    sup = start("a=components:steady")
    assert sup.proc.wait(20) == 4
    assert "not a plain directory" in sup.output()
    assert not list(target.iterdir()), "nothing may be written through the symlink"


@pytest.mark.parametrize("step", [86400, -86400])
def test_wall_clock_step_kills_no_child(start, step):
    """Heartbeats, backoffs and deadlines are monotonic: a wall-clock step (NTP at boot on a board
    without a real-time clock) in the supervisor and in a child restarts nothing."""
    sup = start("a=components:steady_with_stepped_clock", "b=components:steady",
                env={"WALL_CLOCK_STEP_FOR_TEST": str(step), "FACEHUB_SUPERVISOR_HEARTBEAT_TIMEOUT": "2"})
    pids = {name: wait_for(lambda n=name: running(sup, n), 20, message=f"{name} running") for name in "ab"}
    # nothing happens is the point: watch for well past the step (1 s) plus the heartbeat timeout (2 s)
    watch_until = time.monotonic() + 4
    while time.monotonic() < watch_until:
        assert {name: running(sup, name) for name in "ab"} == pids, "a child was restarted"
        time.sleep(0.2)  # observing that nothing happens; the status file changes every 0.2 s
    assert {name: running(sup, name) for name in "ab"} == pids
    assert sup.child("a")["restarts"] == 0 and sup.child("b")["restarts"] == 0
    assert sup.stop() == 0
