"""The saver's bookkeeping against hostile or broken input: poison messages, quarantine quotas, drop logs.

- :class:`PoisonLedger`: how many times each message has been *attempted*, on
  disk, so that a message that kills the saver is recognised by the next life
  of the saver when the broker redelivers it (a persistent session redelivers
  the unacknowledged message first, forever). A record is written before the
  risky step of a message that has been delivered before (or has already
  crashed a decoder) and removed after it, so a record that survives says "the
  saver died or gave up while handling this". A first delivery writes nothing:
  its redelivery counts it (see :meth:`PoisonLedger.attempt`'s ``floor``).
- :class:`SoloGate`: a redelivered message is checked alone, so a crash is
  charged to the message that caused it, not to the faces checked beside it.
- :class:`QuarantineQuota`: how much of the quarantine one device may fill per
  UTC day (messages and bytes), how fast (a token bucket), and how much all
  devices together may fill; beyond it copies are dropped and counted.
- :class:`DropLog`: one log line when something starts being dropped, then at
  most one summary per interval, instead of a line per message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

LEDGER_MAX_AGE = 7 * 86400.0  # records of messages never seen again are removed after this long
OTHER_DEVICES = "(other devices)"
MAX_TRACKED_DEVICES = 10_000


def message_digest(topic: str, payload: bytes, properties: Any) -> str:
    """sha256 of a received message: topic, payload and user properties (redeliveries are equal)."""
    digest = hashlib.sha256()
    digest.update(topic.encode("utf-8", "replace"))
    digest.update(b"\0")
    digest.update(len(payload).to_bytes(8, "big"))
    digest.update(payload)
    try:
        pairs = getattr(properties, "UserProperty", None) or []
        digest.update(repr(list(pairs)[:100]).encode("utf-8", "replace")[:65536])
        digest.update(repr(getattr(properties, "ContentType", None))[:300].encode("utf-8", "replace"))
    except Exception:  # a foreign object we cannot read: topic and payload identify the message
        pass
    return digest.hexdigest()


class PoisonLedger:
    """Attempt counts of messages in flight, one small file per message in ``folder``.

    Shared by every saver of the same state folder. A process crash loses no
    record (the page cache survives it); a power cut may, which only costs one
    more attempt. Records are only written for redeliveries and after a decoder
    crash: writing, renaming and removing a file for every face cost a sixth of a
    saver's CPU, and a first delivery that kills the saver is counted by its
    redelivery (MQTT requires the broker to mark it DUP) all the same; a record
    an earlier life left counts even without DUP. If the folder cannot be written
    the ledger logs once and turns itself off: it must never be what stops faces
    from being stored.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.enabled = True
        self._written: set[str] = set()  # digests this life has a record for; set.add/discard are atomic
        # records left by earlier lives: a message the broker hands over again without DUP (after its own
        # restart, or to another member of the shared subscription) still counts what they saw
        self.inherited: set[str] = set()
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._expire()
            self.inherited = {path.name for path in self.folder.iterdir() if not path.name.startswith(".")}
        except OSError as error:
            self._disable(error)

    def attempt(self, digest: str, floor: int = 0) -> int:
        """Record one more attempt at the message; return how many there have been, this one included.

        ``floor``: attempts the caller knows of even without a record (a redelivered message's first
        delivery, which wrote none; a decoder crash of this life). The record says at least that many
        came before this one.
        """
        if not self.enabled:
            return floor + 1
        path = self.folder / digest
        try:
            previous = int(path.read_text() or 0)
        except (OSError, ValueError):
            previous = 0
        attempts = max(previous, floor) + 1
        try:
            tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(str(attempts))
            os.replace(tmp, path)
            self._written.add(digest)
            self.inherited.discard(digest)
        except OSError as error:
            self._disable(error)
        return attempts

    def attempts(self, digest: str) -> int:
        if not self.enabled:
            return 0
        try:
            return int((self.folder / digest).read_text() or 0)
        except (OSError, ValueError):
            return 0

    def holds_records(self) -> bool:
        """Whether a record not yet cleared may exist (usually not: a first delivery writes none)."""
        return bool(self._written or self.inherited)

    def clear(self, digest: str) -> None:
        """Remove the message's record, if this life wrote it or found it at start (else there is none)."""
        if not self.enabled or (digest not in self._written and digest not in self.inherited):
            return
        self._written.discard(digest)
        self.inherited.discard(digest)
        try:
            (self.folder / digest).unlink(missing_ok=True)
        except OSError as error:
            self._disable(error)

    def _expire(self) -> None:
        cutoff = time.time() - LEDGER_MAX_AGE
        for path in self.folder.iterdir():
            try:
                if path.stat().st_mtime < cutoff or path.name.startswith("."):
                    path.unlink()
            except OSError:
                pass

    def _disable(self, error: OSError) -> None:
        if self.enabled:
            log.error("cannot keep attempt records in %s (%s); messages that crash the saver will not be "
                      "recognised", self.folder, error)
        self.enabled = False


class SoloGate:
    """Lets many messages through their risky step together, or one suspect message alone.

    When the saver dies, every message in its risky step at that moment looks
    guilty to the attempt records: the one that killed it and the innocent ones
    checked beside it. A redelivered message (a suspect) therefore waits until no
    other message is in its risky step and keeps the others out meanwhile, so a
    crash it causes is charged to it alone. Redeliveries are rare (a reconnect, a
    restart), so first deliveries, the common case, share the gate.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0  # messages in their risky step together
        self._solo = False  # a suspect is in its risky step
        self._waiting = 0  # suspects waiting for the others to leave

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._solo or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared and self._waiting:
                    self._cond.notify_all()

    @contextmanager
    def solo(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._solo or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._solo = True
        try:
            yield
        finally:
            with self._cond:
                self._solo = False
                self._cond.notify_all()


@dataclass
class _DeviceDay:
    messages: int = 0
    bytes: int = 0
    tokens: float = 0.0
    refilled: float = 0.0
    over: str = ""


@dataclass
class QuarantineQuota:
    """Admits or refuses one quarantine copy, by device, per UTC day, and at a sustained rate.

    ``max_messages`` / ``max_bytes`` per device and day; ``rate`` copies per
    second per device with bursts of ``burst``; ``total_bytes`` per day for all
    devices together. Zero turns a limit off. Thread-safe.
    """

    max_messages: int
    max_bytes: int
    rate: float
    burst: int
    total_bytes: int
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    _day: str = ""
    _devices: dict[str, _DeviceDay] = field(default_factory=dict)
    _total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, device: str, size: int) -> str:
        """'' if a copy of ``size`` bytes from ``device`` may be kept (and charge it), else why not."""
        with self._lock:
            self._roll_day()
            if device not in self._devices and len(self._devices) >= MAX_TRACKED_DEVICES:
                device = OTHER_DEVICES
            now = self.clock()
            day = self._devices.setdefault(device, _DeviceDay(tokens=float(self.burst), refilled=now))
            if self.rate:
                day.tokens = min(float(self.burst), day.tokens + (now - day.refilled) * self.rate)
                day.refilled = now
            refusal = ""
            if self.total_bytes and self._total + size > self.total_bytes:
                refusal = f"the daily quarantine budget of {self.total_bytes} bytes for all devices is used up"
            elif self.max_messages and day.messages >= self.max_messages:
                refusal = f"device reached its daily quarantine quota of {self.max_messages} messages"
            elif self.max_bytes and day.bytes + size > self.max_bytes:
                refusal = f"device reached its daily quarantine quota of {self.max_bytes} bytes"
            elif self.rate and day.tokens < 1.0:
                refusal = f"device exceeds the quarantine rate of {self.rate:g}/s (burst {self.burst})"
            if refusal:
                day.over = refusal
                return refusal
            day.messages += 1
            day.bytes += size
            if self.rate:
                day.tokens -= 1.0
            self._total += size
            return ""

    def state(self) -> dict[str, Any]:
        """Today's use: devices over a quota and whether the all-devices budget is used up."""
        with self._lock:
            self._roll_day()
            over = sum(1 for d in self._devices.values()
                       if (self.max_messages and d.messages >= self.max_messages)
                       or (self.max_bytes and d.bytes >= self.max_bytes))
            full = bool(self.total_bytes) and self._total >= self.total_bytes * 0.99
            return {"devices_over_quota": over, "total_bytes": self._total, "full": full}

    def _roll_day(self) -> None:
        today = datetime.fromtimestamp(self.wall(), tz=timezone.utc).strftime("%Y-%m-%d")
        if today != self._day:
            self._day = today
            self._devices.clear()
            self._total = 0


class DropLog:
    """Logs drops of one kind: the first at once, then one summary per ``interval`` while they go on."""

    def __init__(self, logger: logging.Logger, what: str, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.what = what
        self.interval = interval
        self.clock = clock
        self._pending: Counter[str] = Counter()
        self._last = float("-inf")
        self._lock = threading.Lock()

    def note(self, reason: str) -> None:
        with self._lock:
            self._pending[reason] += 1
            now = self.clock()
            if now - self._last < self.interval:
                return
            self._last = now
            pending, self._pending = self._pending, Counter()
        self._emit(pending)

    def flush(self, force: bool = False) -> None:
        """Log what was dropped since the last line if an interval has passed (or ``force``: at exit)."""
        with self._lock:
            if not self._pending or (not force and self.clock() - self._last < self.interval):
                return
            self._last = self.clock()
            pending, self._pending = self._pending, Counter()
        self._emit(pending)

    def _emit(self, pending: Counter[str]) -> None:
        total = sum(pending.values())
        reasons = "; ".join(f"{count}x {reason}" for reason, count in pending.most_common(5))
        more = f"; and {len(pending) - 5} other reasons" if len(pending) > 5 else ""
        self.logger.warning("dropped %d %s (%s%s); the next report comes in %.0fs at the earliest",
                            total, self.what, reasons, more, self.interval)


class FailureClock:
    """Since when something has been failing (monotonic), for a ``*_failing_since`` gauge."""

    def __init__(self):
        self._since: float | None = None
        self._lock = threading.Lock()

    def failed(self) -> None:
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()

    def succeeded(self) -> None:
        with self._lock:
            self._since = None

    def failing_for(self) -> float | None:
        since = self._since
        return None if since is None else time.monotonic() - since

    def wall_since(self) -> float | None:
        """The wall-clock start of the current failure, derived afresh (a clock step moves it along)."""
        seconds = self.failing_for()
        return None if seconds is None else round(time.time() - seconds, 3)
