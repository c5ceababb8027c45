"""The saver's bookkeeping: quarantine quotas, drop logs, attempt records."""

from __future__ import annotations

import logging
import threading
import time

from facehub.cloud.guards import DropLog, PoisonLedger, QuarantineQuota, SoloGate, message_digest
from facehub.dev.servers import wait_for

DAY = 86400.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def quota(clock: Clock, **limits) -> QuarantineQuota:
    settings = dict(max_messages=0, max_bytes=0, rate=0.0, burst=0, total_bytes=0)
    settings.update(limits)
    return QuarantineQuota(**settings, clock=clock, wall=clock)


def test_a_device_gets_its_messages_and_bytes_per_day_then_a_new_day():
    clock = Clock()
    limits = quota(clock, max_messages=3, max_bytes=1000)
    assert [limits.admit("cam-1", 100) for _ in range(4)][-1].startswith("device reached its daily quarantine "
                                                                        "quota of 3 messages")
    assert limits.admit("cam-2", 900) == ""
    assert "quota of 1000 bytes" in limits.admit("cam-2", 101)
    assert limits.state()["devices_over_quota"] == 1  # cam-1; cam-2 has bytes left for a small one
    clock.now += DAY
    assert limits.admit("cam-1", 100) == "" and limits.state()["devices_over_quota"] == 0


def test_the_rate_refills_over_time():
    clock = Clock()
    limits = quota(clock, rate=2.0, burst=4)
    assert [limits.admit("cam-1", 1) for _ in range(5)].count("") == 4
    assert "rate of 2/s" in limits.admit("cam-1", 1)
    clock.now += 1.0
    assert [limits.admit("cam-1", 1) for _ in range(3)].count("") == 2
    assert limits.admit("cam-2", 1) == ""  # each device has its own bucket


def test_all_devices_share_one_daily_budget_and_unknown_devices_share_one_bucket():
    clock = Clock()
    limits = quota(clock, total_bytes=1000)
    assert limits.admit("a", 600) == "" and limits.admit("b", 390) == ""
    assert "for all devices is used up" in limits.admit("c", 20)
    assert limits.state()["full"]
    many = quota(clock, max_messages=1)
    assert all(many.admit(f"cam-{number}", 1) == "" for number in range(10_000))
    assert many.admit("cam-10000", 1) == ""  # the first beyond the tracked devices: charged to the shared bucket
    assert "quota of 1 messages" in many.admit("cam-10001", 1)  # ... which is now used up for all of them
    assert "quota of 1 messages" in many.admit("cam-0", 1)


def test_drops_are_logged_once_per_interval(caplog):
    clock = Clock(0.0)
    drops = DropLog(logging.getLogger("drops"), "copies", interval=60.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="drops")
    for _ in range(500):
        drops.note("cam-1: quota")
    assert len(caplog.records) == 1 and "dropped 1 copies" in caplog.records[0].getMessage()
    drops.flush()
    assert len(caplog.records) == 1
    clock.now = 61.0
    drops.flush()
    assert len(caplog.records) == 2 and "dropped 499 copies (499x cam-1: quota)" in caplog.records[1].getMessage()
    drops.note("cam-2: rate")
    drops.flush(force=True)
    assert len(caplog.records) == 3


def test_attempts_are_counted_on_disk_and_cleared(tmp_path):
    digest = message_digest("faces/cam-1", b"payload", None)
    ledger = PoisonLedger(tmp_path / "attempts")
    assert [ledger.attempt(digest) for _ in range(3)] == [1, 2, 3]
    assert PoisonLedger(tmp_path / "attempts").attempts(digest) == 3  # what the next life of the saver sees
    ledger.clear(digest)
    assert ledger.attempts(digest) == 0 and not list((tmp_path / "attempts").iterdir())
    assert message_digest("faces/cam-1", b"payload", None) == digest
    assert message_digest("faces/cam-2", b"payload", None) != digest


def test_a_floor_counts_attempts_that_left_no_record(tmp_path):
    digest = message_digest("faces/cam-1", b"payload", None)
    ledger = PoisonLedger(tmp_path / "attempts")
    assert ledger.attempt(digest, floor=1) == 2  # a redelivery: its first delivery wrote nothing
    assert ledger.attempt(digest, floor=1) == 3  # the record counts more than the floor
    assert ledger.attempt(digest, floor=5) == 6
    ledger.clear(message_digest("faces/cam-2", b"payload", None))  # a message it holds no record of
    assert ledger.attempts(digest) == 6


def test_a_suspect_goes_through_the_gate_alone(tmp_path):
    gate = SoloGate()
    events: list[str] = []
    shared_in, release = threading.Event(), threading.Event()

    def first_delivery():
        with gate.shared():
            events.append("shared in")
            shared_in.set()
            release.wait(10)
            events.append("shared out")

    def suspect():
        with gate.solo():
            events.append("solo in")
            time.sleep(0.05)
            events.append("solo out")

    def late_first_delivery():
        with gate.shared():
            events.append("late in")

    threads = [threading.Thread(target=first_delivery)]
    threads[0].start()
    assert shared_in.wait(10)
    threads.append(threading.Thread(target=suspect))
    threads[1].start()
    wait_for(lambda: gate._waiting == 1, 10, message="the suspect waiting")
    threads.append(threading.Thread(target=late_first_delivery))
    threads[2].start()
    # the late first delivery is blocked behind the waiting suspect: it joins the condition's waiters
    wait_for(lambda: len(gate._cond._waiters) == 2, 10, message="the late delivery waiting")
    assert events == ["shared in"]  # the suspect waits for the one inside; the late one waits behind it
    release.set()
    for thread in threads:
        thread.join(10)
    assert events == ["shared in", "shared out", "solo in", "solo out", "late in"]


def test_an_unwritable_ledger_turns_itself_off(tmp_path, caplog):
    (tmp_path / "attempts").write_text("a file where the folder must go")
    ledger = PoisonLedger(tmp_path / "attempts")
    assert not ledger.enabled and "cannot keep attempt records" in caplog.text
    assert ledger.attempt("ab" * 32) == 1 and ledger.attempt("ab" * 32) == 1


def test_the_savers_bounds_are_checked():
    import pytest

    from facehub.config import Config, ConfigError, SaverConfig, SupervisorConfig

    Config(saver=SaverConfig(max_attempts=3), supervisor=SupervisorConfig(max_restarts=5)).validate()
    bad = [
        (dict(saver=SaverConfig(max_attempts=0)), "saver.max_attempts"),
        (dict(saver=SaverConfig(max_pixels=8192 * 8192)), "saver.decode_memory"),  # not enough for that size
        (dict(saver=SaverConfig(queue_bytes=1000)), "saver.queue_bytes"),
        (dict(saver=SaverConfig(quarantine_rate=1.0, quarantine_burst=0)), "saver.quarantine_burst"),
        (dict(saver=SaverConfig(quarantine_reserve=1.0)), "saver.quarantine_reserve"),
        (dict(saver=SaverConfig(decoders=0)), "saver.decoders"),
    ]
    for settings, key in bad:
        with pytest.raises(ConfigError, match=key):
            Config(**settings).validate()


def test_a_record_left_by_an_earlier_life_is_inherited_and_counted(tmp_path):
    """A broker may hand a message over again without DUP (after its restart, or to another saver of the
    shared subscription): the record an earlier life left still counts, and clearing it removes the file."""
    earlier = PoisonLedger(tmp_path)
    assert earlier.attempt("abc", floor=1) == 2 and not earlier.inherited
    later = PoisonLedger(tmp_path)
    assert later.inherited == {"abc"} and later.holds_records()
    assert later.attempt("abc") == 3 and "abc" not in later.inherited
    later.clear("abc")
    assert not (tmp_path / "abc").exists() and not later.holds_records()
    third = PoisonLedger(tmp_path)
    assert not third.inherited
