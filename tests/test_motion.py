"""A moving camera: faces found by a slow background search are carried to the frame they are cut from,
and ``facehub bench motion`` scores crops against the true boxes of their own frames."""

import threading

import cv2
import numpy as np
import pytest
from conftest import YUNET_MODEL

from facehub.config import DetectorConfig
from facehub.dev.bench import motion
from facehub.dev.bench.quality import MATCH_IOU
from facehub.edge.detection.crop import clip_box, intersection, iou
from facehub.edge.detection.finder import FaceFinder
from facehub.edge.detection.trail import Trail


class HeldSearch:
    """A backend whose full search waits until the test lets it go: a search as slow as the test wants."""

    def __init__(self, backend):
        self.backend = backend
        self.go = threading.Event()

    def detect(self, frame):
        assert self.go.wait(60), "the test never let the search finish"
        return self.backend.detect(frame)


def truth_in(clip, index):
    return [clip_box(face, motion.WIDTH, motion.HEIGHT) for face in clip.truth(index)]


@pytest.mark.parametrize("backend", ["haar", "yunet"])
def test_a_face_found_by_a_search_frames_ago_is_cut_where_it_is_now(shared_faces, backend):
    """The search of frame 0 ends while frame 15 is at hand, the camera panning 5 px a frame: each face it
    found has moved 75 px. Every crop published must sit on a face's true box in the crop's own frame."""
    # every detection is published, from the first: every box is checked
    cfg = DetectorConfig(backend="haar", dedup_interval=0.0, confirm_frames=1, detect_every=15)  # the scenario above
    if backend == "yunet":
        assert YUNET_MODEL.is_file(), f"the shared YuNet model is missing: {YUNET_MODEL}"
        cfg.backend, cfg.model_path = "yunet", str(YUNET_MODEL)
    clip = motion.make_clip(shared_faces, "tuned", "pan:5")
    finder = FaceFinder(cfg, "cam-test", background=True)
    held = HeldSearch(finder.searcher.backend)
    finder.searcher.backend = held
    published = []
    try:
        for index in range(40):
            frame = clip.frame(index)
            if index == 15:
                held.go.set()
                finder.searcher.wait(60)
            faces, _ = finder.select(finder.locate(frame), frame, index, 0, index / motion.RATE)
            assert index >= 15 or not faces, "nothing is found before the first search ends"
            published += faces
    finally:
        held.go.set()
        finder.close()
    first = [face for face in published if face.frame == 15]
    assert len(first) >= 3, "the held search's faces are published on the frame it ends"
    for face in published:
        truth = truth_in(clip, face.frame)
        best = max(iou(face.box, box) for box in truth)
        # never cut a face at a stale place: the crop's centre is on the face (a box 75 px behind is not). The
        # detectors' boxes are looser than the labels' tight ones, so IoU alone would call a centred box off.
        x, y, w, h = face.box
        centred = any(bx <= x + w / 2 <= bx + bw and by <= y + h / 2 <= by + bh for bx, by, bw, bh in truth)
        on_a_face = best >= MATCH_IOU or centred
        if backend == "yunet":  # YuNet does not fire on this clip's clutter: every crop is a face
            assert on_a_face, f"crop {face.box} of frame {face.frame} is not on a face (IoU {best:.2f})"
        else:  # Haar may also fire on clutter, away from every face
            assert on_a_face or not any(intersection(face.box, box) for box in truth), \
                f"crop {face.box} of frame {face.frame} cuts a face off-centre (IoU {best:.2f})"


def test_trail_carries_a_box_through_the_frames_seen_meanwhile(shared_faces):
    clip = motion.make_clip(shared_faces, "held-back", "pan:10")
    trail = Trail()
    trail.start(clip.frame(0))
    for index in range(1, 21):
        trail.add(clip.frame(index))
    boxes = [face for face in truth_in(clip, 0) if face[0] > 220 and face[0] + face[2] < 640]  # stay in view
    assert boxes
    carried = trail.carry(boxes)
    now = truth_in(clip, 20)
    for box, moved in zip(boxes, carried):
        assert moved is not None and max(iou(moved, face) for face in now) >= 0.7, (box, moved)
    assert trail.frames == [], "a carry ends the trail"


def test_trail_drops_a_box_it_cannot_follow(shared_faces):
    clip = motion.make_clip(shared_faces, "tuned", "pan:2")
    trail = Trail()
    trail.start(clip.frame(0))
    trail.add(np.full((motion.HEIGHT, motion.WIDTH, 3), 114, np.uint8))  # the scene is gone
    assert trail.carry([truth_in(clip, 0)[0]]) == [None]


def test_trail_keeps_nothing_while_no_search_runs():
    trail = Trail()
    trail.add(np.zeros((480, 640, 3), np.uint8))
    assert trail.frames == [] and trail.carry([(0, 0, 10, 10)]) == [None]


def test_trail_stays_bounded_on_a_long_search(shared_faces):
    clip = motion.make_clip(shared_faces, "tuned", "pan:1")
    trail = Trail(length=8)
    trail.start(clip.frame(0))
    for index in range(1, 30):
        trail.add(clip.frame(index))
    assert len(trail.frames) <= 8
    box = max(truth_in(clip, 0), key=lambda face: face[2])
    (moved,) = trail.carry([box])
    assert moved is not None and iou(moved, max(truth_in(clip, 29), key=lambda face: iou(face, moved))) >= 0.7


# -- scoring ---------------------------------------------------------------------------------


def test_clips_carry_the_true_boxes_into_every_frame(shared_faces):
    pan = motion.make_clip(shared_faces, "held-back", "pan:5")
    assert len(pan.faces) == 9 and pan.in_view() == set(range(9))
    first, later = pan.truth(0), pan.truth(10)
    assert all(b[0] == pytest.approx(a[0] - 50) and b[2] == pytest.approx(a[2]) for a, b in zip(first, later))
    assert pan.frame(0).shape == (motion.HEIGHT, motion.WIDTH, 3)
    zoom = motion.make_clip(shared_faces, "tuned", "zoom:4")
    middle = len(zoom) // 2
    assert zoom.truth(middle)[0][2] > 1.5 * zoom.truth(0)[0][2], "zooming in enlarges the faces"
    assert zoom.moves[0] == pytest.approx(zoom.moves[-1]), "and it zooms back out"


def test_scoring_judges_each_crop_in_its_own_frame(shared_faces):
    clip = motion.make_clip(shared_faces, "tuned", "pan:5")
    whole = [face for face, box in enumerate(truth_in(clip, 18)) if box[2] > 50 and box[0] > 0 and box[0] + box[2] < 640]
    largest = max(whole, key=lambda face: clip.faces[face][2])
    face = [round(v) for v in clip.truth(30)[largest]]
    stale = [round(v) for v in clip.truth(18)[largest]]  # the same face where it was 12 frames (60 px) earlier
    crops = [(30, tuple(face)), (30, tuple(stale)), (18, tuple(stale)), (5, (0, 0, 20, 20))]
    result = motion.score(clip, crops)
    assert (result.crops, result.captured, result.off_centre, result.false) == (4, 1, 1, 1)
    assert result.coverage == pytest.approx(1 / 9) and result.per_face == pytest.approx(4 / 9)
    assert result.false_share == 0.25 and result.off_centre_share == 0.25
    total = result + result
    assert (total.crops, total.faces, total.captured) == (8, 18, 2)


def test_typical_implementation_scores_on_a_clip(shared_faces):
    """Unpaced (every frame delivered): what the typical implementation sends, judged like the detector's."""
    clip = motion.make_clip(shared_faces, "held-back", "pan:10")
    rows = motion.settings(None)
    assert rows[0].typical and [row.overrides["search"] for row in rows[1:]] == ["background", "inline"]
    frames = [clip.frame(index) for index in range(0, len(clip), 4)]
    sub = motion.Clip(clip.name, clip.scene, clip.faces, clip.moves[::4])
    crops, result = motion.run(sub, frames, rows[0], rate=0)
    assert result.frames == len(frames) and result.skipped == 0
    assert result.captured >= 5 and result.crops == len(crops) > result.captured


def test_quarter_core_needs_root(monkeypatch):
    monkeypatch.setattr(motion.os, "geteuid", lambda: 1000)
    with pytest.raises(motion.CgroupError, match="root"):
        with motion.QuarterCore():
            pass
