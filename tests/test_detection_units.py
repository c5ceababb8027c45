"""Crop and box arithmetic, source parsing, the detection-image scale: pure logic."""

import cv2
import numpy as np
import pytest

from facehub.config import DetectorConfig
from facehub.edge.detection import make_backend
from facehub.edge.detection.base import Backend
from facehub.edge.detection.crop import clip_box, crop, encode_jpeg, expand_box, iou, overlap_of_smaller, scale_box
from facehub.edge.detection.haar import drop_nested
from facehub.edge.detection.source import SAMPLE_CLIP, parse_source


def test_expand_box_adds_margin_on_every_side():
    assert expand_box((100, 100, 50, 40), 0.2, 640, 480) == (90, 92, 70, 56)


def test_expand_box_is_clipped_to_the_image():
    assert expand_box((5, 10, 50, 50), 0.5, 60, 60) == (0, 0, 60, 60)
    assert expand_box((0, 0, 20, 20), 0.0, 640, 480) == (0, 0, 20, 20)


def test_clip_box_of_a_box_outside_is_empty():
    assert clip_box((-30, -30, 20, 20), 640, 480)[2:] == (0, 0)
    assert clip_box((-5, 470, 20, 20), 640, 480) == (0, 470, 15, 10)


def test_scale_box_maps_detection_pixels_back_to_the_frame():
    assert scale_box((50, 25, 30, 30), 0.5) == (100, 50, 60, 60)
    assert scale_box((10.4, 10.6, 20, 20, 0.9), 1.0) == (10, 11, 20, 20)


def test_crop_comes_from_the_full_resolution_colour_frame():
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[100:150, 200:250] = (0, 0, 255)
    face = crop(frame, (200, 100, 50, 50), 0.2)
    assert face.shape == (70, 70, 3)
    assert tuple(face[35, 35]) == (0, 0, 255) and tuple(face[0, 0]) == (0, 0, 0)


def test_encode_jpeg_round_trips_and_rejects_empty():
    image = np.full((40, 30, 3), 128, np.uint8)
    data = encode_jpeg(image, 80)
    assert data[:3] == b"\xff\xd8\xff"
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (40, 30, 3)
    with pytest.raises(ValueError):
        encode_jpeg(image[:0], 80)


def test_iou_and_overlap():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 10, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert overlap_of_smaller((0, 0, 100, 100), (10, 10, 20, 20)) == 1.0


def test_drop_nested_keeps_the_strongest_box_per_face():
    boxes = [(100, 100, 40, 40, None, 5), (95, 90, 60, 60, None, 2), (300, 100, 40, 40, None, 1)]
    assert drop_nested(boxes) == [boxes[0], boxes[2]]


@pytest.mark.parametrize("width, detect_width, upscale, factor", [
    (1280, 640, 1.0, 0.5),
    (640, 640, 1.0, 1.0),
    (500, 640, 1.0, 1.0),
    (400, 640, 2.0, 1.6),  # enlarged, but not past detect_width
    (200, 640, 2.0, 2.0),
    (1280, 0, 1.0, 1.0),  # 0 = full size
])
def test_detection_scale(width, detect_width, upscale, factor):
    assert Backend(detect_width, upscale).factor_for(width) == pytest.approx(factor)


@pytest.mark.parametrize("spec, kind, target", [
    ("0", "camera", 0),
    ("2", "camera", 2),
    ("/dev/video0", "camera", "/dev/video0"),
    ("clip.mp4", "file", "clip.mp4"),
    ("rtsp://cam.local:554/stream", "stream", "rtsp://cam.local:554/stream"),
    ("http://cam.local/video.mjpg", "stream", "http://cam.local/video.mjpg"),
    ("nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink", "gstreamer",
     "nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink"),
    ("sample", "file", str(SAMPLE_CLIP)),
])
def test_parse_source(spec, kind, target):
    source = parse_source(spec)
    assert (source.kind, source.target) == (kind, target)
    assert source.ends == (kind == "file")


def test_stream_password_stays_out_of_the_label():
    assert "secret" not in parse_source("rtsp://admin:secret@10.0.0.5/live").label


def test_sample_clip_is_small_and_readable():
    assert SAMPLE_CLIP.is_file() and SAMPLE_CLIP.stat().st_size < 500_000
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    ok, frame = capture.read()
    capture.release()
    assert ok and frame.shape == (480, 640, 3)


def test_missing_cascade_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot load Haar cascade"):
        make_backend(DetectorConfig(cascade="no_such_cascade.xml"))


def test_gstreamer_pipeline_failure_names_the_cause():
    from facehub.edge.detection.source import SourceError, open_source

    with pytest.raises(SourceError, match="GStreamer pipeline 'videotestsrc ! appsink': OpenCV cannot open it"):
        open_source("videotestsrc ! appsink")


def test_two_tracks_on_one_face_follow_to_one_box():
    """Boxes that converge on the same face give one detection: the first (older) track keeps it."""
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    frame = capture.read()[1]
    capture.release()
    backend = make_backend(DetectorConfig())
    face = backend.detect(frame)[0].box
    x, y, w, h = face
    inner = (x + w // 8, y + h // 8, w * 3 // 4, h * 3 // 4)  # nested in the face box: IoU about 0.56
    found = backend.follow(frame, [face, inner])
    assert len(found) == 1 and iou(found[0], face) > 0.5
