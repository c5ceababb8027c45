"""The detector component against real mosquitto brokers, on the built-in sample clip."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
from conftest import YUNET_MODEL
from facehub.dev.servers import MjpegCamera, Mosquitto, free_port, wait_for

from facehub.edge import detector
from facehub import messages, mqtt
from facehub.config import Config
from facehub.edge.detection.source import SAMPLE_CLIP
from facehub.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Subscriber:
    """A plain MQTT v5 subscriber on ``faces/#`` that keeps every message it receives."""

    def __init__(self, port: int):
        config = Config()
        config.local.port = port
        self.messages = []
        self.subscribed = threading.Event()
        self.client = mqtt.make_client(config.local, f"test-subscriber-{port}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("faces/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = lambda c, u, msg: self.messages.append(msg)
        mqtt.start(self.client, config.local, persistent=False)

    def close(self):
        mqtt.stop(self.client)


def detector_config(port: int, **detector_settings) -> Config:
    config = Config(device_id="cam-test")
    config.local.port = port
    config.local.reconnect_max = 1
    config.detector.source = str(SAMPLE_CLIP)
    for key, value in detector_settings.items():
        setattr(config.detector, key, value)
    return config.validate()


def start_detector(config: Config, runtime: Runtime) -> threading.Thread:
    thread = threading.Thread(target=detector.run, args=(config, runtime), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("fps", "search"), [(0.0, "auto"), (30.0, "auto"), (30.0, "background")],
                         ids=["flat-out", "paced", "paced-background"])
def test_sample_clip_faces_reach_a_subscriber(broker, tmp_path, fps, search):
    """Read flat out or paced like a camera, the search runs inline by default; in the background when asked."""
    background = search == "background"
    subscriber = Subscriber(broker.port)
    try:
        assert subscriber.subscribed.wait(10)
        config = detector_config(broker.port, fps=fps, search=search)
        assert detector.search_in_background(config.detector) is background
        runtime = Runtime("detector", state_dir=tmp_path)
        detector.run(config, runtime)  # a file that is not looped: returns once its faces are sent
        stats = runtime.stats
        wait_for(lambda: len(subscriber.messages) >= stats["faces_published"], 10, message="all faces delivered")
    finally:
        subscriber.close()

    # paced like a camera, a frame the detector is late for is skipped (and counted), as a camera would drop it
    assert stats["frames"] + stats["frames_skipped"] == 120 and stats["source_errors"] == 0
    assert len(subscriber.messages) == stats["faces_published"]
    if fps == 0:  # read flat out every frame is searched or followed on any machine; paced, how many faces
        # are found before the clip ends depends on the machine's speed (frames it is late for are skipped)
        assert stats["faces_published"] >= 5
        assert stats["faces_suppressed"] > stats["faces_published"], "a face in view is not sent every frame"
    assert stats["faces_detected"] == stats["faces_published"] + stats["faces_suppressed"] + stats["faces_dropped"]
    faces = [messages.parse(m.topic, m.payload, m.properties, 2_000_000) for m in subscriber.messages]
    assert {m.topic for m in subscriber.messages} == {"faces/cam-test"}
    assert len({face.face_id for face in faces}) == len(faces)
    for face in faces:
        image = cv2.imdecode(np.frombuffer(face.image, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and face.content_type == "image/jpeg"
        x, y, w, h = face.box
        assert w >= 40 and x + w <= 640 and y + h <= 480
        # the crop is the box plus a 20% margin on each side (less where the frame ends)
        assert w <= image.shape[1] <= 1.4 * w + 2 and h <= image.shape[0] <= 1.4 * h + 2
        assert face.track is not None and 1 <= face.frame <= 120
    saved = json.loads((tmp_path / "detector.stats.json").read_text())
    assert saved["counters"]["faces_published"] == stats["faces_published"]
    if fps == 0:
        assert len({face.track for face in faces}) >= 2, "the face leaves and comes back: two tracks"
        assert saved["percentiles"]["publish_latency_ms"]
        searches = -(-120 // config.detector.detect_every)  # frames 1, 1 + detect_every, ... of the 120
        assert saved["percentiles"]["search_ms"]["count"] == searches, "every full search is timed"


@pytest.mark.parametrize("search", ["inline", "background"])
@pytest.mark.parametrize("fps", [30.0, 0.0], ids=["camera-rate", "flat-out"])
def test_ip_camera_stream_every_frame_processed_or_counted_skipped(broker, tmp_path, fps, search):
    """A live MJPEG stream: the newest frame is always the one processed, and none goes unaccounted."""
    camera = MjpegCamera(SAMPLE_CLIP, fps=fps)
    subscriber = Subscriber(broker.port)
    runtime = Runtime("detector", state_dir=tmp_path)
    try:
        assert subscriber.subscribed.wait(10)
        config = detector_config(broker.port, source=camera.url, search=search)
        assert detector.search_in_background(config.detector) is (search == "background")
        thread = start_detector(config, runtime)
        # the stream ends after its 120 frames; the detector notices and fails to reopen it (503)
        wait_for(lambda: runtime.stats["source_errors"] >= 1, 60, message="the stream ended")
        runtime.stop.set()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        runtime.stop.set()
        subscriber.close()
        camera.close()
    stats = runtime.stats
    # how many frames a machine keeps up with, and so how many faces it finds, is for the benchmarks
    assert stats["frames"] + stats["frames_skipped"] == 120 and stats["frames"] >= 1
    assert len(subscriber.messages) == stats["faces_published"]


def test_paced_file_skips_overdue_frames_and_counts_them(broker, tmp_path):
    """A file played at 1000 fps cannot be processed that fast: the overdue frames are skipped, counted."""
    runtime = Runtime("detector", state_dir=tmp_path)
    detector.run(detector_config(broker.port, fps=1000.0, search="inline"), runtime)
    stats = runtime.stats
    assert stats["frames_skipped"] > 0 and stats["frames"] + stats["frames_skipped"] == 120


def test_capture_goes_on_while_the_broker_is_down(tmp_path):
    port = free_port()
    config = detector_config(port, loop=True, dedup_interval=0.0, confirm_frames=1, queue_size=20)
    runtime = Runtime("detector")
    depths = []
    thread = start_detector(config, runtime)
    broker = subscriber = None
    try:
        def dropping() -> bool:
            depths.append(runtime.gauges.get("queue_depth", 0))
            return runtime.stats["faces_dropped"] > 50 and runtime.stats["frames"] > 150

        wait_for(dropping, 60, message="capture to go on and the full queue to drop faces")
        assert runtime.stats["faces_published"] == 0
        assert max(depths) <= 20, "the queue is bounded"

        broker = Mosquitto(tmp_path / "late-broker", port=port).start()
        subscriber = Subscriber(port)
        assert subscriber.subscribed.wait(10)
        published_before = runtime.stats["faces_published"]
        wait_for(lambda: len(subscriber.messages) >= 5, 30, message="faces after the broker came up")
        assert runtime.stats["faces_published"] > published_before
    finally:
        runtime.stop.set()
        thread.join(15)
        if subscriber:
            subscriber.close()
        if broker:
            broker.kill()
    assert not thread.is_alive()
    stats = runtime.stats
    assert stats["frames"] > 150, "looped file keeps being read"
    assert stats["faces_suppressed"] == 0, "dedup_interval = 0 sends every detection"
    assert stats["faces_detected"] == stats["faces_published"] + stats["faces_dropped"]
    for message in subscriber.messages:
        messages.parse(message.topic, message.payload, message.properties, 2_000_000)


def test_unopenable_source_is_retried_with_backoff(caplog):
    config = detector_config(free_port(), source="/nonexistent/clip.mp4", reopen_min=0.1, reopen_max=0.4)
    runtime = Runtime("detector")
    with caplog.at_level(logging.WARNING, logger="facehub.edge.detector"):
        thread = start_detector(config, runtime)
        try:
            wait_for(lambda: runtime.stats["source_errors"] >= 5, 20, message="repeated open failures")
        finally:
            runtime.stop.set()
            thread.join(10)
    assert not thread.is_alive()
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert "video file /nonexistent/clip.mp4: no such file" in retries[0]
    delays = [float(m.rsplit("retrying in ", 1)[1].rstrip("s")) for m in retries]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.4], "exponential backoff capped at reopen_max"
    assert not any(r.exc_info for r in caplog.records)


def test_unreadable_camera_is_a_logged_reason_not_a_traceback(tmp_path):
    """`facehub detector` with a camera that is not there: a clear reason, a count, a clean stop."""
    env = {**os.environ, "PYTHONPATH": ROOT, "FACEHUB_DETECTOR_SOURCE": "7",
           "FACEHUB_DETECTOR_REOPEN_MIN": "0.1", "FACEHUB_DETECTOR_REOPEN_MAX": "0.2",
           "FACEHUB_LOCAL_PORT": str(free_port()), "FACEHUB_SUPERVISOR_STATE_DIR": str(tmp_path)}
    log_path = tmp_path / "detector.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "facehub.cli", "detector"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log_path.read_text().count("retrying in") >= 2, 30, message="two logged failures")
        stats_path = tmp_path / "detector.stats.json"
        wait_for(lambda: stats_path.exists() and
                 json.loads(stats_path.read_text())["counters"].get("source_errors", 0) >= 1, 10,
                 message="counted source errors")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    output = log_path.read_text()
    assert proc.returncode == 0
    assert "camera 7: OpenCV cannot open it (no camera at that index or device, or it is busy)" in output
    assert "Traceback" not in output


def test_default_settings_follow_the_sample_face():
    """A full search every few frames plus tracking keeps the face in most of the frames that show it."""
    finder = detector.FaceFinder(Config().detector, "cam-test")
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    seen = frames = 0
    while True:
        frame = detector.read_frame(capture)
        if frame is None:
            break
        frames += 1
        found = finder.locate(frame)
        seen += bool(found)
        finder.select(found, frame, frames, 0, frames / 15)
    capture.release()
    # 102 of the 120 frames show the face; the rest are the empty gap
    assert frames == 120 and seen >= 0.8 * 102


@pytest.mark.parametrize("backend", ["haar", "yunet"])
def test_background_search_finds_the_face_and_crops_the_newest_frame(backend):
    """Each search is waited for before the next frame, as when frames come slower than a search."""
    config = Config().detector
    config.backend = backend
    if backend == "yunet":
        assert YUNET_MODEL.is_file(), f"the shared YuNet model is missing: {YUNET_MODEL}"
        config.backend, config.model_path = "yunet", str(YUNET_MODEL)
    finder = detector.FaceFinder(config, "cam-test", background=True)
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    seen = frames = 0
    sent = []
    try:
        while (frame := detector.read_frame(capture)) is not None:
            frames += 1
            found = finder.locate(frame)
            seen += bool(found)
            sent += finder.select(found, frame, frames, 0, frames / 15)[0]
            finder.searcher.wait(30)
    finally:
        capture.release()
        finder.close()
    assert frames == 120 and seen >= 0.8 * 102
    # frame 1 is searched in the background; its face is carried to and re-found in frame 2, followed, and
    # cropped from the frame where it is confirmed
    assert sent[0].frame == 1 + config.confirm_frames and sent[0].track == 1
    assert len({face.track for face in sent}) == 2 and len(sent) >= 4


def test_search_runs_inline_unless_asked_for_the_background():
    config = Config().detector
    for source, fps, backend in [(str(SAMPLE_CLIP), 0, "haar"), (str(SAMPLE_CLIP), 15, "haar"), ("0", 0, "haar"),
                                 ("0", 0, "yunet")]:
        config.source, config.fps, config.backend = source, fps, backend
        assert not detector.search_in_background(config), (source, fps, backend)
    config.search = "background"
    assert detector.search_in_background(config)


def test_every_detection_is_sent_when_dedup_is_off():
    config = Config().detector
    config.dedup_interval, config.confirm_frames = 0.0, 1
    finder = detector.FaceFinder(config, "cam-test")
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    detected = sent = 0
    for number in range(1, 31):
        frame = detector.read_frame(capture)
        found = finder.locate(frame)
        faces, suppressed = finder.select(found, frame, number, 0, number / 15)
        detected += len(found)
        sent += len(faces)
        assert suppressed == 0
    capture.release()
    assert detected == sent > 20


def test_detect_command_prints_json_lines(shared_faces, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    no_face = tmp_path / "dogs-right-half.jpg"  # the left half holds a dog's face a cascade may take for a person's
    dogs = cv2.imread(str(shared_faces / "dogs.jpg"))
    cv2.imwrite(str(no_face), dogs[:, dogs.shape[1] // 2:])
    files = [str(shared_faces / "2008_001009.jpg"), str(tmp_path / "missing.jpg"), str(junk), str(no_face)]
    result = subprocess.run([sys.executable, "-m", "facehub.cli", "detect", *files], check=False, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == files
    assert lines[1]["error"] == "no such file" and lines[2]["error"] == "not an image OpenCV can read"
    assert lines[3]["faces"] == []
    from facehub.edge.detection.crop import iou

    labelled = [(145, 79, 76, 76), (125, 214, 90, 91)]  # training.xml, 2008_001009.jpg
    found = lines[0]["faces"]
    assert len(found) == 2 and all(len(box) == 4 and all(isinstance(v, int) for v in box) for box in found)
    assert all(max(iou(box, label) for box in found) >= 0.4 for label in labelled)
