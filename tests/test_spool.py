"""The forwarder's spool on a real SQLite file: durability, order, limits, expiry."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading

import pytest

from facehub import messages
from facehub.edge.properties import pack_properties, unpack_properties
from facehub.edge.spool import Record, Spool, SpoolError, entry_size


def face_record(n: int, size: int = 100) -> Record:
    face = messages.Face(image=b"\xff\xd8\xff" + bytes(size), device_id="cam1", face_id=f"face-{n}")
    return Record("faces/cam1", face.image, pack_properties(face.properties()), qos=1)


def put_faces(spool: Spool, count: int, size: int = 100) -> list[int]:
    return spool.put_many([face_record(n, size) for n in range(count)]).ids


def test_entries_come_back_with_topic_payload_and_properties(tmp_path):
    face = messages.Face(image=b"\xff\xd8\xffjpeg", device_id="cam1", frame=7, box=(1, 2, 3, 4), score=0.9)
    with Spool(tmp_path / "spool.db") as spool:
        entry_id = spool.put("faces/cam1", face.image, pack_properties(face.properties()), qos=1)
        [entry] = spool.claim(10)
    assert entry.id == entry_id
    assert (entry.topic, entry.payload, entry.qos) == ("faces/cam1", face.image, 1)
    props = entry.mqtt_properties()
    assert props.ContentType == "image/jpeg"
    assert props.UserProperty == list(face.metadata().items())
    assert messages.parse(entry.topic, entry.payload, props, 10_000) == face


def test_every_publish_property_round_trips_except_hop_ones():
    face = messages.Face(image=b"\xff\xd8\xff", device_id="cam1")
    props = face.properties()
    props.UserProperty = [("note", "Zoë ✓")]
    props.PayloadFormatIndicator = 0
    props.MessageExpiryInterval = 3600
    props.ResponseTopic = "replies/cam1"
    props.CorrelationData = b"\x00\xffbinary"
    expected = props.pack()
    props.TopicAlias = 3
    props.SubscriptionIdentifier = 7
    restored = unpack_properties(pack_properties(props))
    assert not hasattr(restored, "TopicAlias") and not hasattr(restored, "SubscriptionIdentifier")
    for name in ("ContentType", "UserProperty", "PayloadFormatIndicator", "MessageExpiryInterval",
                 "ResponseTopic", "CorrelationData"):
        assert getattr(restored, name) == getattr(props, name), name
    assert restored.pack() == expected
    assert unpack_properties(pack_properties(None)).isEmpty()


def test_claim_hands_out_oldest_first_and_never_twice(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        ids = put_faces(spool, 10)
        first = [e.id for e in spool.claim(4)]
        second = [e.id for e in spool.claim(4)]
        assert first == ids[:4] and second == ids[4:8]
        assert spool.in_flight == 8
        assert spool.ack(first) == 4
        assert spool.depth == 6
        spool.release(second[1:3])
        assert [e.id for e in spool.claim(10)] == second[1:3] + ids[8:]
        assert spool.claim(10) == []


def test_ack_updates_depth_and_bytes(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        ids = put_faces(spool, 5, size=1000)
        full = spool.bytes
        assert spool.depth == 5 and full > 5000
        spool.claim(5)
        assert spool.ack(ids[:2]) == 2
        assert spool.ack(ids[:2]) == 0  # already gone
        assert spool.depth == 3
        assert spool.bytes == pytest.approx(full * 3 / 5)


def test_reopen_keeps_everything_not_acknowledged(tmp_path):
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        ids = put_faces(spool, 20)
        claimed = spool.claim(10)
        spool.ack([e.id for e in claimed[:5]])
    with Spool(path) as spool:
        assert spool.depth == 15
        # claimed-but-unacknowledged entries are pending again, in order
        assert [e.id for e in spool.claim(100)] == ids[5:]
        assert spool.bytes == sum(entry_size(face_record(n)) for n in range(5, 20))


def _fill_and_die(path: str, fsync: str, ready) -> None:
    spool = Spool(path, fsync=fsync)
    ids = [spool.put("faces/cam1", b"\xff\xd8\xff" + bytes([n % 256]) * 5000) for n in range(200)]
    claimed = spool.claim(100)
    spool.ack([e.id for e in claimed[:30]])
    ready.send(ids)  # a pipe write is done when send returns (a Queue's feeder thread may not be)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("fsync", ["full", "normal"])
def test_survives_kill_9(tmp_path, fsync):
    """A process killed mid-work leaves a spool that reopens with every unacknowledged entry."""
    path = str(tmp_path / "spool.db")
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_fill_and_die, args=(path, fsync, sender))
    child.start()
    assert receiver.poll(60), "the child did not report its ids"
    ids = receiver.recv()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    with Spool(path, fsync=fsync) as spool:
        entries = spool.claim(1000)
    assert [e.id for e in entries] == ids[30:]
    assert all(e.payload == b"\xff\xd8\xff" + bytes([(e.id - 1) % 256]) * 5000 for e in entries)


@pytest.mark.parametrize("fsync, level", [("full", 2), ("normal", 1), ("off", 0)])
def test_fsync_policy_sets_sqlite_synchronous(tmp_path, fsync, level):
    with Spool(tmp_path / "spool.db", fsync=fsync) as spool:
        assert spool.sqlite_settings() == {"synchronous": level, "journal_mode": "wal"}


def test_unknown_fsync_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fsync"):
        Spool(tmp_path / "spool.db", fsync="sometimes")


def test_full_by_count_drops_oldest_and_counts(tmp_path, caplog):
    with Spool(tmp_path / "spool.db", max_messages=10) as spool:
        first = spool.put_many([face_record(n) for n in range(8)])
        second = spool.put_many([face_record(n) for n in range(8, 15)])
        assert (first.dropped, second.dropped) == (0, 5)
        assert spool.depth == 10 and spool.dropped_total == 5
        assert [e.id for e in spool.claim(100)] == (first.ids + second.ids)[5:]
    assert "spool full" in caplog.text


def test_full_batch_larger_than_spool_keeps_newest(tmp_path):
    with Spool(tmp_path / "spool.db", max_messages=3) as spool:
        result = spool.put_many([face_record(n) for n in range(10)])
        assert result.dropped == 7
        assert [e.id for e in spool.claim(100)] == result.ids[-3:]


def test_full_by_bytes_drops_oldest(tmp_path):
    size = entry_size(face_record(0, size=1000))
    with Spool(tmp_path / "spool.db", max_bytes=size * 4 + 10) as spool:
        ids = put_faces(spool, 6, size=1000)
        assert spool.depth == 4 and spool.dropped_total == 2
        assert spool.bytes <= size * 4 + 10
        assert [e.id for e in spool.claim(100)] == ids[2:]


def test_in_flight_entries_are_not_dropped(tmp_path):
    with Spool(tmp_path / "spool.db", max_messages=4) as spool:
        ids = put_faces(spool, 4)
        spool.claim(2)
        more = put_faces(spool, 2)
        # entries 0 and 1 are on the wire; the oldest pending ones (2, 3) made room
        assert spool.dropped_total == 2
        spool.release_all()
        assert [e.id for e in spool.claim(100)] == ids[:2] + more


def test_message_larger_than_the_spool_is_rejected_and_counted(tmp_path, caplog):
    with Spool(tmp_path / "spool.db", max_bytes=2048) as spool:
        kept = spool.put("faces/cam1", b"x" * 100)
        result = spool.put_many([Record("faces/cam1", b"x" * 5000)])
        assert result.ids == [None] and result.rejected == 1
        assert spool.dropped_total == 1
        assert [e.id for e in spool.claim(10)] == [kept]
    assert "larger than forwarder.spool_max_bytes" in caplog.text


def test_expire_drops_old_entries_but_not_in_flight(tmp_path, caplog):
    now = [1000.0]
    with Spool(tmp_path / "spool.db", max_age=60, clock=lambda: now[0]) as spool:
        old = put_faces(spool, 3)
        now[0] += 50
        new = put_faces(spool, 2)
        spool.claim(1)  # the oldest is on the wire
        now[0] += 20
        assert spool.expire() == 2
        assert spool.expired_total == 2 and spool.depth == 3
        spool.release_all()
        assert [e.id for e in spool.claim(10)] == old[:1] + new
        spool.release_all()
        now[0] += 100
        assert spool.expire() == 3 and spool.depth == 0 and spool.bytes == 0
    assert "older than forwarder.spool_max_age" in caplog.text


def test_concurrent_puts_from_threads(tmp_path):
    with Spool(tmp_path / "spool.db", fsync="normal") as spool:
        results: list[list[int]] = []

        def writer(n):
            results.append([spool.put("faces/cam1", f"{n}-{i}".encode()) for i in range(100)])

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ids = [i for chunk in results for i in chunk]
        assert len(set(ids)) == 400 and spool.depth == 400
        assert sorted(e.id for e in spool.claim(1000)) == sorted(ids)


def test_unwritable_spool_raises_spool_error(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        other = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # hold the write lock
        spool.set_busy_timeout(0.1)
        with pytest.raises(SpoolError):
            spool.put("faces/cam1", b"x")
        other.execute("ROLLBACK")
        assert spool.depth == 0
        assert spool.put("faces/cam1", b"x") is not None
        assert spool.depth == 1


def test_unopenable_spool_raises_spool_error(tmp_path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(SpoolError, match="cannot open spool"):
        Spool(tmp_path / "dir.db")


def test_deletes_do_not_change_the_durability_of_puts(tmp_path):
    with Spool(tmp_path / "spool.db", fsync="full") as spool:
        ids = put_faces(spool, 3)
        spool.claim(3)
        assert spool.ack(ids) == 3
        assert spool.sqlite_settings()["synchronous"] == 2  # FULL again
