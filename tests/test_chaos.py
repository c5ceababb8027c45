"""Chaos: faces pushed from an edge host to a cloud host while everything fails in turn.

Two network namespaces stand for two machines joined by one cable (a veth
pair, see ``netns.py``):

- edge: mosquitto, ``facehub run edge`` (the detector reads the built-in
  sample clip once; the forwarder spools and forwards), a test publisher that
  pushes 2,000 real wire-format faces through the edge broker, and a
  collector that records the id of every face seen on the edge broker: the
  published set.
- cloud: mosquitto, moto's S3 server behind a small TCP relay, and
  ``facehub run cloud`` with two savers sharing the work.

While the publisher runs, in turn: the forwarder is killed with SIGKILL, the
cable is cut for 20 s, the cloud broker is restarted, S3 is unreachable for
10 s, and one saver is killed with SIGKILL. Then the test waits until storage
settles and compares the face ids in the bucket with the published set.

With QoS 1 on every hop nothing may be lost and nothing stored twice; the test
prints ``published=N stored=N lost=0 duplicates=0``. The same scenario with
QoS 0 on every hop prints what QoS 0 loses, for contrast, without failing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest
from facehub.dev.servers import S3_ENV, Mosquitto, MotoS3, Server, wait_for

log = logging.getLogger("chaos")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CLIENTS = TESTS / "chaos_clients.py"
BUCKET, PREFIX = "faces", "chaos"
# the publisher plays a second camera of the edge device: the forwarder takes only its own device's faces
EDGE_DEVICE = PUBLISHER_DEVICE = "chaos-edge"

FACES = 2000
RATE = 25.0            # faces per second: the push lasts 80 s and overlaps every fault
LINK_CUT = 20.0        # seconds the cable stays cut
S3_OUTAGE = 10.0       # seconds S3 stays unreachable
SETTLE_DEADLINE = 180.0

# Short timers so that each recovery takes seconds, not the production minutes.
FAST = {
    "FACEHUB_LOG_LEVEL": "INFO",
    "FACEHUB_LOCAL_KEEPALIVE": "5",
    "FACEHUB_CLOUD_KEEPALIVE": "5",
    "FACEHUB_LOCAL_RECONNECT_MIN": "0.5",
    "FACEHUB_LOCAL_RECONNECT_MAX": "2",
    "FACEHUB_CLOUD_RECONNECT_MIN": "0.5",
    "FACEHUB_CLOUD_RECONNECT_MAX": "2",
    "FACEHUB_SAVER_RETRY_MIN": "0.2",
    "FACEHUB_SAVER_RETRY_MAX": "2",
    "FACEHUB_SUPERVISOR_BACKOFF_MIN": "0.5",
    "FACEHUB_SUPERVISOR_BACKOFF_MAX": "2",
    "FACEHUB_SUPERVISOR_STATUS_INTERVAL": "0.5",
    "FACEHUB_SUPERVISOR_STOP_TIMEOUT": "5",
}

pytestmark = pytest.mark.slow


class S3Relay(Server):
    """A TCP relay in front of moto's S3 server, inside the cloud namespace.

    Why a relay: moto keeps the bucket in memory, so stopping moto itself
    would lose every object stored so far. Killing the relay is exactly what
    a stopped S3 endpoint looks like to the savers (connections refused,
    open ones closed), and starting it again on the same port brings S3 back
    with its objects. Unlike SIGSTOP (a hung server, not a stopped one) or an
    iptables rule, it needs nothing beyond Python.
    """

    def __init__(self, workdir: Path, target: Server, **kwargs):
        super().__init__("s3-relay", workdir, **kwargs)
        self.target = target

    def command(self) -> list[str]:
        return [sys.executable, str(CLIENTS), "proxy", "--listen", f"{self.host}:{self.port}",
                "--target", f"{self.target.host}:{self.target.port}"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Outcome:
    """What reached the bucket compared with what was published."""

    published: set[str]
    keys: list[str]
    stored: set[str] = field(init=False)
    lost: set[str] = field(init=False)
    unknown: set[str] = field(init=False)   # stored, never published
    duplicates: int = field(init=False)     # objects beyond one per face id

    def __post_init__(self):
        ids = [face_id_of(key, self.published) for key in self.keys]
        self.stored = set(ids)
        self.duplicates = len(ids) - len(self.stored)
        self.lost = self.published - self.stored
        self.unknown = self.stored - self.published

    def line(self) -> str:
        return (f"published={len(self.published)} stored={len(self.stored)} "
                f"lost={len(self.lost)} duplicates={self.duplicates}")


def face_id_of(key: str, known: set[str]) -> str:
    """The face id in a key ``<prefix>/<device>/<Y>/<M>/<D>/<time>-<face id>.<ext>``.

    The time part may itself contain '-', so the id is the longest suffix after
    a '-' that is a published id, else whatever follows the last '-'.
    """
    stem = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    for i, char in enumerate(stem):
        if char == "-" and stem[i + 1:] in known:
            return stem[i + 1:]
    return stem.rsplit("-", 1)[-1]


class Chaos:
    """Everything one scenario starts, in two namespaces, and how to stop it all."""

    def __init__(self, pair: netns.NetnsPair, work: Path, qos: int):
        self.pair = pair
        self.work = work
        self.qos = qos
        self.servers: list[Server] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.edge_state = work / "edge-state"
        self.cloud_state = work / "cloud-state"
        self.collected = work / "collected.txt"
        self.events: list[str] = []
        self.evidence: dict[str, float] = {}   # proof that a fault really hit, read from the stats
        self.started = time.monotonic()

    # -- plumbing --------------------------------------------------------------------------

    def note(self, event: str) -> None:
        stamp = f"{time.monotonic() - self.started:6.1f}s {event}"
        self.events.append(stamp)
        log.info("chaos: %s", stamp)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FACEHUB_") and k != "NOTIFY_SOCKET"}
        return {**env, **S3_ENV, **FAST, "PYTHONPATH": str(ROOT), **extra}

    def spawn(self, name: str, ns: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a program inside ``ns`` in its own process group, output to ``<name>.log``."""
        with open(self.work / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(self.pair.exec_prefix(ns) + args, stdout=out, stderr=subprocess.STDOUT,
                                    env=env or self.env(), cwd=ROOT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def run_in(self, ns: str, args: list[str], timeout: float = 60.0) -> str:
        result = subprocess.run(self.pair.exec_prefix(ns) + args, check=False, capture_output=True, text=True,
                                env=self.env(), cwd=ROOT, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} in {ns} failed: {result.stderr[-2000:]}")
        return result.stdout

    def client(self, ns: str, *args: str, timeout: float = 60.0) -> str:
        return self.run_in(ns, [sys.executable, str(CLIENTS), *args], timeout=timeout)

    def server(self, server: Server, timeout: float = 30.0) -> Server:
        self.servers.append(server)
        return server.start(timeout=timeout)

    def stop_all(self) -> None:
        """SIGTERM to each program (graceful), SIGKILL to its group if it lingers, then the servers.

        SIGTERM goes to the supervisor's pid only, as Docker and Kubernetes send it; the
        supervisor stops its own children.
        """
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                log.warning("chaos: %s ignored SIGTERM for 15s; killing its process group", name)
            _signal_group(proc, signal.SIGKILL)  # also any child left behind
            proc.wait(5)
        for server in self.servers:
            server.kill()

    # -- the two hosts ---------------------------------------------------------------------

    def start_cloud(self) -> None:
        ns = self.pair.cloud
        self.s3 = self.server(MotoS3(self.work / "moto", host="127.0.0.1", netns=ns))
        self.client(ns, "make-bucket", "--endpoint", self.s3.endpoint_url, "--bucket", BUCKET)
        self.relay = self.server(S3Relay(self.work / "relay", self.s3, host="127.0.0.1", netns=ns))
        # Listens on every address: the savers use the cloud's loopback, the forwarder the cable.
        self.cloud_broker = self.server(Mosquitto(self.work / "cloud-broker", host="0.0.0.0", netns=ns,
                                                  extra="sys_interval 1"))
        self.spawn("cloud", ns, [sys.executable, "-m", "facehub.cli", "run", "cloud"], self.env(
            FACEHUB_CLOUD_HOST="127.0.0.1",
            FACEHUB_CLOUD_PORT=str(self.cloud_broker.port),
            FACEHUB_CLOUD_QOS=str(self.qos),
            FACEHUB_SAVER_INSTANCES="2",
            FACEHUB_SAVER_URL=f"s3://{BUCKET}/{PREFIX}",
            FACEHUB_SAVER_ENDPOINT_URL=self.relay.endpoint_url,
            FACEHUB_SUPERVISOR_STATE_DIR=str(self.cloud_state),
        ))
        # Faces reaching the cloud broker before a saver subscribed would have no taker. The
        # savers subscribe as soon as they connect, and they are the broker's only clients.
        self.client(ns, "wait-clients", "--port", str(self.cloud_broker.port), "--count", "2",
                    "--timeout", "60", timeout=90)
        self.note("cloud up: broker, S3, two savers connected")

    def start_edge(self) -> None:
        from facehub import config as facehub_config
        from facehub.edge import detector, forwarder

        ns = self.pair.edge
        self.edge_broker = self.server(Mosquitto(self.work / "edge-broker", host="127.0.0.1", netns=ns))
        port = str(self.edge_broker.port)
        ready = self.work / "collector.ready"
        self.spawn("collector", ns, [sys.executable, str(CLIENTS), "collect", "--port", port,
                                     "--out", str(self.collected), "--ready", str(ready)])
        wait_for(ready.exists, 30, message="the collector's subscription")
        env = self.env(
            FACEHUB_DEVICE_ID=EDGE_DEVICE,
            FACEHUB_LOCAL_HOST="127.0.0.1",
            FACEHUB_LOCAL_PORT=port,
            FACEHUB_LOCAL_QOS=str(self.qos),
            FACEHUB_CLOUD_HOST=self.pair.cloud_addr,
            FACEHUB_CLOUD_PORT=str(self.cloud_broker.port),
            FACEHUB_CLOUD_QOS=str(self.qos),
            FACEHUB_DETECTOR_SOURCE=str(detector.SAMPLE_CLIP),
            FACEHUB_DETECTOR_LOOP="false",
            FACEHUB_FORWARDER_SPOOL_PATH=str(self.work / "spool.db"),
            FACEHUB_SUPERVISOR_STATE_DIR=str(self.edge_state),
        )
        # The forwarder's session exists as after its first run, so the detector's first
        # faces are queued for it even if the detector publishes before it subscribes.
        edge_id, _ = forwarder.client_ids(facehub_config.load(env=env))
        self.client(ns, "seed-session", "--port", port, "--client-id", edge_id,
                    "--topic", f"faces/{EDGE_DEVICE}", "--qos", str(self.qos))
        self.spawn("edge", ns, [sys.executable, "-m", "facehub.cli", "run", "edge"], env)
        wait_for(lambda: self.child_pid("edge", "forwarder"), 30, message="the forwarder to start")
        self.note("edge up: broker, collector, detector, forwarder, logger")

    def start_publisher(self) -> subprocess.Popen:
        self.note(f"publisher starts: {FACES} faces at {RATE:.0f}/s, QoS {self.qos}")
        return self.spawn("publisher", self.pair.edge, [
            sys.executable, str(CLIENTS), "publish", "--port", str(self.edge_broker.port),
            "--device", PUBLISHER_DEVICE, "--count", str(FACES), "--rate", str(RATE),
            "--qos", str(self.qos), "--sent", str(self.work / "sent.txt"),
            "--acked", str(self.work / "acked.txt")])

    # -- observing -------------------------------------------------------------------------

    def status(self, role: str) -> dict:
        state_dir = self.edge_state if role == "edge" else self.cloud_state
        try:
            return json.loads((state_dir / f"supervisor-{role}.json").read_text())
        except (OSError, ValueError):
            return {}

    def child_pid(self, role: str, child: str) -> int | None:
        info = self.status(role).get("children", {}).get(child, {})
        return info.get("pid") if info.get("state") in ("STARTING", "RUNNING") else None

    def check_roles_alive(self) -> None:
        for role in ("edge", "cloud"):
            proc = self.procs[role]
            if proc.poll() is not None:
                raise AssertionError(f"facehub run {role} exited with {proc.returncode}:\n"
                                     f"{self.log_tail(role)}")

    def published(self) -> set[str]:
        try:
            return {line for line in self.collected.read_text().splitlines() if line}
        except OSError:
            return set()

    def stored_keys(self) -> list[str]:
        return json.loads(self.client(self.pair.cloud, "list-s3", "--endpoint", self.s3.endpoint_url,
                                      "--bucket", BUCKET, "--prefix", PREFIX + "/"))

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last warnings and errors of a log (per-face info lines left out)."""
        try:
            text = (self.work / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        wanted = [line for line in text.splitlines()
                  if " INFO " not in line and not line.startswith("face ")]
        return "\n".join(wanted[-lines:])

    def counters(self) -> str:
        """The components' counters, one line per component, for failure messages."""
        lines = []
        for role in ("edge", "cloud"):
            for name, data in sorted(self.status(role).get("stats", {}).items()):
                lines.append(f"{name}: {data.get('counters')} {data.get('gauges')}")
        return "\n".join(lines)

    # -- faults ----------------------------------------------------------------------------

    def kill_child(self, role: str, child: str) -> None:
        pid = wait_for(lambda: self.child_pid(role, child), 30, message=f"{child} running")
        os.kill(pid, signal.SIGKILL)
        self.note(f"SIGKILL {child} (pid {pid})")

    def stat(self, role: str, kind: str, key: str) -> float:
        """A counter or gauge summed over a role's components (both savers, say)."""
        from facehub.runtime import read_stats

        state_dir = self.edge_state if role == "edge" else self.cloud_state
        return sum(data.get(kind, {}).get(key, 0) for data in read_stats(state_dir).values())

    def cut_link(self, seconds: float) -> None:
        self.pair.cut()
        self.note(f"cable cut for {seconds:.0f}s")
        time.sleep(seconds)
        self.evidence["spool depth at the end of the cut"] = self.stat("edge", "gauges", "spool_depth")
        self.pair.restore()
        self.note(f"cable restored ({self.evidence['spool depth at the end of the cut']:.0f} faces spooled)")

    def restart_cloud_broker(self) -> None:
        self.cloud_broker.stop()   # SIGTERM: mosquitto saves sessions and queues to disk
        self.note("cloud broker stopped")
        self.cloud_broker.start()
        self.note("cloud broker started again (persistent sessions restored)")

    def s3_outage(self, seconds: float) -> None:
        errors_before = self.stat("cloud", "counters", "store_errors")
        self.relay.kill()
        self.note(f"S3 unreachable for {seconds:.0f}s")
        time.sleep(seconds)
        self.evidence["store errors during the S3 outage"] = (
            self.stat("cloud", "counters", "store_errors") - errors_before)
        self.relay.start()
        self.note(f"S3 reachable again ({self.evidence['store errors during the S3 outage']:.0f} failed writes)")

    # -- the scenario ----------------------------------------------------------------------

    def run(self, settle_quiet: float, require_all: bool) -> Outcome:
        """Start both hosts, push faces through the faults, wait for storage to settle."""
        self.start_cloud()
        self.start_edge()
        publisher = self.start_publisher()
        # Faults are spread over the 80 s push; each starts at a fixed offset from the
        # publisher's start so that faces are flowing when it hits.
        schedule = [
            (5.0, lambda: self.kill_child("edge", "forwarder")),
            (12.0, lambda: self.cut_link(LINK_CUT)),
            (38.0, self.restart_cloud_broker),
            (46.0, lambda: self.s3_outage(S3_OUTAGE)),
            (62.0, lambda: self.kill_child("cloud", "saver-1")),
        ]
        push_started = time.monotonic()
        for offset, fault in schedule:
            delay = push_started + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.check_roles_alive()
            fault()
        publisher.wait(FACES / RATE + 120)
        self.note(f"publisher done: {self.log_tail('publisher', 1).strip()}")
        return self.settle(settle_quiet, require_all)

    def settle(self, quiet: float, require_all: bool) -> Outcome:
        """Poll until stored and published stop changing for ``quiet`` s (and match, if required)."""
        deadline = time.monotonic() + SETTLE_DEADLINE
        last, since = None, time.monotonic()
        while True:
            self.check_roles_alive()
            outcome = Outcome(self.published(), self.stored_keys())
            now = time.monotonic()
            figures = (len(outcome.published), len(outcome.keys))
            if figures != last:
                last, since = figures, now
            complete = not outcome.lost or not require_all
            if (complete and now - since >= quiet) or now > deadline:
                self.note(f"settled: {outcome.line()}")
                (self.work / "stored-keys.json").write_text(json.dumps(outcome.keys, indent=0))
                return outcome
            time.sleep(2.0)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def namespaces_usable():
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    leftovers = netns.remove_leftovers()
    if leftovers:
        log.warning("removed namespaces left by earlier runs: %s", leftovers)


@pytest.fixture
def pair(namespaces_usable):
    """An edge and a cloud namespace; removed (with whatever still runs inside) even on failure."""
    created = netns.NetnsPair.create()
    try:
        yield created
    finally:
        created.destroy()


@pytest.fixture
def chaos(pair, tmp_path):
    """A scenario factory; every process it started is stopped at the end, pass or fail."""
    scenarios: list[Chaos] = []

    def make(qos: int) -> Chaos:
        scenario = Chaos(pair, tmp_path, qos)
        scenarios.append(scenario)
        return scenario

    try:
        yield make
    finally:
        for scenario in scenarios:
            scenario.stop_all()


def report(scenario: Chaos, outcome: Outcome) -> str:
    """Everything needed to understand a failing run."""
    return "\n".join([
        outcome.line(),
        f"lost (first 10): {sorted(outcome.lost)[:10]}",
        f"stored but never published (first 10): {sorted(outcome.unknown)[:10]}",
        "timeline:", *scenario.events,
        f"evidence: {scenario.evidence}",
        "counters:", scenario.counters(),
        "edge log tail:", scenario.log_tail("edge"),
        "cloud log tail:", scenario.log_tail("cloud"),
    ])


@pytest.mark.timeout(480)
def test_qos1_loses_nothing_and_stores_each_face_once(chaos, capsys):
    scenario = chaos(qos=1)
    started = time.monotonic()
    outcome = scenario.run(settle_quiet=5.0, require_all=True)
    with capsys.disabled():
        print(f"\n{outcome.line()}", flush=True)
    log.info("chaos QoS 1 took %.0fs", time.monotonic() - started)

    # The faults must have bitten: faces piled up in the spool while the cable was cut, and
    # the savers failed to write while S3 was away.
    for what, value in scenario.evidence.items():
        assert value > 0, f"{what}: {value} (the fault had no effect?)\n{report(scenario, outcome)}"
    acked = set((scenario.work / "acked.txt").read_text().split())
    assert len(acked) == FACES, f"the edge broker acknowledged {len(acked)} of {FACES} faces"
    assert acked <= outcome.published, "the collector missed faces the edge broker acknowledged"
    # pytest.fail, not assert: the message is the report, without a dump of 2,000 ids.
    if outcome.lost or outcome.unknown or outcome.duplicates:
        pytest.fail(report(scenario, outcome), pytrace=False)
    assert len(outcome.keys) == len(outcome.published)


@pytest.mark.timeout(480)
def test_qos0_contrast_shows_what_it_loses(chaos, capsys):
    scenario = chaos(qos=0)
    started = time.monotonic()
    outcome = scenario.run(settle_quiet=15.0, require_all=False)
    with capsys.disabled():
        print(f"\nqos0: {outcome.line()}", flush=True)
    log.info("chaos QoS 0 took %.0fs", time.monotonic() - started)
    # Loss is the point of this run; it must still have pushed every face and stored some.
    if len(outcome.published) < FACES or not outcome.stored or outcome.unknown:
        pytest.fail(report(scenario, outcome), pytrace=False)
    # QoS 0 keeps nothing for a killed forwarder or a cut link: if nothing was lost, the faults did not bite
    assert outcome.lost, f"QoS 0 lost nothing under the same faults\n{report(scenario, outcome)}"
