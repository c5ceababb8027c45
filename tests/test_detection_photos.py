"""Real detection on the labelled photos in ../shared/faces (dlib's XML format, IoU >= 0.4 is a match)."""

import cv2
import pytest
from conftest import YUNET_MODEL

from facehub.config import DetectorConfig
from facehub.edge.detection import make_backend
from facehub.dev.bench import quality
from facehub.dev.bench.quality import labelled_photos
from facehub.edge.detection.crop import iou


def score(backend, folder):
    """(true positives, false positives, labelled faces) of photos searched as still images, as ``facehub bench quality`` does."""
    result = quality.score(quality.still(backend), folder)
    return result.hits, result.false, result.labelled


def test_labels_are_read(shared_faces):
    photos = labelled_photos(shared_faces)
    assert len(photos) == 4 and sum(len(boxes) for boxes in photos.values()) == 18


HAAR = DetectorConfig(backend="haar")  # the built-in defaults where no YuNet model is installed


def test_default_haar_settings_recall_and_precision(shared_faces):
    """The 18 faces as they are: at least 13 found (the typical settings find 9), at precision 0.95 or more."""
    hits, false, total = score(make_backend(HAAR), shared_faces)
    recall, precision = hits / total, hits / (hits + false)
    assert hits >= 13 and precision >= 0.95, f"recall {recall:.2f}, precision {precision:.2f}"


def test_default_haar_settings_on_the_held_back_photos(shared_faces):
    """The photos the defaults were not chosen on, as a camera might deliver them (8 variants each)."""
    result = quality.score_split(quality.still(make_backend(HAAR)), shared_faces, "held-back")
    assert result.precision >= 0.95 and result.recall >= 0.92, f"{result}"


def test_a_camera_frame_is_searched_more_coarsely_than_a_still_image(shared_faces):
    """A camera frame is searched at ``scale_factor``: cheaper, finds fewer faces in one frame, still no false ones."""
    backend = make_backend(HAAR)
    camera = quality.score_split(backend.detect, shared_faces, "held-back")
    still = quality.score_split(quality.still(backend), shared_faces, "held-back")
    assert camera.hits < still.hits and camera.precision >= 0.95, f"camera {camera}, still {still}"


def test_the_mirrored_window_and_every_cascade_count_in_the_agreement(shared_faces):
    """A labelled face gets hits from all three cascades, in the window as it is and mirrored."""
    backend = make_backend(HAAR)
    name, image, (label, *_) = quality.split_photos(shared_faces, "held-back")[0]
    grey = backend.prepare(image, 1.0)
    running = [[0, 0, 0], *backend.hit_counts(grey, label)]  # totals after each window: as is, mirrored, as is...
    per_window = [[now - before for now, before in zip(after, prior)] for prior, after in zip(running, running[1:])]
    assert len(per_window) == 8 and len(backend.verifiers) == 3
    assert all(sum(counts[i] for counts in per_window[0::2]) > 0 for i in range(3)), per_window
    assert sum(map(sum, per_window[1::2])) > 0, "the mirrored windows add hits"
    assert backend.agreement(grey, label) >= backend.verify_score


def test_variants_keep_the_labels_on_the_faces(shared_faces):
    (name, image, labels), *_ = quality.split_photos(shared_faces, "tuned")
    shown = quality.variants(image, labels)
    assert [what for what, _, _ in shown][:3] == ["original", "smaller x0.8", "larger x1.3"]
    _, small, boxes = shown[1]
    assert small.shape[1] == round(image.shape[1] * 0.8) and boxes[0][2] == pytest.approx(labels[0][2] * 0.8)
    assert all(variant.shape[2] == 3 for _, variant, _ in shown)


def test_default_haar_settings_find_at_most_one_face_on_dogs(shared_faces):
    """Fur and a dog's face, 105 pixels wide, fool one cascade at a time, not all three: at most one false box."""
    backend, dogs = make_backend(HAAR), cv2.imread(str(shared_faces / "dogs.jpg"))
    assert len(backend.detect(dogs)) <= 1 and len(backend.detect(dogs, still=True)) <= 1


def test_verification_and_the_contrast_gate_are_what_keep_precision(shared_faces):
    """Without the verifying cascades, or without either check, the same proposals bring false boxes."""
    def false_boxes(**settings):
        backend = make_backend(DetectorConfig(backend="haar", **settings))
        return quality.score_split(quality.still(backend), shared_faces, "tuned").false

    verified = false_boxes()
    assert false_boxes(verify_score=0) > 5 * max(verified, 1)
    assert false_boxes(verify_score=0, min_contrast=0) > false_boxes(verify_score=0)


def test_typical_settings_miss_half_the_faces(shared_faces):
    """The usual detectMultiScale(gray, 1.3, 5) finds 9 of the 18: the reference the defaults beat."""
    hits, _, total = score(make_backend(DetectorConfig(backend="haar", scale_factor=1.3, still_scale_factor=1.3, min_neighbors=5, verify_score=0)),
                           shared_faces)
    assert hits <= total // 2 + 1


def test_yunet_recall(shared_faces):
    if not YUNET_MODEL.is_file():
        pytest.skip(f"YuNet model not found at {YUNET_MODEL}")
    backend = make_backend(DetectorConfig(backend="yunet", model_path=str(YUNET_MODEL)))
    hits, false, total = score(backend, shared_faces)
    assert hits / total >= 0.95 and hits / (hits + false) >= 0.9
    faces = backend.detect(cv2.imread(str(shared_faces / "2008_001009.jpg")))
    assert faces and all(0.8 <= face.score <= 1 for face in faces), "YuNet gives a score per face"


def test_detection_on_a_large_frame_is_mapped_back_to_full_resolution():
    """A frame wider than detect_width is searched shrunk; boxes come back in the frame's own pixels."""
    from facehub.edge.detection.source import SAMPLE_CLIP

    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    capture.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, frame = capture.read()
    capture.release()
    assert ok
    backend = make_backend(HAAR)
    (small,) = backend.detect(frame)
    (large,) = backend.detect(cv2.resize(frame, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR))
    assert large.w > 100 and iou(large, [2 * v for v in small[:4]]) >= 0.8
