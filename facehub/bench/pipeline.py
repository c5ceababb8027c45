"""Pipeline benchmarks through real brokers: relay and saver throughput, end to end.

Every measurement starts its own throwaway brokers (and moto's S3 server where
storage is involved) and the real components as processes, exactly as they
run in production, and times outcomes seen from outside: messages received at
the far broker, objects counted in the store.
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
from typing import Iterator

import cv2
import numpy as np

from .. import messages, mqtt
from ..config import BrokerConfig
from ..demo import counter, pipeline_done
from ..localbroker import LocalBroker, bridge_config, free_port
from ..runtime import read_stats

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def sample_face(size: int = 10_000) -> bytes:
    """A real JPEG of about ``size`` bytes (noise compresses badly, so size is easy to hit)."""
    rng = np.random.default_rng(7)
    side = 32
    while True:
        image = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        if len(data) >= size:
            return data
        side += 4


class Counter:
    """A QoS 1 subscriber that counts messages and notes when the n-th arrived."""

    def __init__(self, port: int, expected: int, topic: str = "faces/#"):
        self.expected = expected
        self.count = 0
        self.done = threading.Event()
        self.subscribed = threading.Event()
        broker = BrokerConfig(port=port)
        self.client = mqtt.make_client(broker, f"bench-counter-{port}")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        mqtt.start(self.client, broker, persistent=False)

    def _on_message(self, client, userdata, message) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.done.set()

    def close(self) -> None:
        mqtt.stop(self.client)


def publish_faces(port: int, count: int, payload: bytes, device: str = "bench", qos: int = 1) -> None:
    """Publish ``count`` wire-format faces and wait until the broker has acknowledged them all."""
    broker = BrokerConfig(port=port)
    client = mqtt.make_client(broker, f"bench-publisher-{port}")
    state = mqtt.ConnectionState("bench-publisher")
    state.attach(client)
    mqtt.start(client, broker, persistent=False)
    state.connected.wait(10)
    infos = [client.publish(f"faces/{device}", payload, qos,
                            properties=messages.Face(payload, device).properties()) for _ in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    mqtt.stop(client)


@contextmanager
def component(name: str, env: dict[str, str], workdir: Path) -> Iterator[subprocess.Popen]:
    """``facehub <name>`` as a process with ``env``; stopped with SIGTERM on exit."""
    log = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "facehub.cli", name], env={**os.environ, **env},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def relay_throughput(kind: str, workdir: Path, count: int = 2000, size: int = 10_000) -> dict:
    """Messages/s from the edge broker to the cloud broker through ``forwarder`` or mosquitto's ``bridge``."""
    workdir = workdir / kind
    workdir.mkdir(parents=True, exist_ok=True)
    payload = sample_face(size)
    with LocalBroker(workdir / "cloud") as cloud:
        extra = bridge_config(cloud.port) if kind == "bridge" else ""
        with LocalBroker(workdir / "edge", extra=extra) as edge:
            counter = Counter(cloud.port, count)
            counter.subscribed.wait(10)
            env = {"FACEHUB_DEVICE_ID": "bench", "FACEHUB_LOCAL_PORT": str(edge.port),
                   "FACEHUB_CLOUD_PORT": str(cloud.port), "FACEHUB_SUPERVISOR_STATE_DIR": str(workdir),
                   "FACEHUB_FORWARDER_SPOOL_PATH": str(workdir / "spool.db")}
            with (component("forwarder", env, workdir) if kind == "forwarder" else _nothing()):
                _wait_connected(workdir, kind)
                started = time.perf_counter()
                publish_faces(edge.port, count, payload)
                counter.done.wait(300)
                elapsed = time.perf_counter() - started
            counter.close()
    return {"kind": kind, "messages": counter.count, "bytes": len(payload), "seconds": elapsed,
            "rate": counter.count / elapsed}


def _wait_connected(workdir: Path, kind: str) -> None:
    """Give the relay its connections before timing: the forwarder reports them as gauges."""
    if kind != "forwarder":
        time.sleep(1.0)  # mosquitto's bridge connects at start; nothing to poll from outside
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gauges = read_stats(workdir).get("forwarder", {}).get("gauges", {})
        if gauges.get("edge_subscribed") and gauges.get("cloud_connected"):
            return
        time.sleep(0.1)


@contextmanager
def _nothing():
    yield None


@contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    """moto's S3 server on a free port, with a bucket ``faces``; yields its endpoint URL."""
    port = free_port()
    log = open(workdir / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="bench", aws_secret_access_key="bench")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="faces")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log.close()


def saver_throughput(workdir: Path, count: int = 1000, size: int = 10_000) -> dict:
    """Faces/s from the cloud broker into moto's S3 through one saver."""
    workdir = workdir / "saver"
    workdir.mkdir(parents=True, exist_ok=True)
    payload = sample_face(size)
    with moto_server(workdir) as endpoint, LocalBroker(workdir / "cloud") as cloud:
        env = {**S3_ENV, "FACEHUB_CLOUD_PORT": str(cloud.port), "FACEHUB_SUPERVISOR_STATE_DIR": str(workdir),
               "FACEHUB_SAVER_URL": "s3://faces/bench", "FACEHUB_SAVER_ENDPOINT_URL": endpoint}
        with component("saver", env, workdir):
            _wait_gauge(workdir, "saver", "subscribed", 60)
            started = time.perf_counter()
            publish_faces(cloud.port, count, payload)
            stored = _wait_counter(workdir, "saver", "stored", count, 300)
            elapsed = time.perf_counter() - started
    return {"kind": "saver", "messages": stored, "bytes": len(payload), "seconds": elapsed,
            "rate": stored / elapsed}


def _wait_counter(state_dir: Path, name: str, key: str, target: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    value = 0
    while time.monotonic() < deadline:
        value = read_stats(state_dir).get(name, {}).get("counters", {}).get(key, 0)
        if value >= target:
            break
        time.sleep(0.05)
    return value


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children.get(current, []))
    return total


def end_to_end(source: str, workdir: Path, timeout: float = 300) -> dict:
    """The whole pipeline on ``source``: faces/s into S3, capture-to-stored latency, peak RSS."""
    workdir = workdir / "e2e"
    workdir.mkdir(parents=True, exist_ok=True)
    with moto_server(workdir) as endpoint, LocalBroker(workdir / "edge-broker") as edge, \
            LocalBroker(workdir / "cloud-broker") as cloud:
        env = {**os.environ, **S3_ENV, "FACEHUB_DEVICE_ID": "bench-cam", "FACEHUB_LOCAL_PORT": str(edge.port),
               "FACEHUB_CLOUD_PORT": str(cloud.port), "FACEHUB_DETECTOR_SOURCE": source,
               "FACEHUB_DETECTOR_LOOP": "false", "FACEHUB_FORWARDER_SPOOL_PATH": str(workdir / "spool.db"),
               "FACEHUB_SAVER_URL": "s3://faces/e2e", "FACEHUB_SAVER_ENDPOINT_URL": endpoint}
        roles = {}
        for role in ("cloud", "edge"):  # the cloud first: its saver must be subscribed before faces come
            roles[role] = subprocess.Popen([sys.executable, "-m", "facehub.cli", "run", role],
                                           env={**env, "FACEHUB_SUPERVISOR_STATE_DIR": str(workdir / role)},
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if role == "cloud":
                _wait_gauge(workdir / "cloud", "saver-1", "subscribed", 60)
        peak = {"edge": 0, "cloud": 0}
        started = time.perf_counter()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for role, proc in roles.items():
                    peak[role] = max(peak[role], tree_rss(proc.pid))
                if pipeline_done(workdir / "edge", workdir / "cloud"):
                    break
                time.sleep(0.2)
            elapsed = time.perf_counter() - started
        finally:
            for proc in roles.values():
                proc.send_signal(signal.SIGTERM)
            for proc in roles.values():
                proc.wait(30)
    edge_stats, cloud_stats = read_stats(workdir / "edge"), read_stats(workdir / "cloud")
    stored = counter(cloud_stats, "saver", "stored")
    latency = cloud_stats.get("saver-1", {}).get("percentiles", {}).get("latency_ms", {})
    detector = edge_stats.get("detector", {})
    return {"frames": counter(edge_stats, "detector", "frames"),
            "published": counter(edge_stats, "detector", "faces_published"),
            "stored": stored, "seconds": elapsed, "faces_per_s": stored / elapsed if elapsed else 0.0,
            "latency_ms": latency,
            "publish_latency_ms": detector.get("percentiles", {}).get("publish_latency_ms", {}),
            "peak_rss_edge": peak["edge"], "peak_rss_cloud": peak["cloud"]}


def _wait_gauge(state_dir: Path, name: str, key: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_stats(state_dir).get(name, {}).get("gauges", {}).get(key):
            return
        time.sleep(0.1)
