"""The forwarder between two real mosquitto brokers: intact, durable, loss-free.

Each test starts an edge ("local") and a cloud broker, publishes real
wire-format face messages at the edge and watches what a subscriber on the
cloud broker receives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from facehub.edge import forwarder
from facehub import messages, mqtt
from facehub.config import BrokerConfig, Config
from facehub.runtime import Runtime, read_stats
from facehub.edge.spool import Spool
from facehub.dev.servers import wait_for

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cam1"
FORWARDER_COMMAND = [sys.executable, "-m", "facehub.cli", "forwarder"]


def broker_config(broker, qos: int = 1) -> BrokerConfig:
    return BrokerConfig(host=broker.host, port=broker.port, qos=qos, reconnect_min=1, reconnect_max=2,
                        keepalive=10)


def make_config(tmp_path: Path, local, cloud, **forwarder_settings) -> Config:
    config = Config(device_id=DEVICE)
    config.local = broker_config(local)
    config.cloud = broker_config(cloud)
    config.forwarder.spool_path = str(tmp_path / "spool" / "spool.db")
    for key, value in forwarder_settings.items():
        setattr(config.forwarder, key, value)
    config.supervisor.state_dir = str(tmp_path / "state")
    return config.validate()


def make_faces(count: int, size: int = 1000, start: int = 0) -> list[messages.Face]:
    return [messages.Face(image=b"\xff\xd8\xff" + os.urandom(size), device_id=DEVICE, face_id=f"f{start + n:06d}",
                          frame=start + n, box=(n, 2 * n, 40, 50), score=0.75, track=n % 7)
            for n in range(count)]


def publish(broker, faces: list[messages.Face], qos: int = 1) -> None:
    """Publish faces at the edge broker and wait until the broker has them all."""
    client = mqtt.make_client(broker_config(broker), f"test-publisher-{time.monotonic_ns()}")
    state = mqtt.ConnectionState("test publisher")
    state.attach(client)
    mqtt.start(client, broker_config(broker), persistent=False)
    try:
        assert state.connected.wait(10), "publisher could not connect"
        infos = [client.publish(f"faces/{f.device_id}", f.image, qos=qos,
                                properties=f.properties()) for f in faces]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        mqtt.stop(client)


class Collector:
    """A persistent QoS 1 subscriber on the cloud broker, recording every message."""

    def __init__(self, broker, client_id: str = "test-collector"):
        self.received: list[tuple[str, bytes, object]] = []
        self.ids: list[str] = []
        self.distinct: set[str] = set()
        self._lock = threading.Lock()
        self.state = mqtt.ConnectionState("test collector")
        config = broker_config(broker)
        self.client = mqtt.make_client(config, client_id)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe("faces/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.state.attach(self.client)
        mqtt.start(self.client, config, persistent=True)
        # The subscription must exist before anything is forwarded.
        assert self.subscribed.wait(10), "collector could not subscribe"

    def _on_message(self, client, userdata, message):
        face_id = dict(message.properties.UserProperty)["face-id"]
        with self._lock:
            self.received.append((message.topic, bytes(message.payload), message.properties))
            self.ids.append(face_id)
            self.distinct.add(face_id)

    def face_ids(self) -> list[str]:
        """Every face id received, duplicates included, in arrival order."""
        with self._lock:
            return list(self.ids)

    def wait_for_ids(self, ids, timeout: float = 60) -> None:
        wanted = set(ids)

        def arrived() -> bool:
            with self._lock:
                return wanted <= self.distinct

        wait_for(arrived, timeout, message=f"{len(wanted)} faces at the cloud broker")

    def close(self) -> None:
        mqtt.stop(self.client)


@pytest.fixture
def brokers(broker_factory):
    return broker_factory("local"), broker_factory("cloud")


@pytest.fixture
def collector_factory():
    made = []

    def make(broker, client_id: str = "test-collector") -> Collector:
        made.append(Collector(broker, client_id))
        return made[-1]

    yield make
    for collector in made:
        collector.close()


@contextmanager
def running_forwarder(config: Config):
    """The forwarder in a thread of this process, stopped (and checked) at the end."""
    runtime = Runtime("forwarder", state_dir=config.supervisor.state_dir)
    errors: list[BaseException] = []

    def target():
        try:
            forwarder.run(config, runtime)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test
            errors.append(error)

    thread = threading.Thread(target=target, name="forwarder", daemon=True)
    thread.start()
    try:
        yield runtime
    finally:
        runtime.stop.set()
        thread.join(30)
    assert not thread.is_alive(), "forwarder did not stop"
    if errors:
        raise errors[0]


def counter(runtime: Runtime, key: str) -> int:
    return runtime.counter(key)


def gauge(runtime: Runtime, key: str):
    return runtime.gauge_value(key)


def test_forwards_payload_and_properties_intact(tmp_path, brokers, collector_factory):
    local, cloud = brokers
    collector = collector_factory(cloud)
    faces = make_faces(50)
    with running_forwarder(make_config(tmp_path, local, cloud)) as runtime:
        wait_for(lambda: gauge(runtime, "edge_subscribed"), 10, message="forwarder subscribed")
        publish(local, faces)
        collector.wait_for_ids([f.face_id for f in faces], timeout=30)
        wait_for(lambda: counter(runtime, "forwarded") == 50, 10, message="50 forwarded")
        wait_for(lambda: gauge(runtime, "spool_depth") == 0, 10, message="spool drained")
        assert counter(runtime, "received") == 50 and counter(runtime, "spooled") == 50
        assert counter(runtime, "spool_dropped") == 0

    sent = {f.face_id: f for f in faces}
    for topic, payload, props in collector.received:
        face = messages.parse(topic, payload, props, 10_000)
        original = sent[face.face_id]
        assert topic == "faces/cam1"
        assert payload == original.image
        assert props.ContentType == "image/jpeg"
        assert props.UserProperty == list(original.metadata().items())
        assert face == original
    stats = read_stats(tmp_path / "state")["forwarder"]
    assert stats["counters"]["forwarded"] == 50 and stats["gauges"]["spool_depth"] == 0


@pytest.mark.parametrize("local_qos, cloud_qos", [(1, 0), (0, 0), (2, 2)])
def test_other_qos_levels_forward_and_drain_the_spool(tmp_path, brokers, collector_factory,
                                                       local_qos, cloud_qos):
    local, cloud = brokers
    collector = collector_factory(cloud)
    config = make_config(tmp_path, local, cloud)
    config.local.qos, config.cloud.qos = local_qos, cloud_qos
    faces = make_faces(100)
    with running_forwarder(config) as runtime:
        wait_for(lambda: gauge(runtime, "edge_subscribed"), 10, message="forwarder subscribed")
        publish(local, faces, qos=local_qos)
        collector.wait_for_ids([f.face_id for f in faces], timeout=30)
        wait_for(lambda: counter(runtime, "forwarded") == 100 and gauge(runtime, "spool_depth") == 0,
                 10, message="spool drained")


def test_cloud_outage_spools_then_drains_without_loss(tmp_path, brokers, collector_factory):
    """The cloud broker goes down mid-stream; everything waits in the spool and arrives later."""
    local, cloud = brokers
    collector = collector_factory(cloud)
    first, during, after = make_faces(100), make_faces(300, start=100), make_faces(50, start=400)
    peak = [0]

    with running_forwarder(make_config(tmp_path, local, cloud, inflight=20)) as runtime:
        def depth():
            value = gauge(runtime, "spool_depth") or 0
            peak[0] = max(peak[0], value)
            return value

        wait_for(lambda: gauge(runtime, "edge_subscribed"), 10, message="forwarder subscribed")
        publish(local, first)
        collector.wait_for_ids([f.face_id for f in first[:10]], timeout=30)
        cloud.stop()  # while the rest of the first batch may still be in flight
        publish(local, during)
        wait_for(lambda: depth() >= len(during), 30, message="spool holding the outage's faces")
        assert not gauge(runtime, "cloud_connected")

        cloud.start()
        publish(local, after)
        collector.wait_for_ids([f.face_id for f in first + during + after], timeout=60)
        wait_for(lambda: depth() == 0, 10, message="spool drained")
        assert counter(runtime, "spool_dropped") == 0

    assert peak[0] >= len(during)
    assert set(collector.face_ids()) == {f.face_id for f in first + during + after}


def test_full_spool_drops_oldest_and_counts(tmp_path, brokers, collector_factory, caplog):
    local, cloud = brokers
    collector = collector_factory(cloud)
    cloud.stop()
    faces = make_faces(120)
    with running_forwarder(make_config(tmp_path, local, cloud, spool_max_messages=50)) as runtime:
        wait_for(lambda: gauge(runtime, "edge_subscribed"), 10, message="forwarder subscribed")
        publish(local, faces)
        wait_for(lambda: counter(runtime, "spooled") == 120, 30, message="120 spooled")
        wait_for(lambda: gauge(runtime, "spool_depth") == 50, 5, message="depth at the limit")
        assert counter(runtime, "spool_dropped") == 70

        cloud.start()
        newest = [f.face_id for f in faces[-50:]]
        collector.wait_for_ids(newest, timeout=60)
        wait_for(lambda: counter(runtime, "forwarded") == 50, 10, message="50 forwarded")
    assert set(collector.face_ids()) == set(newest)
    assert "spool full" in caplog.text


def test_brokers_down_at_start_and_edge_restart(tmp_path, brokers, collector_factory):
    """Neither broker up at start is no crash; an edge broker restart keeps the session."""
    local, cloud = brokers
    collector = collector_factory(cloud)
    local.stop()
    cloud.stop()
    with running_forwarder(make_config(tmp_path, local, cloud)) as runtime:
        runtime.stop.wait(1.0)  # let it try and fail to connect
        local.start()
        cloud.start()
        wait_for(lambda: gauge(runtime, "edge_subscribed") and gauge(runtime, "cloud_connected"), 15,
                 message="forwarder connected to both brokers")
        first = make_faces(20)
        publish(local, first)
        collector.wait_for_ids([f.face_id for f in first], timeout=30)

        local.stop()
        second = make_faces(20, start=20)
        local.start()
        publish(local, second)  # queued for the forwarder's persistent session
        collector.wait_for_ids([f.face_id for f in second], timeout=30)


def forwarder_process(config: Config, log_path: Path) -> subprocess.Popen:
    """``facehub forwarder`` as its own process, configured only through FACEHUB_* variables."""
    env = dict(os.environ,
               FACEHUB_DEVICE_ID=config.device_id,
               FACEHUB_LOG_LEVEL="INFO",
               FACEHUB_LOCAL_HOST=config.local.host, FACEHUB_LOCAL_PORT=str(config.local.port),
               FACEHUB_LOCAL_RECONNECT_MAX="2",
               FACEHUB_CLOUD_HOST=config.cloud.host, FACEHUB_CLOUD_PORT=str(config.cloud.port),
               FACEHUB_CLOUD_RECONNECT_MAX="2",
               FACEHUB_FORWARDER_SPOOL_PATH=config.forwarder.spool_path,
               FACEHUB_FORWARDER_FSYNC=config.forwarder.fsync,
               FACEHUB_SUPERVISOR_STATE_DIR=config.supervisor.state_dir,
               PYTHONPATH=str(ROOT))
    env.pop("FACEHUB_CONFIG", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen(FORWARDER_COMMAND, env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stats_gauge(config: Config, key: str):
    return read_stats(config.supervisor.state_dir).get("forwarder", {}).get("gauges", {}).get(key)


def test_kill_9_mid_stream_loses_nothing(tmp_path, brokers, collector_factory):
    """SIGKILL the forwarder while faces stream through it; after a restart every face arrives."""
    local, cloud = brokers
    collector = collector_factory(cloud)
    config = make_config(tmp_path, local, cloud)
    faces = make_faces(1500, size=5000)
    log_path = tmp_path / "forwarder.log"

    proc = forwarder_process(config, log_path)
    try:
        wait_for(lambda: stats_gauge(config, "edge_subscribed"), 20, message="forwarder subscribed")
        publisher = threading.Thread(target=_publish_in_batches, args=(local, faces), daemon=True)
        publisher.start()
        wait_for(lambda: len(collector.face_ids()) >= 300, 60, message="300 faces forwarded")
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        arrived_before_kill = len(set(collector.face_ids()))
        with Spool(config.forwarder.spool_path) as spool:
            left_in_spool = spool.depth
        publisher.join(60)
        assert not publisher.is_alive()

        proc = forwarder_process(config, log_path)
        collector.wait_for_ids([f.face_id for f in faces], timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
    ids = collector.face_ids()
    assert set(ids) == {f.face_id for f in faces}
    print(f"\nkill -9 after {arrived_before_kill} faces, {left_in_spool} left in the spool; "
          f"published={len(faces)} arrived={len(set(ids))} duplicates={len(ids) - len(set(ids))}")


def _publish_in_batches(broker, faces: list[messages.Face], batch: int = 50) -> None:
    for start in range(0, len(faces), batch):
        publish(broker, faces[start:start + batch])


def test_throughput_report(tmp_path, brokers, collector_factory):
    """Forwarder throughput, 10 KB faces at QoS 1 through two real brokers (printed, not asserted).

    The forwarder runs as its own process, paused (SIGSTOP) while the faces are
    queued at the edge broker, so the figure is the forwarder's own rate.
    """
    local, cloud = brokers
    collector = collector_factory(cloud)
    count = 2000
    lines = []
    for run, fsync in enumerate(("full", "normal")):
        config = make_config(tmp_path / fsync, local, cloud, fsync=fsync)
        faces = make_faces(count, size=10_000, start=run * count)
        proc = forwarder_process(config, tmp_path / f"forwarder-{fsync}.log")
        try:
            wait_for(lambda: stats_gauge(config, "edge_subscribed") and stats_gauge(config, "cloud_connected"),
                     20, message="forwarder connected")
            os.kill(proc.pid, signal.SIGSTOP)
            publish(local, faces)
            started = time.monotonic()
            os.kill(proc.pid, signal.SIGCONT)
            collector.wait_for_ids([f.face_id for f in faces], timeout=180)
            elapsed = time.monotonic() - started
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            assert proc.wait(15) == 0
        lines.append(f"forwarder throughput fsync={fsync}: {count} x 10 KB faces at QoS 1 in "
                     f"{elapsed:.2f}s = {count / elapsed:.0f} msg/s")
    print("\n" + "\n".join(lines))


def test_honours_the_cloud_brokers_receive_maximum(tmp_path, broker_factory, collector_factory):
    """A cloud broker accepting fewer in-flight messages than forwarder.inflight is not flooded."""
    local = broker_factory("local")
    cloud = broker_factory("cloud", extra="max_inflight_messages 5")
    collector = collector_factory(cloud)
    faces = make_faces(300)
    with running_forwarder(make_config(tmp_path, local, cloud, inflight=100)) as runtime:
        wait_for(lambda: gauge(runtime, "edge_subscribed"), 10, message="forwarder subscribed")
        publish(local, faces)
        collector.wait_for_ids([f.face_id for f in faces], timeout=60)
        assert gauge(runtime, "window") == 5
        assert counter(runtime, "forward_refused") == 0


def test_refused_publishes_stay_in_the_spool_and_are_retried(tmp_path, broker_factory, collector_factory):
    """A PUBACK with a failure reason code (here: not authorized) deletes nothing; later it goes through."""
    acl = tmp_path / "cloud.acl"
    acl.write_text("topic read faces/#\n")
    local = broker_factory("local")
    cloud = broker_factory("cloud", extra=f"acl_file {acl}")
    collector = collector_factory(cloud)
    faces = make_faces(30)
    with running_forwarder(make_config(tmp_path, local, cloud)) as runtime:
        wait_for(lambda: gauge(runtime, "edge_subscribed"), 10, message="forwarder subscribed")
        publish(local, faces)
        wait_for(lambda: counter(runtime, "forward_refused") >= 30, 20, message="publishes refused")
        assert gauge(runtime, "spool_depth") == 30 and counter(runtime, "forwarded") == 0
        assert collector.face_ids() == []

        acl.write_text("topic readwrite faces/#\n")
        os.kill(cloud.proc.pid, signal.SIGHUP)  # mosquitto reloads its ACL
        collector.wait_for_ids([f.face_id for f in faces], timeout=30)
        wait_for(lambda: gauge(runtime, "spool_depth") == 0, 10, message="spool drained")
        assert counter(runtime, "forwarded") == 30


def test_faces_wait_in_the_spool_until_the_cloud_has_a_subscriber(tmp_path, brokers, collector_factory):
    """A fresh cloud broker with no saver subscribed yet would discard faces: they stay spooled."""
    local, cloud = brokers
    faces = make_faces(20)
    with running_forwarder(make_config(tmp_path, local, cloud)) as runtime:
        wait_for(lambda: gauge(runtime, "edge_subscribed") and gauge(runtime, "cloud_connected"), 10,
                 message="forwarder connected")
        publish(local, faces)
        wait_for(lambda: counter(runtime, "forward_refused") >= 20, 20, message="no-subscriber answers")
        assert counter(runtime, "forwarded") == 0
        assert runtime.gauges.get("spool_depth") == 20
        collector = collector_factory(cloud)
        collector.wait_for_ids([f.face_id for f in faces], timeout=60)
        wait_for(lambda: counter(runtime, "forwarded") == 20, 10, message="20 forwarded")
