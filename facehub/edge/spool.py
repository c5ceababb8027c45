"""The forwarder's durable store-and-forward spool: SQLite in WAL mode.

Every message the forwarder takes from the edge broker is written here before
the edge broker gets its acknowledgement, and removed only after the cloud
broker acknowledged it. So the spool, not memory, is the truth about what is
still owed to the cloud: after a crash or ``kill -9`` every entry in the file
is sent again (at-least-once; the saver stores idempotently by face id).

Durability (``forwarder.fsync``) is one SQLite setting, chosen explicitly:

* ``full``: ``synchronous=FULL``. Each commit fsyncs the write-ahead log, so an
  entry survives a power cut once :meth:`Spool.put_many` returns. Costs one
  fsync per batch; the forwarder batches whatever arrived meanwhile.
* ``normal``: ``synchronous=NORMAL``. Survives a crash or ``kill -9`` of the
  process (the data is in the OS page cache), but the last commits can be lost
  on power loss. Much faster on slow disks.
* ``off``: ``synchronous=OFF``. No fsync at all; for tests and throwaway setups.

Deleting a delivered entry is committed with ``synchronous=NORMAL`` whatever
the policy: a delete lost to a power cut costs a duplicate, never a face, and
it saves one fsync per batch.

Dead letters: an entry the cloud broker refuses for good (not authorized,
invalid topic or payload) moves to a table of its own after a few tries
(:meth:`Spool.bury`), so it no longer holds up the faces behind it; it stays
there, bounded and counted, for an operator to read with the sqlite3 shell.

Limits: ``max_messages``, ``max_bytes`` and ``max_age``. When a new entry does
not fit, the oldest entries that are not in flight are dropped (drop-oldest:
the newest faces are the most useful); entries older than ``max_age`` are
dropped by :meth:`Spool.expire`. Both are counted, returned to the caller and
logged, never silent. Entries in flight (handed to the cloud client, PUBACK
pending) are never dropped, so the spool may exceed a limit by at most the
in-flight window.

"In flight" lives in memory only: a fresh :class:`Spool` (after a restart)
treats every stored entry as pending, which is what makes unacknowledged
entries go out again after a crash.

One SQLite connection, guarded by a lock, serves all threads.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from paho.mqtt.properties import Properties

from facehub.config import ForwarderConfig
from facehub.edge.properties import unpack_properties

log = logging.getLogger(__name__)

SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
DROP_LOG_INTERVAL = 10.0

# Small columns first: SQLite reads a row's columns in order, and the payload
# usually spills into overflow pages that scans of id/size need not touch.
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received REAL NOT NULL,
    size INTEGER NOT NULL,
    qos INTEGER NOT NULL,
    topic TEXT NOT NULL,
    properties TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    received REAL NOT NULL,
    size INTEGER NOT NULL,
    qos INTEGER NOT NULL,
    topic TEXT NOT NULL,
    properties TEXT NOT NULL,
    payload BLOB NOT NULL,
    buried REAL NOT NULL,
    reason TEXT NOT NULL
);
"""

class SpoolError(RuntimeError):
    """The spool file cannot be opened or written."""


@dataclass(frozen=True)
class Record:
    """A message to store: what the forwarder received from the edge broker."""

    topic: str
    payload: bytes
    properties: str = "{}"
    qos: int = 1
    received: float | None = None


@dataclass(frozen=True)
class Entry:
    """A stored message, as handed to the sender."""

    id: int
    topic: str
    payload: bytes
    properties: str
    qos: int
    received: float

    def mqtt_properties(self) -> Properties:
        return unpack_properties(self.properties)


@dataclass(frozen=True)
class PutResult:
    """What :meth:`Spool.put_many` did: one id per record (None = rejected) and drops."""

    ids: list[int | None]
    dropped: int
    rejected: int


def entry_size(record: Record) -> int:
    """What an entry counts against ``max_bytes``: topic, properties and payload."""
    return len(record.payload) + len(record.topic.encode()) + len(record.properties.encode())


class Spool:
    """A durable FIFO of MQTT messages with in-flight tracking and limits."""

    def __init__(self, path: str | Path, max_messages: int = 100_000, max_bytes: int = 1_000_000_000,
                 max_age: float = 7 * 86400.0, fsync: str = "full",
                 clock: Callable[[], float] = time.time):
        if fsync not in SYNCHRONOUS:
            raise ValueError(f"fsync must be one of {sorted(SYNCHRONOUS)}, got {fsync!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync = fsync
        self._clock = clock
        self._lock = threading.RLock()
        self._in_flight: set[int] = set()
        self._cursor = 0  # every id <= cursor is in flight, acknowledged or dropped
        self._drop_log = _DropLog()
        self.dropped_total = 0
        self.expired_total = 0
        self._db = self._open()
        self._recount()
        if self._count:
            log.info("spool %s: %d entries (%d bytes) pending from before, sending them again",
                     self.path, self._count, self._bytes)

    def sqlite_settings(self) -> dict[str, object]:
        """The SQLite settings in force (``synchronous`` 0-2, ``journal_mode``), to check the fsync policy."""
        with self._lock:
            return {"synchronous": self._db.execute("PRAGMA synchronous").fetchone()[0],
                    "journal_mode": self._db.execute("PRAGMA journal_mode").fetchone()[0]}

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another writer's lock before :class:`SpoolError` (default 30 s)."""
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")

    @classmethod
    def from_config(cls, config: ForwarderConfig) -> "Spool":
        return cls(config.spool_path, max_messages=config.spool_max_messages,
                   max_bytes=config.spool_max_bytes, max_age=config.spool_max_age, fsync=config.fsync)

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise SpoolError(f"spool {self.path}: the filesystem does not support WAL mode ({mode})")
            db.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.fsync]}")
            db.executescript(SCHEMA)
            return db
        except (OSError, sqlite3.Error) as error:
            raise SpoolError(f"cannot open spool {self.path}: {error}") from error

    # -- sizes --------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Entries stored (pending and in flight)."""
        with self._lock:
            return self._count

    @property
    def bytes(self) -> int:
        """Bytes stored (topic + properties + payload of every entry)."""
        with self._lock:
            return self._bytes

    def oldest_received(self) -> float | None:
        """When the oldest stored entry was received (wall clock, as stored), or None when empty."""
        with self._lock:
            if not self._count:
                return None
            row = self._db.execute("SELECT MIN(received) FROM messages").fetchone()
        return row[0] if row else None

    @property
    def dead_letters(self) -> int:
        """Entries set aside for good (the cloud refused them for good), kept for an operator."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    def bury(self, ids: Iterable[int], reason: str, keep: int) -> int:
        """Move entries to the dead letters (out of the way of the faces behind them); how many moved.

        At most ``keep`` dead letters are kept: the oldest beyond that are deleted, and
        counted as drops (``dropped_total``), never silently.
        """
        ids = list(ids)
        if not ids:
            return 0
        now = self._clock()
        with self._lock:
            with self._transaction():
                moved = []
                for entry_id in ids:
                    row = self._db.execute("DELETE FROM messages WHERE id = ? RETURNING id, received, size, qos, "
                                           "topic, properties, payload", (entry_id,)).fetchone()
                    if row:
                        moved.append(row)
                        self._db.execute("INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                         (*row, now, reason))
                excess = self._db.execute(
                    "DELETE FROM dead_letters WHERE id NOT IN (SELECT id FROM dead_letters ORDER BY id DESC LIMIT ?) "
                    "RETURNING id", (keep,)).fetchall()
            self._in_flight.difference_update(ids)
            self._count -= len(moved)
            self._bytes -= sum(row[2] for row in moved)
            if excess:
                self.dropped_total += len(excess)
                self._drop_log.add(len(excess), self)
        return len(moved)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    # -- storing ------------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, properties: str = "{}", qos: int = 1,
            received: float | None = None) -> int | None:
        """Store one message durably; its id, or None when it alone exceeds ``max_bytes``."""
        return self.put_many([Record(topic, payload, properties, qos, received)]).ids[0]

    def put_many(self, records: Sequence[Record]) -> PutResult:
        """Store messages in one transaction: durable (per the fsync policy) on return.

        Makes room by dropping the oldest entries not in flight; a message
        larger than ``max_bytes`` on its own is rejected (counted with the drops).
        """
        ids: list[int | None] = []
        dropped = rejected = 0
        with self._lock, self._transaction():
            for record in records:
                size = entry_size(record)
                if size > self.max_bytes:
                    rejected += 1
                    ids.append(None)
                    log.warning("spool: dropping a message of %d bytes on %r: larger than "
                                "forwarder.spool_max_bytes=%d", size, record.topic[:128], self.max_bytes)
                    continue
                dropped += self._make_room(size)
                received = self._clock() if record.received is None else record.received
                cursor = self._db.execute(
                    "INSERT INTO messages (received, size, qos, topic, properties, payload) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (received, size, record.qos, record.topic, record.properties, record.payload))
                ids.append(cursor.lastrowid)
                self._count += 1
                self._bytes += size
        if dropped:
            self.dropped_total += dropped
            self._drop_log.add(dropped, self)
        self.dropped_total += rejected
        return PutResult(ids, dropped, rejected)

    def _make_room(self, size: int) -> int:
        """Delete oldest entries not in flight until ``size`` more bytes and one more entry fit."""
        dropped = 0
        while self._count + 1 > self.max_messages or self._bytes + size > self.max_bytes:
            victim = self._oldest_not_in_flight()
            if victim is None:
                break  # only in-flight entries left: they leave on PUBACK
            victim_id, victim_size = victim
            self._db.execute("DELETE FROM messages WHERE id = ?", (victim_id,))
            self._count -= 1
            self._bytes -= victim_size
            dropped += 1
        return dropped

    def _oldest_not_in_flight(self) -> tuple[int, int] | None:
        rows = self._db.execute("SELECT id, size FROM messages ORDER BY id LIMIT ?",
                                (len(self._in_flight) + 1,)).fetchall()
        for row in rows:
            if row[0] not in self._in_flight:
                return row
        return None

    # -- sending ------------------------------------------------------------------------------

    def claim(self, limit: int) -> list[Entry]:
        """Up to ``limit`` oldest pending entries, now marked in flight."""
        entries: list[Entry] = []
        with self._lock:
            while len(entries) < limit:
                rows = self._db.execute(
                    "SELECT id, topic, payload, properties, qos, received FROM messages "
                    "WHERE id > ? ORDER BY id LIMIT ?", (self._cursor, limit - len(entries))).fetchall()
                if not rows:
                    break
                for row in rows:
                    self._cursor = row[0]
                    if row[0] not in self._in_flight:
                        self._in_flight.add(row[0])
                        entries.append(Entry(*row))
        return entries

    def release(self, ids: Iterable[int]) -> None:
        """Return in-flight entries to pending (they go out again, in id order)."""
        with self._lock:
            ids = [i for i in ids if i in self._in_flight]
            if ids:
                self._in_flight.difference_update(ids)
                self._cursor = min(self._cursor, min(ids) - 1)

    def release_all(self) -> None:
        with self._lock:
            self.release(list(self._in_flight))

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered entries in one transaction; how many were still stored.

        Not fsynced on its own even with ``fsync=full`` (it rides on the next
        durable commit or checkpoint): a delete lost to a power cut only means
        a duplicate, never a loss, and it halves the fsyncs per message.
        """
        ids = list(ids)
        if not ids:
            return 0
        sizes: list[int] = []
        with self._lock:
            with self._transaction(relaxed=True):
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    marks = ",".join("?" * len(chunk))
                    sizes += [row[0] for row in self._db.execute(
                        f"DELETE FROM messages WHERE id IN ({marks}) RETURNING size", chunk)]
            self._in_flight.difference_update(ids)
            self._count -= len(sizes)
            self._bytes -= sum(sizes)
        return len(sizes)

    def expire(self, now: float | None = None) -> int:
        """Drop entries older than ``max_age`` (not in flight); how many were dropped."""
        cutoff = (self._clock() if now is None else now) - self.max_age
        with self._lock:
            rows = self._db.execute("SELECT id, size FROM messages WHERE received < ?", (cutoff,)).fetchall()
            victims = [(i, s) for i, s in rows if i not in self._in_flight]
            if not victims:
                return 0
            with self._transaction():
                self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i, _ in victims])
            self._count -= len(victims)
            self._bytes -= sum(s for _, s in victims)
            self.expired_total += len(victims)
        log.warning("spool: dropped %d entries older than forwarder.spool_max_age=%ss (%d expired so far)",
                    len(victims), self.max_age, self.expired_total)
        return len(victims)

    # -- plumbing -----------------------------------------------------------------------------

    def _transaction(self, relaxed: bool = False) -> "_Transaction":
        return _Transaction(self, relaxed)

    def _recount(self) -> None:
        """Re-read the sizes after a rolled-back transaction left the counters wrong."""
        self._count, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()

    def log_drops(self) -> None:
        """Log drops not yet reported (called periodically, so the last ones are not silent)."""
        self._drop_log.flush(self)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as error:
                log.debug("spool checkpoint on close failed: %s", error)
            self._db.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT; on error roll back, fix the counters, raise SpoolError.

    ``relaxed`` commits with ``synchronous=NORMAL`` whatever the policy: for
    writes whose loss costs a duplicate rather than a face (deletes).
    """

    def __init__(self, spool: Spool, relaxed: bool = False):
        self.spool = spool
        self.db = spool._db
        self.relax = relaxed and spool.fsync == "full"

    def __enter__(self) -> None:
        try:
            if self.relax:
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            self._restore()
            raise SpoolError(f"spool {self.spool.path}: {error}") from error

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except sqlite3.Error as error:
                    exc = error
            self._rollback()
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"spool {self.spool.path}: {exc}") from exc
        finally:
            self._restore()

    def _rollback(self) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.spool._recount()
        except sqlite3.Error as error:
            log.error("spool %s: rollback failed: %s", self.spool.path, error)

    def _restore(self) -> None:
        if self.relax:
            try:
                self.db.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.spool.fsync]}")
            except sqlite3.Error as error:
                log.error("spool %s: cannot restore synchronous=%s: %s", self.spool.path,
                          SYNCHRONOUS[self.spool.fsync], error)


class _DropLog:
    """Logs spool-full drops at once, then at most every DROP_LOG_INTERVAL seconds, with totals."""

    def __init__(self):
        self._since_log = 0
        self._last = 0.0

    def add(self, dropped: int, spool: Spool) -> None:
        self._since_log += dropped
        if not self._last or time.monotonic() - self._last >= DROP_LOG_INTERVAL:
            self.flush(spool)

    def flush(self, spool: Spool) -> None:
        if not self._since_log:
            return
        log.warning("spool full (max %d entries, %d bytes): dropped the %d oldest entries "
                    "(%d dropped so far)", spool.max_messages, spool.max_bytes, self._since_log,
                    spool.dropped_total)
        self._since_log = 0
        self._last = time.monotonic()
