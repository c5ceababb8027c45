"""The console's gallery over both kinds of store: newest first, page boundaries, filters, new faces, deletions.

The faces are written by the real storage layer (``Store.put_face``, as the saver writes
them) into a folder and into moto's S3 server.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from console_helpers import face
from facehub.cloud.console.gallery import FaceRef, Gallery, parse_range
from facehub.cloud.storage import open_store
from facehub.config import SaverConfig

DAY_MS = 86_400_000


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path):
    if request.param == "folder":
        return open_store(SaverConfig(url=str(tmp_path / "faces")))
    moto = request.getfixturevalue("moto")
    bucket = request.getfixturevalue("bucket")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    return open_store(SaverConfig(url=f"s3://{bucket}/faces", endpoint_url=moto.endpoint_url))


def midday(days_ago: int) -> int:
    today = datetime.now(timezone.utc).replace(hour=12, minute=0, second=0, microsecond=0)
    return int(today.timestamp() * 1000) - days_ago * DAY_MS


def fill(store, devices=("cam-a", "cam-b", "cam-c"), days=(0, 1, 3), per_day=17) -> list[FaceRef]:
    """Faces at distinct times, interleaved between devices; returns their refs."""
    refs = []
    for d in days:
        for i in range(per_day):
            for n, device in enumerate(devices):
                captured = midday(d) - i * 60_000 - n * 1_000 - 7
                item = face(device, captured, seed=i, track=i // 4)
                store.put_face(item)
                refs.append(FaceRef.from_key(f"{device}/{datetime.fromtimestamp(captured / 1000, timezone.utc):%Y/%m/%d}/"
                                             f"{datetime.fromtimestamp(captured / 1000, timezone.utc):%H%M%S}."
                                             f"{captured % 1000:03d}-{item.face_id}.jpg"))
    return refs


def walk(gallery: Gallery, size: int, **filters) -> list[list[FaceRef]]:
    pages, before = [], None
    for _ in range(1000):
        page = gallery.page(before=before, size=size, **filters)
        pages.append(page.faces)
        if page.next_cursor is None:
            return pages
        before = FaceRef.from_cursor(page.next_cursor)
    raise AssertionError("paging does not end")


def test_pages_are_newest_first_with_exact_boundaries(store):
    refs = fill(store)
    gallery = Gallery(store)
    expected = sorted(refs, key=lambda ref: ref.captured_ms, reverse=True)
    assert gallery.page(size=10).faces == expected[:10]
    pages = walk(gallery, size=20)
    assert [len(p) for p in pages] == [20] * (len(refs) // 20) + ([len(refs) % 20] if len(refs) % 20 else [])
    assert [ref for page in pages for ref in page] == expected  # no gap, no repeat, across days and devices
    # a page boundary that falls exactly at the end of a day folder
    per_day = len(refs) // 3
    pages = walk(gallery, size=per_day)
    assert [ref.day for ref in pages[0]] == [expected[0].day] * per_day
    assert pages[1][0] == expected[per_day]
    gallery.close()


def test_filters_by_device_and_day_and_time(store):
    refs = fill(store)
    gallery = Gallery(store)
    only_b = [ref for page in walk(gallery, size=7, device="cam-b") for ref in page]
    assert only_b == sorted((r for r in refs if r.device == "cam-b"), key=lambda r: r.captured_ms, reverse=True)

    day = datetime.fromtimestamp(midday(1) / 1000, timezone.utc).strftime("%Y-%m-%d")
    start, end = parse_range(day, None, None)
    one_day = [ref for page in walk(gallery, size=11, start_ms=start, end_ms=end) for ref in page]
    assert one_day and all(ref.day == day.replace("-", "/") for ref in one_day)
    assert len(one_day) == len([r for r in refs if r.day == day.replace("-", "/")])

    start, end = parse_range(day, "11:50", "11:55")  # "to 11:55" includes 11:55:xx
    window = [ref for page in walk(gallery, size=5, device="cam-a", start_ms=start, end_ms=end) for ref in page]
    assert [r.captured_ms for r in window] == sorted(
        (r.captured_ms for r in refs if r.device == "cam-a" and start <= r.captured_ms < end), reverse=True)
    assert len(window) == 6  # 11:50..11:55, one a minute
    assert gallery.page(device="cam-z").faces == []
    gallery.close()


def test_new_faces_are_reported_once(store):
    gallery = Gallery(store)
    fill(store, devices=("cam-a",), days=(0,), per_day=3)
    known: dict = {}
    assert gallery.poll(known, prime=True) == []
    assert gallery.poll(known) == []
    now = int(time.time() * 1000)
    added = [face("cam-a", now - 5), face("cam-new", now - 3)]
    for item in added:
        store.put_face(item)
    # the poller re-reads every time; its deadline only bounds a slow store
    seen: list[FaceRef] = []
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        seen += gallery.poll(known)
        time.sleep(0.1)
    assert sorted(ref.face_id for ref in seen) == sorted(item.face_id for item in added)
    assert gallery.poll(known) == []
    gallery.close()


def test_metadata_track_and_summary(store):
    refs = fill(store, devices=("cam-a",), days=(0,), per_day=12)
    gallery = Gallery(store)
    newest = gallery.page(size=1).faces[0]
    meta = gallery.metadata(newest)
    assert meta["device"] == "cam-a" and meta["box"] == "10,20,30,40" and meta["track"] == "0"
    assert meta["captured-ms"] == str(newest.captured_ms)
    same = gallery.same_track(newest, "0")
    assert len(same) == 3 and newest not in same  # track 0 = faces 0..3
    summary = gallery.device_summary("cam-a")
    assert summary["faces_today"] == len(refs) and summary["last_face"] == newest
    assert sum(summary["per_hour"]) == len(refs)
    gallery.close()


def test_deleting_a_face_a_day_and_a_device(store):
    refs = fill(store, devices=("cam-a", "cam-b"), days=(0, 1), per_day=5)
    gallery = Gallery(store)
    victim = refs[0]
    assert gallery.delete_face(victim) == 1
    assert victim not in [r for page in walk(gallery, size=50) for r in page]
    assert gallery.delete_face(victim) == 0
    assert gallery.delete_day("cam-a", refs[-1].day) == 5
    left = [r for page in walk(gallery, size=50) for r in page]
    assert len(left) == len(refs) - 6 and not [r for r in left if r.device == "cam-a" and r.day == refs[-1].day]
    assert gallery.delete_device("cam-b") == 10
    assert {r.device for page in walk(gallery, size=50) for r in page} == {"cam-a"}
    gallery.close()


def test_time_range_parsing():
    start, end = parse_range("2026-03-04", "10:00", "10:15")
    assert datetime.fromtimestamp(start / 1000, timezone.utc).strftime("%H:%M:%S") == "10:00:00"
    assert end - start == 16 * 60_000
    assert parse_range("2026-03-04", None, None)[1] - parse_range("2026-03-04", None, None)[0] == DAY_MS
    assert parse_range(None, "10:00", None) == (None, None)
    with pytest.raises(ValueError):
        parse_range("2026-03-04", "25:00", None)
    with pytest.raises(ValueError):
        FaceRef.from_key("../etc/passwd")
