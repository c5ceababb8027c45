"""Tracking and duplicate suppression: pure logic, driven by explicit clock values."""

import itertools

import pytest

from facehub.edge.detection.tracker import Tracker

A = (100, 100, 50, 50)
A_MOVED = (105, 102, 50, 50)
A_BIGGER = (98, 98, 60, 60)
B = (400, 300, 40, 40)


def feed(tracker, frames):
    """Run (time, [boxes]) frames through the tracker; returns (sent (track, box, time), suppressed)."""
    sent, suppressed = [], 0
    for now, boxes in frames:
        step = tracker.update(boxes, now, keep=lambda box, now=now: (box, now))
        sent += [(track, box, seen) for track, (box, seen) in step.send]
        suppressed += step.suppressed
    return sent, suppressed


def test_a_new_face_is_sent_at_once():
    sent, suppressed = feed(Tracker(interval=1.0), [(0.0, [A])])
    assert sent == [(1, A, 0.0)] and suppressed == 0


def test_largest_policy_sends_a_face_in_view_once_per_interval():
    tracker = Tracker(interval=1.0, timeout=5.0, policy="largest")
    frames = [(i / 10, [A]) for i in range(31)]  # 3 s at 10 fps
    sent, suppressed = feed(tracker, frames)
    # first at once, then the best (equal sizes: the latest) sighting of each interval when it is due
    assert [t for _, _, t in sent] == [0.0, 1.0, 2.0, 3.0]
    assert {track for track, _, _ in sent} == {1}
    assert len(sent) + suppressed + sum(1 for t in tracker.tracks.values() if t.best is not None) == 31


@pytest.mark.parametrize("policy", ["better", "largest", "first"])
def test_sends_are_at_least_an_interval_apart(policy):
    tracker = Tracker(interval=1.0, timeout=5.0, policy=policy)
    growing = [(100, 100, 20 + 3 * i, 20 + 3 * i) for i in range(50)]  # so "better" sends more than once
    step_times = []
    for i in range(50):
        step = tracker.update([growing[i]], i / 10, keep=lambda box: box)
        step_times += [i / 10] * len(step.send)
    gaps = [b - a for a, b in itertools.pairwise(step_times)]
    assert len(gaps) >= 3 and min(gaps) >= 1.0 - 1e-9


def test_largest_policy_sends_the_largest_sighting_of_the_interval():
    tracker = Tracker(interval=1.0, timeout=5.0, policy="largest")
    sent, _ = feed(tracker, [(0.0, [A]), (0.3, [A_MOVED]), (0.5, [A_BIGGER]), (0.7, [A_MOVED]), (1.0, [A])])
    assert [box for _, box, _ in sent] == [A, A_BIGGER]
    assert sent[1][2] == 0.5, "the kept sighting carries its own capture time"


def test_two_faces_are_two_tracks():
    sent, _ = feed(Tracker(interval=1.0), [(0.0, [A, B]), (0.1, [B, A_MOVED])])
    assert sorted(track for track, _, _ in sent) == [1, 2]


def test_zero_interval_sends_every_detection():
    tracker = Tracker(interval=0)
    sent, suppressed = feed(tracker, [(i / 30, [A, B]) for i in range(30)])
    assert len(sent) == 60 and suppressed == 0
    assert {track for track, _, _ in sent} == {1, 2}


def test_a_face_that_leaves_and_returns_is_a_new_track():
    tracker = Tracker(interval=10.0, timeout=0.5)
    sent, _ = feed(tracker, [(0.0, [A]), (0.1, [A]), (0.2, []), (1.0, []), (1.1, [A])])
    assert [track for track, _, _ in sent] == [1, 2]


def test_held_sighting_of_a_departed_face_is_still_sent_when_due():
    tracker = Tracker(interval=1.0, timeout=2.0, policy="largest")
    sent, _ = feed(tracker, [(0.0, [A]), (0.4, [A_BIGGER]), (0.6, []), (1.0, []), (1.1, [])])
    assert [(box, seen) for _, box, seen in sent] == [(A, 0.0), (A_BIGGER, 0.4)]


def test_expired_track_with_held_sighting_counts_it_suppressed():
    tracker = Tracker(interval=5.0, timeout=0.5, policy="largest")
    sent, suppressed = feed(tracker, [(0.0, [A]), (0.2, [A]), (1.0, [])])
    assert len(sent) == 1 and suppressed == 1 and not tracker.tracks


def test_close_reports_held_sightings():
    tracker = Tracker(interval=5.0, policy="largest")
    feed(tracker, [(0.0, [A, B]), (0.1, [A, B])])
    assert tracker.close() == 2 and tracker.boxes() == []


@pytest.mark.parametrize(("policy", "interval"), [("better", 0.05), ("largest", 1.0)])
def test_keep_is_called_only_for_sightings_that_may_be_sent(policy, interval):
    calls = []
    tracker = Tracker(interval=interval, timeout=5.0, policy=policy)
    for i, box in enumerate([A, A_BIGGER, A, A, A]):
        tracker.update([box], i / 10, keep=lambda b: calls.append(b) or b)
    assert calls == [A, A_BIGGER], "smaller sightings than the held one are not copied"


def test_low_overlap_starts_a_new_track():
    tracker = Tracker(iou_threshold=0.5, interval=0)
    far = (130, 100, 50, 50)  # IoU with A = 20*50 / (2*2500 - 1000) = 0.25
    sent, _ = feed(tracker, [(0.0, [A]), (0.1, [far])])
    assert [track for track, _, _ in sent] == [1, 2]


@pytest.mark.parametrize("policy", ["better", "largest", "first"])
@pytest.mark.parametrize("interval", [0.0, 0.5, 2.0])
def test_every_sighting_is_sent_suppressed_or_held(interval, policy):
    tracker = Tracker(interval=interval, timeout=1.0, policy=policy)
    total = 0
    sent_or_suppressed = 0
    for i in range(100):
        boxes = [A] if i % 7 else []
        if i % 3 == 0:
            boxes = boxes + [B]
        total += len(boxes)
        step = tracker.update(boxes, i / 15, keep=lambda b: b)
        sent_or_suppressed += len(step.send) + step.suppressed
    assert sent_or_suppressed + tracker.close() == total


def test_first_policy_sends_the_first_sighting_after_the_interval_at_once():
    tracker = Tracker(interval=1.0, timeout=5.0, policy="first")
    sent, suppressed = feed(tracker, [(0.0, [A]), (0.5, [A_BIGGER]), (1.1, [A]), (1.5, [A_BIGGER]), (2.2, [A])])
    assert [(box, seen) for _, box, seen in sent] == [(A, 0.0), (A, 1.1), (A, 2.2)]
    assert suppressed == 2 and tracker.close() == 0, "nothing is held"


def test_better_policy_sends_a_face_that_stays_put_once():
    tracker = Tracker(interval=1.0, timeout=5.0)
    sent, suppressed = feed(tracker, [(i / 10, [A]) for i in range(31)])
    assert [(track, seen) for track, _, seen in sent] == [(1, 0.0)]
    assert suppressed == 30 and tracker.close() == 0, "nothing is held"


def test_better_policy_sends_a_clearly_larger_crop_at_once_after_the_interval():
    much_bigger = (95, 95, 70, 70)  # 4900 px against 2500: more than BETTER_AREA times larger
    tracker = Tracker(interval=1.0, timeout=5.0)
    frames = [(0.0, [A]), (0.5, [much_bigger]), (1.0, [A_BIGGER]), (1.2, [much_bigger]), (2.4, [much_bigger])]
    sent, suppressed = feed(tracker, frames)
    # A_BIGGER (3600 px) beats A by 1.44x and is due at 1.0; then much_bigger beats A_BIGGER by 1.36x but
    # must wait for the interval; at 2.4 it is sent, with its own capture time
    assert [(box, seen) for _, box, seen in sent] == [(A, 0.0), (A_BIGGER, 1.0), (much_bigger, 2.4)]
    assert suppressed == 2


def test_better_policy_ignores_a_slightly_larger_crop():
    slightly = (100, 100, 52, 52)  # 2704 px: 8 % more than A
    sent, suppressed = feed(Tracker(interval=1.0, timeout=5.0), [(0.0, [A]), (1.5, [slightly])])
    assert len(sent) == 1 and suppressed == 1


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown duplicate policy 'best'"):
        Tracker(policy="best")


def test_a_new_face_is_sent_once_seen_in_confirm_frames():
    tracker = Tracker(interval=0, confirm=3)
    sent, suppressed = feed(tracker, [(0.0, [A]), (0.1, [A]), (0.2, [A]), (0.3, [A])])
    assert [seen for _, _, seen in sent] == [0.2, 0.3] and suppressed == 2
    flicker = Tracker(interval=0, confirm=3, timeout=0.05)
    sent, _ = feed(flicker, [(0.0, [B]), (0.1, []), (0.2, [B]), (0.3, [])])
    assert sent == [], "a detection that does not last is never sent"
