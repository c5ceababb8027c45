"""The forwarder against a hostile edge and a refusing cloud, and what it tells the cloud about itself.

Real brokers, the real forwarder: only this device's faces are taken from the (anonymous)
edge broker; faces the cloud refuses for good move to the spool's dead letters instead of
holding up the faces behind them; availability and stats reach the cloud, and a killed
edge shows as offline within the keepalive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from test_forwarder import (DEVICE, broker_config, collector_factory, make_config, make_faces, publish,  # noqa: F401
                            running_forwarder)

from facehub import messages, mqtt
from facehub.edge.properties import pack_properties
from facehub.edge.spool import Record, Spool
from facehub.dev.servers import wait_for

ROOT = Path(__file__).resolve().parent.parent


class StatusWatcher:
    """A subscriber to every device's availability and stats on the cloud broker."""

    def __init__(self, broker):
        self.messages: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        config = broker_config(broker)
        self.client = mqtt.make_client(config, f"status-watcher-{os.getpid()}")
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe([("facehub/+/availability", 1), ("facehub/+/stats", 1)])
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        mqtt.start(self.client, config, persistent=False)
        assert self.subscribed.wait(10), "watcher could not subscribe"

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages.append((message.topic, message.payload.decode()))

    def last(self, topic: str) -> str | None:
        with self._lock:
            values = [payload for name, payload in self.messages if name == topic]
        return values[-1] if values else None

    def close(self):
        mqtt.stop(self.client)


def test_only_this_devices_faces_are_taken_from_the_edge(tmp_path, broker_factory, collector_factory):
    local, cloud = broker_factory("local"), broker_factory("cloud")
    collector = collector_factory(cloud)
    config = make_config(tmp_path, local, cloud)
    own = make_faces(5)
    others = [messages.Face(image=b"\xff\xd8\xff" + os.urandom(500), device_id="cam-b", face_id=f"b{n}")
              for n in range(5)]
    with running_forwarder(config) as runtime:
        wait_for(lambda: runtime.gauge_value("edge_subscribed"), 15, message="forwarder subscribed")
        publish(local, others + own)
        collector.wait_for_ids([f.face_id for f in own], timeout=30)
        wait_for(lambda: runtime.counter("forwarded") == 5, 10, message="own faces forwarded")
        assert runtime.counter("received") == 5
    assert set(collector.face_ids()) == {f.face_id for f in own}


def test_faces_refused_for_good_move_to_dead_letters_and_hold_up_nothing(tmp_path, broker_factory,
                                                                          collector_factory):
    """A spool head of faces the cloud will never take (left by an older version that took every
    device's faces): after max_refusals tries they move aside, and the valid faces behind them go."""
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite faces/{DEVICE}\ntopic read faces/#\ntopic readwrite facehub/#\n")
    local = broker_factory("local")
    cloud = broker_factory("cloud", extra=f"acl_file {acl}\n")
    collector = collector_factory(cloud)
    config = make_config(tmp_path, local, cloud)
    poisoned = [messages.Face(image=b"\xff\xd8\xff" + os.urandom(500), device_id="cam-b", face_id=f"b{n:03d}")
                for n in range(150)]
    valid = make_faces(10)
    with Spool(config.forwarder.spool_path) as spool:
        spool.put_many([Record(f"faces/{face.device_id}", face.image, pack_properties(face.properties()))
                        for face in poisoned + valid])
    with running_forwarder(config) as runtime:
        collector.wait_for_ids([f.face_id for f in valid], timeout=60)
        wait_for(lambda: runtime.counter("dead_lettered") == 150, 20, message="150 dead letters")
        wait_for(lambda: runtime.gauge_value("dead_letters") == 150 and runtime.gauge_value("spool_depth") == 0,
                 10, message="gauges")
    assert set(collector.face_ids()) == {f.face_id for f in valid}
    with Spool(config.forwarder.spool_path) as spool:
        assert spool.dead_letters == 150 and spool.depth == 0


def test_transient_refusals_are_never_dead_lettered(tmp_path, broker_factory, collector_factory):
    """"No matching subscribers" (no saver yet) is retried however often: the faces wait, then go."""
    local, cloud = broker_factory("local"), broker_factory("cloud")
    config = make_config(tmp_path, local, cloud, max_refusals=1)
    faces = make_faces(5)
    with running_forwarder(config) as runtime:
        wait_for(lambda: runtime.gauge_value("edge_subscribed"), 15, message="forwarder subscribed")
        publish(local, faces)
        wait_for(lambda: runtime.counter("forward_refused") >= 10, 30, message="refused twice (nobody subscribed)")
        collector = collector_factory(cloud)
        collector.wait_for_ids([f.face_id for f in faces], timeout=30)
        assert runtime.counter("dead_lettered") == 0


def test_availability_and_stats_reach_the_cloud(tmp_path, broker_factory):
    local, cloud = broker_factory("local"), broker_factory("cloud")
    watcher = StatusWatcher(cloud)
    config = make_config(tmp_path, local, cloud, stats_interval=0.5)
    availability, stats = f"facehub/{DEVICE}/availability", f"facehub/{DEVICE}/stats"
    try:
        with running_forwarder(config):
            wait_for(lambda: watcher.last(availability) == "online", 15, message="online")
            wait_for(lambda: watcher.last(stats), 15, message="stats")
            data = json.loads(watcher.last(stats))
            assert {"version", "uptime", "frames", "faces", "spool_depth", "oldest_spooled_age",
                    "detector_fps", "search_ms_p95", "forwarded", "dead_letters"} <= set(data)
            assert data["spool_depth"] == 0
        assert watcher.last(availability) == "offline", "a clean stop says offline at once"
    finally:
        watcher.close()


def test_killed_edge_shows_offline_within_the_keepalive(tmp_path, broker_factory):
    local, cloud = broker_factory("local"), broker_factory("cloud")
    watcher = StatusWatcher(cloud)
    keepalive = 5
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACEHUB_DEVICE_ID": DEVICE,
           "FACEHUB_LOCAL_PORT": str(local.port), "FACEHUB_CLOUD_PORT": str(cloud.port),
           "FACEHUB_CLOUD_KEEPALIVE": str(keepalive),
           "FACEHUB_FORWARDER_SPOOL_PATH": str(tmp_path / "spool.db"),
           "FACEHUB_SUPERVISOR_STATE_DIR": str(tmp_path / "state")}
    availability = f"facehub/{DEVICE}/availability"
    proc = subprocess.Popen([sys.executable, "-m", "facehub.cli", "forwarder"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: watcher.last(availability) == "online", 30, message="online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # mosquitto sends the will once 1.5 keepalives pass without a packet (plus its check period)
        wait_for(lambda: watcher.last(availability) == "offline", keepalive * 1.5 + 5, interval=0.1,
                 message="offline from the will")
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
