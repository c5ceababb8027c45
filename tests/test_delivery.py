"""Liveness and delivery as separate signals, fast reconnects, one log line per storage outage.

Real processes throughout: ``facehub run edge``/``cloud`` or a component under the real
supervisor, real mosquitto brokers stopped and started again on their ports, S3 (moto behind
a TCP relay) cut mid-stream and restored, and ``facehub health`` run as the command a probe runs.
The rule itself (which gauges count, how ages are computed) is unit-tested at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from facehub import messages, mqtt
from facehub.backoff import Backoff
from facehub.cloud.saver import StorageOutage
from facehub.config import BrokerConfig, SaverConfig
from facehub.dev.servers import S3_ENV, Mosquitto, Server, list_objects, wait_for
from facehub.process import health

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).parent
DEVICE = "cam-7"
RECONNECT_BOUND = 5.0   # seconds from a broker's restart to every client connected again
DELIVERY_TIMEOUT = 3.0  # supervisor.delivery_timeout in these tests


# -- helpers -------------------------------------------------------------------------------------


def logged_broker(broker_factory, tmp_path: Path, name: str) -> Mosquitto:
    """A real mosquitto that also logs to a file: mosquitto flushes that one line by line (stdout it
    buffers), so a test sees each client connect as it happens."""
    return broker_factory(name, extra=f"log_dest file {connections_log(tmp_path / name)}")


def connections_log(workdir: Path) -> Path:
    return workdir / "connections.log"


def connects(broker: Mosquitto, client_id: str) -> int:
    """How often the broker has accepted ``client_id`` so far."""
    path = connections_log(broker.workdir)
    text = path.read_text(errors="replace") if path.exists() else ""
    return text.count(f" as {client_id} (")


def jpeg(n: int) -> bytes:
    """A small real JPEG (the saver decodes what it stores); ``n`` makes each one different."""
    image = np.full((64, 64, 3), (n * 37) % 256, np.uint8)
    cv2.putText(image, str(n), (4, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    return encoded.tobytes()


def publish(port: int, faces: list[messages.Face]) -> None:
    """Publish faces at QoS 1 and wait until the broker has acknowledged every one."""
    config = BrokerConfig(port=port)
    client = mqtt.make_client(config, f"test-publisher-{time.monotonic_ns()}")
    state = mqtt.ConnectionState("test publisher")
    state.attach(client)
    mqtt.start(client, config, persistent=False)
    try:
        assert state.connected.wait(10), "publisher could not connect"
        infos = [client.publish(f"faces/{face.device_id}", face.image, qos=1, properties=face.properties())
                 for face in faces]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        mqtt.stop(client)


class Subscriber:
    """A persistent QoS 1 subscriber (it survives its broker's restart): the face ids it received."""

    def __init__(self, port: int, client_id: str):
        self.ids: set[str] = set()
        self.subscribed = threading.Event()
        config = BrokerConfig(port=port)
        self.client = mqtt.make_client(config, client_id)
        self.client.on_connect = lambda c, *_: c.subscribe("faces/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.ids.add(dict(m.properties.UserProperty)["face-id"])
        mqtt.ConnectionState("test subscriber").attach(self.client)
        mqtt.start(self.client, config, persistent=True)
        assert self.subscribed.wait(10), "subscriber could not subscribe"

    def close(self) -> None:
        mqtt.stop(self.client)


def face(n: int) -> messages.Face:
    return messages.Face(image=jpeg(n), device_id=DEVICE, face_id=f"face{n:04d}", frame=n, box=(1, 2, 30, 40))


class Role:
    """A real supervisor process (``facehub run ROLE`` or the test launcher) with its log and state dir."""

    def __init__(self, command: list[str], env: dict[str, str], state_dir: Path, log_path: Path):
        self.state_dir = state_dir
        self.env = {**env, "FACEHUB_SUPERVISOR_STATE_DIR": str(state_dir)}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def health(self, *flags: str) -> subprocess.CompletedProcess:
        """``facehub health FLAGS`` as a probe runs it: a new process reading the state dir."""
        return subprocess.run([sys.executable, "-m", "facehub.cli", "health", *flags], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    def stats(self, name: str) -> dict:
        try:
            return json.loads((self.state_dir / f"{name}.stats.json").read_text())
        except (OSError, ValueError):
            return {}

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self._log.close()


@pytest.fixture
def roles():
    started: list[Role] = []

    def start(command: list[str], env: dict[str, str], state_dir: Path, log_path: Path) -> Role:
        started.append(Role(command, env, state_dir, log_path))
        return started[-1]

    yield start
    for role in started:
        if role.proc.poll() is None:
            os.killpg(role.proc.pid, signal.SIGKILL)
            role.proc.wait()


def base_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FACEHUB_")}
    env.pop("NOTIFY_SOCKET", None)
    return {**env, "PYTHONPATH": str(ROOT), "FACEHUB_DEVICE_ID": DEVICE,
            "FACEHUB_SUPERVISOR_STATUS_INTERVAL": "0.5",
            "FACEHUB_SUPERVISOR_DELIVERY_TIMEOUT": str(DELIVERY_TIMEOUT), **settings}


def health_until(role: Role, returncode: int, timeout: float, *flags: str) -> subprocess.CompletedProcess:
    """Run ``facehub health FLAGS`` until it exits with ``returncode`` (fails after ``timeout``); that run."""
    last: list[subprocess.CompletedProcess] = []

    def probe() -> bool:
        assert role.proc.poll() is None, f"the supervisor exited: {role.output()[-2000:]}"
        last[:] = [role.health(*flags)]
        return last[0].returncode == returncode

    wait_for(probe, timeout, interval=0.1, message=f"facehub health {' '.join(flags)} exiting {returncode}")
    return last[0]


# -- liveness and delivery -------------------------------------------------------------------------


def test_delivery_turns_red_while_the_cloud_is_down_and_green_when_it_is_back(broker_factory, tmp_path, roles):
    """The forwarder under the real supervisor; ``facehub health`` stays green throughout (the
    processes are fine), ``facehub health --delivery`` turns red once the cloud broker has been
    away for longer than T and green again once it is back and the spool has drained."""
    edge, cloud = broker_factory("edge"), broker_factory("cloud")
    subscriber = Subscriber(cloud.port, "test-cloud-subscriber")
    env = base_env(FACEHUB_LOCAL_PORT=str(edge.port), FACEHUB_CLOUD_PORT=str(cloud.port),
                   FACEHUB_FORWARDER_SPOOL_PATH=str(tmp_path / "spool.db"), FACEHUB_FORWARDER_FSYNC="off")
    role = roles([sys.executable, str(TESTS / "facehub_supervised.py"), "run", "test", str(tmp_path / "state"),
                  "forwarder=facehub.edge.forwarder:run"], env, tmp_path / "state", tmp_path / "edge.log")
    try:
        health_until(role, 0, 60, "--delivery")
        publish(edge.port, [face(1)])
        wait_for(lambda: "face0001" in subscriber.ids, 20, message="a face through the forwarder")

        cloud.stop()
        down = time.monotonic()
        publish(edge.port, [face(2)])  # waits in the spool while the cloud is away
        red = health_until(role, 1, DELIVERY_TIMEOUT + 20, "--delivery")
        red_after = time.monotonic() - down
        live = role.health()
        as_json = json.loads(role.health("--delivery", "--json").stdout)
        wait_for(lambda: "oldest spooled waiting" in role.health("--delivery").stdout, 20,
                 message="the spooled face reported too")

        cloud.start()
        up = time.monotonic()
        health_until(role, 0, 30, "--delivery")
        green_after = time.monotonic() - up
        wait_for(lambda: "face0002" in subscriber.ids, 20, message="the spooled face forwarded")
    finally:
        print(role.output()[-3000:])
        role.stop()
        subscriber.close()

    print(f"--delivery red {red_after:.1f}s after the cloud broker stopped (T = {DELIVERY_TIMEOUT:g}s), "
          f"green {green_after:.1f}s after it started again")
    assert red.returncode == 1
    assert red.stdout.startswith("not delivering: forwarder: cloud down for "), red.stdout
    assert red.stdout.strip().endswith(f"(delivery_timeout {DELIVERY_TIMEOUT:g}s)")
    assert red_after >= DELIVERY_TIMEOUT - 0.25, "red before the outage was T old"
    assert live.returncode == 0 and live.stdout.startswith("healthy:"), "liveness must not follow the outage"
    assert as_json["healthy"] is True and as_json["delivery"]["delivering"] is False
    assert "cloud down" in as_json["delivery"]["reason"] and as_json["delivery"]["timeout"] == DELIVERY_TIMEOUT
    gauges = as_json["statuses"][0]["stats"]["forwarder"]["gauges"]
    assert gauges["cloud_down_since"] is not None and gauges["local_down_since"] is None


# -- reconnects ------------------------------------------------------------------------------------


def test_every_client_reconnects_within_5s_of_its_broker_restart(broker_factory, tmp_path, roles):
    """``facehub run edge`` (detector, forwarder on both brokers, logger) and ``facehub run cloud``
    (a saver) with the default reconnect settings. Both brokers stay down for 15 s, long enough for
    every client's backoff to reach its cap, then start again on their ports; each client must be
    back (the broker logs it) within 5 s of its broker's start."""
    from facehub.edge.detector import SAMPLE_CLIP

    edge, cloud = logged_broker(broker_factory, tmp_path, "edge"), logged_broker(broker_factory, tmp_path, "cloud")
    env = base_env(FACEHUB_LOCAL_PORT=str(edge.port), FACEHUB_CLOUD_PORT=str(cloud.port),
                   FACEHUB_FORWARDER_SPOOL_PATH=str(tmp_path / "spool.db"), FACEHUB_FORWARDER_FSYNC="off",
                   FACEHUB_DETECTOR_SOURCE=str(SAMPLE_CLIP), FACEHUB_DETECTOR_LOOP="true",
                   FACEHUB_DETECTOR_FPS="5", FACEHUB_SAVER_URL=str(tmp_path / "faces"))
    command = [sys.executable, "-m", "facehub.cli", "run"]
    cloud_role = roles(command + ["cloud"], env, tmp_path / "cloud-state", tmp_path / "cloud.log")
    edge_role = roles(command + ["edge"], env, tmp_path / "edge-state", tmp_path / "edge.log")
    clients = {edge: [f"facehub-detector-{DEVICE}", f"facehub-forwarder-{DEVICE}", f"facehub-logger-{DEVICE}"],
               cloud: [f"facehub-forwarder-{DEVICE}-cloud", "facehub-saver-1"]}
    times: dict[str, float] = {}
    try:
        for broker, ids in clients.items():
            for client_id in ids:
                wait_for(lambda b=broker, c=client_id: connects(b, c) >= 1, 90, interval=0.2,
                         message=f"{client_id} connected")
        for broker in clients:
            broker.stop()
        time.sleep(15)  # the outage itself: backoff grows to its cap meanwhile
        for broker, ids in clients.items():
            before = {client_id: connects(broker, client_id) for client_id in ids}
            started = time.monotonic()
            broker.start()
            while not set(ids) <= set(times):
                elapsed = time.monotonic() - started
                for client_id in ids:
                    if client_id not in times and connects(broker, client_id) > before[client_id]:
                        times[client_id] = elapsed
                assert elapsed < 30, f"not back 30s after the broker restart: {set(ids) - set(times)}"
                time.sleep(0.02)
    finally:
        for role in (edge_role, cloud_role):
            role.stop()
    print("reconnected after the broker restart: "
          + ", ".join(f"{client_id} {seconds:.2f}s" for client_id, seconds in times.items()))
    assert set(times) == {c for ids in clients.values() for c in ids}
    slow = {client_id: round(seconds, 2) for client_id, seconds in times.items() if seconds > RECONNECT_BOUND}
    assert not slow, f"clients back later than {RECONNECT_BOUND:g}s after their broker: {slow}"


# -- storage outages -------------------------------------------------------------------------------


class S3Relay(Server):
    """A TCP relay in front of moto (the chaos test's): killing it is an S3 outage that closes
    open connections and refuses new ones, while moto keeps the objects stored so far."""

    def __init__(self, workdir: Path, target: Server):
        super().__init__("s3-relay", workdir)
        self.target = target

    def command(self) -> list[str]:
        return [sys.executable, str(TESTS / "chaos_clients.py"), "proxy", "--listen", f"{self.host}:{self.port}",
                "--target", f"{self.target.host}:{self.target.port}"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class SteadyPublisher:
    """Publishes a new face every ``interval`` seconds from a thread, each acknowledged by the broker."""

    def __init__(self, port: int, start: int, interval: float = 0.02):
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port, start, interval), daemon=True)
        self._thread.start()

    def _run(self, port: int, number: int, interval: float) -> None:
        config = BrokerConfig(port=port)
        client = mqtt.make_client(config, "test-steady-publisher")
        state = mqtt.ConnectionState("steady publisher")
        state.attach(client)
        mqtt.start(client, config, persistent=False)
        try:
            state.connected.wait(10)
            while not self._stop.wait(interval):
                item = face(number)
                info = client.publish(f"faces/{DEVICE}", item.image, qos=1, properties=item.properties())
                info.wait_for_publish(10)
                if info.is_published():
                    self.sent.append(item.face_id)
                number += 1
        finally:
            mqtt.stop(client)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        return self.sent


def test_a_storage_outage_is_logged_once_each_way_and_turns_delivery_red(broker, moto, bucket, tmp_path, roles):
    """``facehub run cloud`` writing to S3 while faces keep arriving; S3 goes away mid-stream (open
    connections closed, new ones refused) and comes back: one WARNING when storage starts failing,
    one "back after N failures" line, no line per retry and no asyncio "Task exception was never
    retrieved" noise; meanwhile ``facehub health --delivery`` says why faces are not moving while
    ``facehub health`` stays green, and every face is stored in the end."""
    relay = S3Relay(tmp_path / "relay", moto).start()
    env = base_env(**S3_ENV, FACEHUB_CLOUD_PORT=str(broker.port), FACEHUB_SAVER_URL=f"s3://{bucket}/run",
                   FACEHUB_SAVER_ENDPOINT_URL=relay.endpoint_url, FACEHUB_SAVER_RETRY_MIN="0.2",
                   FACEHUB_SAVER_RETRY_MAX="1", FACEHUB_SAVER_TIMEOUT="5")
    role = roles([sys.executable, "-m", "facehub.cli", "run", "cloud"], env, tmp_path / "state",
                 tmp_path / "cloud.log")

    def stored() -> set[str]:
        keys = list_objects(moto.endpoint_url, bucket, f"run/{DEVICE}/")
        return {key.rsplit("-", 1)[1].removesuffix(".jpg") for key in keys if key.endswith(".jpg")}

    steady = None
    try:
        wait_for(lambda: role.stats("saver-1").get("gauges", {}).get("subscribed"), 60, interval=0.2,
                 message="saver subscribed")
        publish(broker.port, [face(1)])
        wait_for(lambda: "face0001" in stored(), 30, interval=0.2, message="a face stored")

        steady = SteadyPublisher(broker.port, start=100)
        wait_for(lambda: len(stored()) >= 30, 60, interval=0.1, message="faces streaming into S3")
        relay.kill()  # mid-stream: writes in flight fail on closed connections
        red = health_until(role, 1, DELIVERY_TIMEOUT + 30, "--delivery")
        live = role.health()
        gauges = role.stats("saver-1")["gauges"]
        sent = ["face0001", *steady.stop()]

        relay.start()
        wait_for(lambda: set(sent) <= stored(), 90, interval=0.5, message="every face stored after the outage")
        health_until(role, 0, 30, "--delivery")
        errors = role.stats("saver-1")["counters"]["store_errors"]
    finally:
        if steady:
            steady.stop()
        role.stop()
        relay.kill()
    output = role.output()
    print(output[-3000:])

    assert red.returncode == 1 and red.stdout.startswith("not delivering: saver-1: "), red.stdout
    assert "store failing for" in red.stdout or "oldest unacked waiting" in red.stdout, red.stdout
    assert live.returncode == 0, live.stdout
    assert gauges["store_failing_since"] is not None and gauges["oldest_unacked_age"] > 0
    failing = [line for line in output.splitlines() if re.search(r"storage s3://\S+ failing: ", line)]
    back = [line for line in output.splitlines() if re.search(r"storage s3://\S+ back after ", line)]
    assert len(failing) == 1, failing
    assert " WARNING " in failing[0], failing[0]
    assert len(back) == 1, back
    match = re.search(r"back after (\d+) failures in (\d+\.\d)s", back[0])
    assert match, back[0]
    assert 0 < int(match[1]) <= errors, (back[0], errors)
    print(f"storage outage: {back[0].split(': ', 1)[1]} ({errors} store_errors counted)")
    assert "cannot store" not in output, "a line per retry"
    assert "Task exception was never retrieved" not in output


def test_s3_writes_go_without_expect_100_continue(moto, bucket):
    """The cause of the asyncio noise above: with ``Expect: 100-continue`` aiohttp sends the headers
    from a task nobody awaits when the connection is closing. Every S3 client the store makes
    (s3fs may make new ones) must leave the header out."""
    from facehub.cloud.storage import S3Store

    store = S3Store(SaverConfig(url=f"s3://{bucket}/run", endpoint_url=moto.endpoint_url, key="testing",
                                secret="testing", region="us-east-1"))
    sent: list[dict] = []
    store.fs.connect()
    store.fs.s3.meta.events.register("before-send.s3", lambda request, **_: sent.append(dict(request.headers)))
    assert store.put_face(face(1)) is True
    assert store.put_quarantine("faces/x", b"junk", "not an image", None) is True
    puts = [headers for headers in sent if "If-None-Match" in headers or "Content-Length" in headers]
    assert puts, sent
    assert not [headers for headers in sent if "Expect" in headers], sent
    store.fs.connect(refresh=True)  # a new client from the same session
    sent.clear()
    store.fs.s3.meta.events.register("before-send.s3", lambda request, **_: sent.append(dict(request.headers)))
    assert store.put_face(face(2)) is True
    assert sent and not [headers for headers in sent if "Expect" in headers], sent


# -- the rule, without processes -------------------------------------------------------------------


def status_with(gauges: dict, state: str = "RUNNING", pid: int = 42, stats_pid: int = 42,
                updated: float = 1000.0) -> dict:
    return {"role": "edge", "children": {"forwarder": {"state": state, "pid": pid}},
            "stats": {"forwarder": {"pid": stats_pid, "updated": updated, "gauges": gauges}}}


@pytest.mark.parametrize("gauges, now, expected", [
    ({"cloud_down_since": 990.0}, 1000.0, []),                              # 10 s < T
    ({"cloud_down_since": 900.0}, 1000.0, ["forwarder: cloud down for 100s"]),
    ({"cloud_down_since": None, "cloud_connected": True}, 1000.0, []),
    ({"store_failing_since": 900.0}, 1000.0, ["forwarder: store failing for 100s"]),
    ({"oldest_spooled_age": 50.0}, 1000.0, []),
    ({"oldest_spooled_age": 50.0}, 1020.0, ["forwarder: oldest spooled waiting for 70s"]),  # stats 20 s old
    ({"oldest_spooled_age": 70.0, "local_down_since": 800.0}, 1000.0,
     ["forwarder: local down for 200s", "forwarder: oldest spooled waiting for 70s"]),
    ({"spool_depth": 5000, "edge_connected": False, "down_since": 1.0, "oldest_age": 99.0,
      "cloud_down_since": True}, 1000.0, []),                               # not delivery gauges
])
def test_delivery_rule_over_gauges(gauges, now, expected):
    assert health.delivery_problems(status_with(gauges), 60.0, now) == expected


def test_delivery_rule_ignores_children_not_running_or_stats_of_another_pid():
    old = {"cloud_down_since": 1.0}
    assert health.delivery_problems(status_with(old, state="STOPPED"), 60.0, 1000.0) == []
    assert health.delivery_problems(status_with(old, state="BACKOFF", pid=None), 60.0, 1000.0) == []
    assert health.delivery_problems(status_with(old, stats_pid=41), 60.0, 1000.0) == []
    ok, reason = health.delivery_verdict([status_with(old)], 60.0, 1000.0)
    assert not ok and reason == "forwarder: cloud down for 999s (delivery_timeout 60s)"


def test_backoff_jitter_never_exceeds_the_cap():
    backoff = Backoff(0.5, 4.0, jitter=0.25)
    delays = [backoff.next() for _ in range(200)]
    assert max(delays) <= 4.0
    assert min(delays[10:]) >= 3.0 and len({round(d, 3) for d in delays[10:]}) > 50, "capped delays spread"
    with pytest.raises(ValueError):
        Backoff(1, 2, jitter=1.0)


def test_storage_outage_judges_results_by_when_their_call_started(caplog):
    outage = StorageOutage("s3://bucket/run")
    with caplog.at_level(logging.INFO, logger="facehub.cloud.saver"):
        outage.failed(1.0, "EndpointConnectionError: down")
        outage.failed(2.0, "EndpointConnectionError: down")
        outage.succeeded(0.5)           # a slow call from before the outage: storage is not back
        assert outage.failing_for() is not None
        outage.succeeded(3.0)           # back
        outage.failed(2.5, "ReadTimeout")  # started before the success: no new outage
        assert outage.failing_for() is None
        outage.failed(4.0, "NoSuchBucket")  # a new outage
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "storage s3://bucket/run failing: EndpointConnectionError: down; retrying with backoff, " \
                       "faces stay unacknowledged with the broker meanwhile"
    assert re.fullmatch(r"storage s3://bucket/run back after 2 failures in \d+\.\ds", lines[1])
    assert lines[2].startswith("storage s3://bucket/run failing: NoSuchBucket")
    assert len(lines) == 3
