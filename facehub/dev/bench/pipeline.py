"""Pipeline benchmarks through real brokers: relay and saver throughput, end to end.

Every measurement starts its own throwaway brokers (and moto's S3 server where
storage is involved) and the real components as processes, exactly as they
run in production, and times outcomes seen from outside: messages received at
the far broker, objects counted in the store.

End to end, the clip is played like a camera (at its own frame rate, looped
to about 30 s) through FaceHub twice (defaults; every detection sent) and
through the typical implementation (bench/baseline.py with mosquitto's
bridge). Peak RSS per side is the sum of that side's process trees: the
mosquitto broker and the components (FaceHub: detector, forwarder and logger
on the edge, saver in the cloud; typical: its detector and its saver), since
the typical relay lives inside mosquitto.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facehub import messages, mqtt
from facehub.config import BrokerConfig
from facehub.dev.demo import counter
from facehub.dev.servers import Mosquitto, MotoS3, bridge_config, make_bucket
from facehub.runtime import percentiles, read_stats

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
def process(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """``args`` as a process with ``env`` added, output to ``log_path``; stopped with SIGTERM on exit."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; a no-op for a process already reaped."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def component(name: str, env: dict[str, str], workdir: Path):
    """``facehub <name>`` as a process (see :func:`process`)."""
    return process([sys.executable, "-m", "facehub.cli", name], env, workdir / f"{name}.log")


def relay_throughput(kind: str, workdir: Path, count: int = 2000, size: int = 10_000) -> dict:
    """Messages/s from the edge broker to the cloud broker through ``forwarder`` or mosquitto's ``bridge``."""
    workdir = workdir / kind
    workdir.mkdir(parents=True, exist_ok=True)
    payload = sample_face(size)
    with Mosquitto(workdir / "cloud") as cloud:
        extra = bridge_config(cloud.port) if kind == "bridge" else ""
        with Mosquitto(workdir / "edge", extra=extra) as edge:
            counter = Counter(cloud.port, count)
            counter.subscribed.wait(10)
            env = {"FACEHUB_DEVICE_ID": "bench", "FACEHUB_LOCAL_PORT": str(edge.port),
                   "FACEHUB_CLOUD_PORT": str(cloud.port), "FACEHUB_SUPERVISOR_STATE_DIR": str(workdir),
                   "FACEHUB_FORWARDER_SPOOL_PATH": str(workdir / "spool.db")}
            with (component("forwarder", env, workdir) if kind == "forwarder" else _nothing()):
                _wait_connected(workdir, kind, edge.port)
                started = time.perf_counter()
                publish_faces(edge.port, count, payload)
                counter.done.wait(300)
                elapsed = time.perf_counter() - started
            counter.close()
    return {"kind": kind, "messages": counter.count, "bytes": len(payload), "seconds": elapsed,
            "rate": counter.count / elapsed}


def _wait_connected(workdir: Path, kind: str, edge_port: int, timeout: float = 30) -> None:
    """Give the relay its connections before timing: the forwarder reports them as gauges,
    mosquitto reports its bridge's state on ``$SYS``."""
    if kind != "forwarder":
        wait_bridge_connected(edge_port, bridge_name(bridge_config(0)), timeout)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gauges = read_stats(workdir).get("forwarder", {}).get("gauges", {})
        if gauges.get("edge_subscribed") and gauges.get("cloud_connected"):
            return
        time.sleep(0.1)


def bridge_name(config: str) -> str:
    """The ``connection`` name in a mosquitto bridge configuration."""
    return next(line.split()[1] for line in config.splitlines() if line.startswith("connection "))


def wait_bridge_connected(port: int, name: str, timeout: float = 30) -> None:
    """Block until the broker on ``port`` says its bridge ``name`` is connected.

    mosquitto publishes each bridge's state, retained, on
    ``$SYS/broker/connection/<client id>/state`` ("1" = connected), where the
    client id defaults to ``<hostname>.<connection name>``.
    """
    connected = threading.Event()

    def on_message(client, userdata, message) -> None:
        client_id = message.topic.split("/")[3]
        if (client_id == name or client_id.endswith("." + name)) and message.payload == b"1":
            connected.set()

    broker = BrokerConfig(port=port)
    client = mqtt.make_client(broker, f"bench-bridge-state-{port}")
    client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/connection/+/state", qos=0)
    client.on_message = on_message
    mqtt.start(client, broker, persistent=False)
    try:
        if not connected.wait(timeout):
            raise RuntimeError(f"mosquitto's bridge {name!r} did not connect within {timeout:.0f}s")
    finally:
        mqtt.stop(client)


@contextmanager
def _nothing():
    yield None


@contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    """moto's S3 server on a free port, with a bucket ``faces``; yields its endpoint URL."""
    server = MotoS3(workdir / "moto").start(timeout=30)
    try:
        make_bucket(server.endpoint_url, "faces")
        yield server.endpoint_url
    finally:
        server.stop()


def saver_throughput(workdir: Path, count: int = 1000, size: int = 10_000) -> dict:
    """Faces/s from the cloud broker into moto's S3 through one saver."""
    workdir = workdir / "saver"
    workdir.mkdir(parents=True, exist_ok=True)
    payload = sample_face(size)
    with moto_server(workdir) as endpoint, Mosquitto(workdir / "cloud") as cloud:
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


def _wait_counter(state_dir: Path, name: str, keys: str | tuple[str, ...], target: int, timeout: float) -> int:
    """Poll ``name``'s stats until the counters ``keys`` add up to ``target``; returns the last sum."""
    keys = (keys,) if isinstance(keys, str) else keys
    deadline = time.monotonic() + timeout
    value = 0
    while time.monotonic() < deadline:
        counters = read_stats(state_dir).get(name, {}).get("counters", {})
        value = sum(counters.get(key, 0) for key in keys)
        if value >= target:
            break
        time.sleep(0.05)
    return value


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants, from /proc."""
    return trees_rss([pid])


def trees_rss(pids: list[int]) -> int:
    """Resident memory (bytes) of several process trees together, from one pass over /proc."""
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
    total, stack = 0, list(pids)
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children.get(current, []))
    return total


class PeakRss:
    """Peak resident memory of groups of process trees ("edge", "cloud"), sampled in the background.

    Sampling on a thread keeps the peak honest whatever the caller is waiting for.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.pids: dict[str, list[int]] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def add(self, group: str, proc: subprocess.Popen) -> subprocess.Popen:
        self.pids.setdefault(group, []).append(proc.pid)
        self.peak.setdefault(group, 0)
        return proc

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            for group, pids in list(self.pids.items()):
                self.peak[group] = max(self.peak[group], trees_rss(list(pids)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- end to end ------------------------------------------------------------------------------

TARGET_VIDEO_SECONDS = 30.0  # enough frames for a few hundred latency samples per row
SETTLE_SECONDS = 10.0  # no new stored face for this long: the rest are lost (QoS 0)


@dataclass
class Clip:
    """A video's native frame rate and length: the bench plays it as a camera would deliver it."""

    source: str
    fps: float
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def default_loops(self) -> int:
        return max(1, round(TARGET_VIDEO_SECONDS / self.seconds))


def clip_info(source: str) -> Clip:
    """Frame rate (15 when the file does not say) and frame count of a video file."""
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise ValueError(f"cannot open source {source!r}")
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if frames <= 0:  # containers without an index: count them
        while capture.grab():
            frames += 1
    capture.release()
    if frames <= 0:
        raise ValueError(f"source {source!r} gave no frames")
    return Clip(source, fps if 0 < fps < 1000 else 15.0, frames)


def end_to_end(source: str, workdir: Path, loops: int | None = None) -> dict:
    """The whole pipeline on ``source`` played ``loops`` times at its own frame rate, three ways.

    FaceHub with its defaults, FaceHub sending every detection (hundreds of
    latency samples, so p99 means something) and the typical implementation,
    one after the other on fresh brokers and one moto S3 server, so none takes
    CPU from another.
    """
    clip = clip_info(source)
    loops = loops or clip.default_loops()
    frames = loops * clip.frames
    workdir = workdir / "e2e"
    workdir.mkdir(parents=True, exist_ok=True)
    with moto_server(workdir) as endpoint:
        rows = [facehub_row("facehub (defaults)", clip, frames, endpoint, workdir / "defaults", {}),
                facehub_row("facehub (every detection)", clip, frames, endpoint, workdir / "every",
                            {"FACEHUB_DETECTOR_DEDUP_INTERVAL": "0"}),
                typical_row(clip, frames, endpoint, workdir / "typical")]
    return {"clip": clip, "loops": loops, "rows": rows}


def facehub_row(name: str, clip: Clip, frames: int, endpoint: str, workdir: Path, extra: dict) -> dict:
    """FaceHub's components as processes between two fresh brokers, until ``frames`` are read and stored.

    Each component runs alone (``facehub detector`` ...) rather than under the
    supervisor, so the detector can be stopped by itself once the frames are
    read while the forwarder and saver carry its last faces.
    """
    workdir.mkdir(parents=True)
    timeout = 2 * frames / clip.fps + 120
    with Mosquitto(workdir / "cloud-broker") as cloud, Mosquitto(workdir / "edge-broker") as edge, \
            PeakRss() as rss, ExitStack() as stack:
        env = {**S3_ENV, "FACEHUB_DEVICE_ID": "bench-cam", "FACEHUB_LOCAL_PORT": str(edge.port),
               "FACEHUB_CLOUD_PORT": str(cloud.port), "FACEHUB_SUPERVISOR_STATE_DIR": str(workdir),
               "FACEHUB_DETECTOR_SOURCE": clip.source, "FACEHUB_DETECTOR_LOOP": "true",
               "FACEHUB_DETECTOR_FPS": str(clip.fps), "FACEHUB_FORWARDER_SPOOL_PATH": str(workdir / "spool.db"),
               "FACEHUB_SAVER_URL": f"s3://faces/{workdir.name}", "FACEHUB_SAVER_ENDPOINT_URL": endpoint, **extra}
        rss.add("edge", edge.proc)
        rss.add("cloud", cloud.proc)

        def start(component_name: str, group: str) -> subprocess.Popen:
            return rss.add(group, stack.enter_context(component(component_name, env, workdir)))

        start("saver", "cloud")  # first: the saver must be subscribed before faces come
        _wait_gauge(workdir, "saver", "subscribed", 60)
        start("forwarder", "edge")
        _wait_connected(workdir, "forwarder", edge.port)
        start("logger", "edge")
        started = time.perf_counter()
        detector = start("detector", "edge")
        # frames the detector took, or skipped as a camera drops the ones nobody took in time
        _wait_counter(workdir, "detector", ("frames", "frames_skipped"), frames, timeout)
        stop_process(detector)  # its last faces still go out: it flushes its queue on SIGTERM
        published = counter(read_stats(workdir), "detector", "faces_published")
        _, finished = wait_stored(lambda: _facehub_stored(workdir), published, timeout)
    stats = read_stats(workdir)
    row = _row(name, counter(stats, "detector", "frames"), published, counter(stats, "saver", "stored"),
               finished - started, stats.get("saver", {}).get("percentiles", {}).get("latency_ms", {}),
               stats.get("detector", {}).get("percentiles", {}).get("publish_latency_ms", {}), rss.peak)
    row["skipped"] = counter(stats, "detector", "frames_skipped")  # late for, as a camera drops them
    return row


def _facehub_stored(state_dir: Path) -> int:
    stats = read_stats(state_dir)
    return counter(stats, "saver", "stored") + counter(stats, "saver", "duplicates")


def typical_row(clip: Clip, frames: int, endpoint: str, workdir: Path) -> dict:
    """The typical pipeline (bench/baseline.py) on the same clip and pacing: detector, bridge, saver."""
    workdir.mkdir(parents=True)
    timeout = 4 * frames / clip.fps + 120  # it may detect slower than the camera delivers
    latencies, ready, result = workdir / "latencies.txt", workdir / "saver.ready", workdir / "detector.json"
    baseline = [sys.executable, "-m", "facehub.dev.bench.baseline"]
    with Mosquitto(workdir / "cloud-broker") as cloud, \
            Mosquitto(workdir / "edge-broker", extra=bridge_config(cloud.port, qos=0)) as edge, \
            PeakRss() as rss, ExitStack() as stack:
        rss.add("edge", edge.proc)
        rss.add("cloud", cloud.proc)
        rss.add("cloud", stack.enter_context(process(
            baseline + ["saver", "--port", str(cloud.port), "--endpoint", endpoint, "--latencies", str(latencies),
                        "--ready", str(ready)], S3_ENV, workdir / "saver.log")))
        _wait_for_file(ready, 60)
        wait_bridge_connected(edge.port, bridge_name(bridge_config(0)))
        started = time.perf_counter()
        detector = rss.add("edge", stack.enter_context(process(
            baseline + ["detector", "--source", clip.source, "--port", str(edge.port), "--fps", str(clip.fps),
                        "--frames", str(frames), "--result", str(result)], {}, workdir / "detector.log")))
        detector.wait(timeout)
        sent = json.loads(result.read_text()) if result.is_file() else {"frames": 0, "published": 0}
        _, finished = wait_stored(lambda: len(_read_latencies(latencies)), sent["published"], timeout)
    return _row("typical (Haar 1.3/5 every frame, PNG, QoS 0, bridge)", sent["frames"], sent["published"],
                count_objects(endpoint, "typical/"), finished - started,
                percentiles(_read_latencies(latencies)), None, rss.peak)


def _row(name: str, frames: int, published: int, stored: int, seconds: float, stored_latency: dict,
         publish_latency: dict | None, peak: dict[str, int]) -> dict:
    return {"name": name, "frames": frames, "published": published, "stored": stored,
            "lost": published - stored, "seconds": seconds, "faces_per_s": stored / seconds if seconds else 0.0,
            "latency_ms": stored_latency, "publish_latency_ms": publish_latency,
            "peak_rss_edge": peak.get("edge", 0), "peak_rss_cloud": peak.get("cloud", 0)}


def wait_stored(read: Callable[[], int], target: int, timeout: float,
                settle: float = SETTLE_SECONDS) -> tuple[int, float]:
    """Poll ``read()`` until it reaches ``target``, stops growing for ``settle`` s, or ``timeout``.

    Returns the last value and the ``perf_counter`` time it last grew, so the
    faces lost at QoS 0 (which never arrive) do not count as time spent.
    """
    deadline = time.monotonic() + timeout
    value, changed = read(), time.perf_counter()
    while value < target and time.monotonic() < deadline and time.perf_counter() - changed < settle:
        time.sleep(0.1)
        latest = read()
        if latest != value:
            value, changed = latest, time.perf_counter()
    return value, changed


def _read_latencies(path: Path) -> list[float]:
    """The typical saver's capture->stored latencies, one per stored face."""
    try:
        return [float(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def count_objects(endpoint: str, prefix: str) -> int:
    """Objects under ``prefix`` in the bench bucket: what was really stored."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="faces", Prefix=prefix)
    return sum(page.get("KeyCount", 0) for page in pages)


def _wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.1)


def _wait_gauge(state_dir: Path, name: str, key: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_stats(state_dir).get(name, {}).get("gauges", {}).get(key):
            return
        time.sleep(0.1)
