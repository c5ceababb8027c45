"""End to end: a video file through the edge broker, the forwarder and the cloud broker into S3.

Runs the real ``facehub run edge`` and ``facehub run cloud`` supervisors as
processes, and checks that every face id published at the edge is stored
under its key in moto's S3 server, once, with its metadata.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import boto3

from facehub import messages, mqtt
from facehub.config import BrokerConfig
from facehub.dev.servers import S3_ENV, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
KEY = re.compile(r"^e2e/(?P<device>[^/]+)/(?P<y>\d{4})/(?P<m>\d\d)/(?P<d>\d\d)/[^/]+-(?P<id>[A-Za-z0-9._-]+)\.jpg$")


class FaceCollector:
    """A persistent QoS 1 subscriber on the edge broker: the ids of every face published there."""

    def __init__(self, port: int):
        self.faces: dict[str, messages.Face] = {}
        broker = BrokerConfig(port=port)
        self.client = mqtt.make_client(broker, "e2e-collector")
        self.state = mqtt.ConnectionState("collector")
        self.client.on_connect = lambda c, *_: c.subscribe("faces/#", qos=1)
        self.client.on_message = self.on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.subscribed = threading.Event()
        self.state.attach(self.client)
        mqtt.start(self.client, broker)

    def on_message(self, client, userdata, message):
        face = messages.parse(message.topic, message.payload, message.properties, 10_000_000)
        self.faces[face.face_id] = face

    def close(self):
        mqtt.stop(self.client)


def run_role(role: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "facehub.cli", "run", role], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def stats_of(state_dir: Path) -> dict:
    """The edge supervisor's status document (children's states and counters), or {} before it exists."""
    try:
        return json.loads((state_dir / "supervisor-edge.json").read_text())
    except (OSError, ValueError):
        return {}


def test_video_to_s3_every_face_stored_once(broker_factory, s3_server, s3_bucket, tmp_path):
    from facehub.edge.detector import SAMPLE_CLIP

    edge = broker_factory("edge")
    cloud = broker_factory("cloud")
    collector = FaceCollector(edge.port)
    assert collector.subscribed.wait(10)
    env = {
        **os.environ, **S3_ENV, "PYTHONPATH": str(ROOT),
        "FACEHUB_DEVICE_ID": "e2e-cam",
        "FACEHUB_LOCAL_PORT": str(edge.port),
        "FACEHUB_CLOUD_PORT": str(cloud.port),
        "FACEHUB_DETECTOR_SOURCE": str(SAMPLE_CLIP),
        "FACEHUB_FORWARDER_SPOOL_PATH": str(tmp_path / "spool.db"),
        "FACEHUB_SAVER_URL": f"s3://{s3_bucket}/e2e",
        "FACEHUB_SAVER_ENDPOINT_URL": s3_server.endpoint_url,
        "FACEHUB_SAVER_INSTANCES": "2",
        "FACEHUB_CLOUD_RECONNECT_MAX": "2",  # faces the cloud has no saver for yet are retried this often
    }
    cloud_state, edge_state = tmp_path / "cloud-state", tmp_path / "edge-state"
    cloud_metrics, edge_metrics = free_port(), free_port()
    procs = [run_role("cloud", {**env, "FACEHUB_SUPERVISOR_STATE_DIR": str(cloud_state),
                                "FACEHUB_METRICS_PORT": str(cloud_metrics), "FACEHUB_METRICS_HOST": "127.0.0.1"},
                      tmp_path / "cloud.log"),
             run_role("edge", {**env, "FACEHUB_SUPERVISOR_STATE_DIR": str(edge_state),
                               "FACEHUB_METRICS_PORT": str(edge_metrics), "FACEHUB_METRICS_HOST": "127.0.0.1"},
                      tmp_path / "edge.log")]
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    try:
        wait_for(lambda: stats_of(edge_state).get("children", {}).get("detector", {}).get("state") == "EXITED",
                 120, interval=0.5, message="detector finished the clip")
        published = lambda: stats_of(edge_state)["stats"]["detector"]["counters"].get("faces_published", 0)
        wait_for(lambda: published() and len(collector.faces) == published(), 30, message="collector saw every face")

        def stored_keys():
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="e2e/")
            return [item["Key"] for page in pages for item in page.get("Contents", [])]

        wait_for(lambda: len(stored_keys()) >= len(collector.faces), 60, interval=0.5,
                 message="every face stored")
        keys = stored_keys()
        # /metrics of both roles, as Prometheus reads them, once the stats files (flushed every second)
        # have caught up with every face
        faces = len(collector.faces)

        def edge_caught_up():
            samples = scrape(edge_metrics)
            return samples if (samples.get(("facehub_forwarded_total", "forwarder"), 0) >= faces and
                               samples.get(("facehub_faces_published_total", "detector"), 0) >= faces and
                               samples.get(("facehub_publish_latency_seconds_count", "detector"), 0) >= faces) else None

        def cloud_stored():
            samples = scrape(cloud_metrics)
            return sum(value for (name, _), value in samples.items() if name == "facehub_stored_total")

        edge_samples = wait_for(edge_caught_up, 30, interval=0.5, message="edge metrics caught up")
        cloud_metric = wait_for(lambda: cloud_stored() >= faces and cloud_stored(), 30, interval=0.5,
                                message="cloud metrics caught up")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
        collector.close()

    assert [p.returncode for p in procs] == [0, 0]
    assert cloud_metric >= len(collector.faces)
    assert edge_samples[("facehub_child_up", "forwarder")] == 1
    assert len(collector.faces) >= 5, "the sample clip should yield several faces"
    matches = {m["id"]: m for m in map(KEY.match, keys)}
    assert None not in matches, f"unexpected keys: {keys}"
    assert set(matches) == set(collector.faces)
    assert len(keys) == len(collector.faces), "a face was stored twice"
    for face_id, face in collector.faces.items():
        match = matches[face_id]
        day = datetime.fromtimestamp(face.captured_ms / 1000, timezone.utc)
        assert (match["device"], match["y"], match["m"], match["d"]) == \
            ("e2e-cam", f"{day:%Y}", f"{day:%m}", f"{day:%d}")
    sample_key = keys[0]
    head = s3.head_object(Bucket=s3_bucket, Key=sample_key)
    face = collector.faces[matches_id(sample_key)]
    assert head["ContentType"] == "image/jpeg"
    assert head["Metadata"]["face-id"] == face.face_id
    assert head["Metadata"]["box"] == ",".join(map(str, face.box))
    body = s3.get_object(Bucket=s3_bucket, Key=sample_key)["Body"].read()
    assert body == face.image
    edge_stats = stats_of(edge_state)["stats"]
    assert edge_stats["forwarder"]["counters"]["forwarded"] >= len(collector.faces)
    # The logger's session is not persistent: it may miss faces published before it subscribed.
    assert 0 < edge_stats["logger"]["counters"]["logged"] <= len(collector.faces)


def scrape(port: int) -> dict[tuple[str, str], float]:
    """/metrics parsed by Prometheus's own parser: (sample name, component) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, sample.labels.get("component", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if "reason" not in sample.labels and "le" not in sample.labels and "counter" not in sample.labels}


def matches_id(key: str) -> str:
    return KEY.match(key)["id"]
