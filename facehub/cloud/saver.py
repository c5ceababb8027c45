"""The saver: faces from the cloud broker into storage, each acknowledged only once stored.

Flow of one message::

    paho network thread ── on_message ──▶ queue ──▶ worker threads ──▶ storage
                                                                  └──▶ PUBACK, in arrival order

- **Shared subscription** ``$share/<share_group>/<topic_prefix>/#``: several
  savers split the faces between them; each face goes to one of them.
- **Manual acknowledgement.** A QoS 1/2 message is acknowledged only after its
  object is durably written (or its quarantine copy is), and acknowledgements
  leave in the order the messages arrived, as MQTT requires. An ack is only
  sent on the connection that delivered the message: after a reconnect the
  broker redelivers unacknowledged messages itself, and the idempotent store
  turns the second copy into a counted duplicate.
- **Persistent session** with a stable client id (``facehub-<instance name>``,
  e.g. ``facehub-saver-1``; ``cloud.client_id`` replaces the ``facehub`` part to
  keep ids unique across hosts), so faces queued while a saver restarts are
  delivered to it when it is back. With ``cloud.username = "{client_id}"`` each
  instance logs in with its own account named after that id (the cloud broker
  binds every account to one client id; see :func:`facehub.mqtt.make_client`).
- **Backpressure.** When storage fails the workers retry with exponential
  backoff (``retry_min``..``retry_max``), counting ``store_errors``, and stop
  acknowledging; the broker stops sending once ``inflight`` messages are
  unacknowledged (MQTT v5 Receive Maximum) and keeps the rest queued. Nothing
  is dropped. Storage work runs off paho's network thread, so keepalives go on.
  An outage is logged twice, however long it lasts and however many workers
  retry: one WARNING with the reason when storage starts failing, one when it
  is back ("storage ... back after 37 failures in 12.3s"); each retry is DEBUG.
- **Heartbeat.** The main loop beats while workers make progress, including
  while they back off between retries; a single storage call that has hung for
  ``stuck_after`` seconds stops the heartbeat so the supervisor restarts us.
- **Bad input** (not a face, not a decodable image, bad properties, odd topic)
  is logged in one line with the reason, counted ``rejected``, kept under the
  quarantine prefix (``quarantined``) and then acknowledged. Payloads larger
  than ``max_bytes`` are counted ``rejected`` and ``oversize`` and dropped.

Defences against a compromised or broken device (docs/security.md):

- **Images are judged by their headers first** (``facehub.cloud.images``): a
  declared size over ``max_pixels`` is refused (``bombs``) before any decoder
  sees it; then the image must decode cleanly, without even a warning, in a
  separate memory-capped decoder process (``facehub.cloud.decoder``).
- **A poison message never loops**: a redelivered message's attempts (its
  first delivery included) are recorded in the state folder before the risky
  steps (validation and decoding) and cleared after, and so are a decoder
  crash's; a message that has crashed or timed out the saver or its decoder
  ``max_attempts`` times is quarantined without its payload (``poison``) and
  acknowledged, in this life of the saver or the next.
- **Retained messages are refused** (``retained``): the subscription asks for
  no retained messages (Retain Handling 2) and to see the retain flag as
  published, and a message carrying it is quarantined once, never stored.
- **Bounds**: at most ``queue_size`` messages and ``queue_bytes`` bytes wait
  in memory; QoS 0 messages beyond that are dropped (``dropped_qos0``), QoS 1/2
  are already bounded by ``inflight``. Quarantine copies are bounded per device
  per day, by rate, for all devices per day, and by the free space of a folder
  store; copies beyond are dropped (``quarantine_dropped``) and logged once per
  minute, never per message. A quarantine write that keeps failing is given up
  (``quarantine_dropped``) rather than blocking the faces behind it.

Counters: ``stored``, ``duplicates``, ``rejected``, ``quarantined``,
``oversize``, ``store_errors``, ``bombs``, ``poison``, ``decoder_crashes``,
``retained``, ``dropped_qos0``, ``quarantine_dropped``; gauges ``queue_depth``,
``queue_bytes``, ``unacked``, ``subscribed``, ``decoder_pids``, ``quarantine_full``
(the all-devices budget is used up, a folder store's volume has no room for the
largest message above its reserve, or quarantine writes fail),
``quarantine_devices_over_quota``,
``quarantine_failing_since``, ``store_failing_since`` and ``decoder_failing_since``
(wall-clock start of the current failure, null while things work; the last one
when no decoder process can be started, and faces wait with the broker as in a
storage outage), ``cloud_down_since`` (wall-clock time the broker went out of
reach, null while connected) and ``oldest_unacked_age`` (seconds the oldest
message received but not yet stored and acknowledged has waited); these follow
the convention of ``facehub health --delivery`` (facehub/process/health.py).
``latency_ms`` (capture to stored) percentiles.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from paho.mqtt.subscribeoptions import SubscribeOptions

from facehub import mqtt
from facehub.backoff import Backoff
from facehub.config import Config
from facehub.messages import InvalidFace, parse
from facehub.runtime import Runtime
from facehub.cloud.decoder import DecoderCrashed, DecoderPool, DecodeRefused, DecoderUnavailable
from facehub.cloud.guards import (DropLog, FailureClock, PoisonLedger, QuarantineQuota, SoloGate,
                                  message_digest)
from facehub.cloud.images import ImageBomb, ImageInfo, check_header
from facehub.cloud.storage import Store, open_store

log = logging.getLogger(__name__)

QUARANTINE_TRIES = 3  # writes of one quarantine copy before it is given up (it must not block the faces)
DROP_LOG_INTERVAL = 60.0  # seconds between two log lines about dropped messages or copies
RETAINED_REMEMBERED = 10_000  # retained messages remembered, so a repeat is not quarantined again
INVALID_DEVICE = "(invalid device ids)"
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RETRY_JITTER = 0.2  # storage retry delays are shortened by up to this fraction, so workers do not retry in step


class Stopped(Exception):
    """Raised inside a worker when the saver is stopping mid-retry."""


@dataclass
class Inbound:
    """One message between arrival and acknowledgement."""

    topic: str
    payload: bytes
    properties: Any
    mid: int
    qos: int
    connection: int
    received_ms: int
    done: bool = False
    retain: bool = False
    dup: bool = False  # the broker delivered it before (MQTT sets DUP on every redelivery)
    oversize: int = 0  # size of a payload over max_bytes, dropped on arrival (the payload is then b"")
    arrived: float = field(default_factory=time.monotonic)

    @functools.cached_property
    def digest(self) -> str:
        """The message's sha256 (:func:`message_digest`), computed only when needed: a redelivery, a
        retained message, a decoder crash. A face seen once never needs it."""
        return message_digest(self.topic, self.payload, self.properties)


def check_image(content_type: str, data: bytes, max_pixels: int, decoders: DecoderPool) -> ImageInfo:
    """Raise :class:`InvalidFace` unless ``data`` is a complete image of at most ``max_pixels``.

    The header is read first, without decoding (:func:`facehub.cloud.images.check_header`):
    a bomb is refused as :class:`ImageBomb` before any decoder allocates for it.
    Then the image is decoded in a decoder process (``decoders``) and must decode
    without an error or a warning, to the size its header declared. A decoder
    that dies or is late raises :class:`DecoderCrashed` for the caller to count.
    """
    info = check_header(content_type, data, max_pixels)
    try:
        decoded = decoders.decode(content_type, data)
    except DecodeRefused as refused:
        raise InvalidFace(f"{info.format} does not decode cleanly: {refused.reason}") from None
    expected = (-(-info.width // 8), -(-info.height // 8)) if info.format == "JPEG" else (info.width, info.height)
    if (decoded.width, decoded.height) != expected:
        raise InvalidFace(f"{info.format} decodes to {decoded.width}x{decoded.height}, not the "
                          f"{expected[0]}x{expected[1]} its header declares")
    return info


class AckQueue:
    """Acknowledges messages in arrival order, each once it is done.

    ``add`` runs on paho's network thread, ``done`` on workers. Messages that
    arrived on an earlier connection are not acknowledged on a later one: the
    broker redelivers them and the packet id may have been reused meanwhile.
    """

    def __init__(self, client):
        self.client = client
        self.connection = 0
        self._pending: collections.deque[Inbound] = collections.deque()
        self._lock = threading.Lock()

    def new_connection(self) -> None:
        with self._lock:
            self.connection += 1

    def add(self, message: Inbound) -> None:
        with self._lock:
            self._pending.append(message)

    def done(self, message: Inbound) -> None:
        with self._lock:
            message.done = True
            while self._pending and self._pending[0].done:
                head = self._pending.popleft()
                if head.qos > 0 and head.connection == self.connection:
                    self.client.ack(head.mid, head.qos)

    def __len__(self) -> int:
        return len(self._pending)

    def oldest_age(self) -> float | None:
        """Seconds the oldest message not yet acknowledged has waited; None when there is none."""
        with self._lock:
            oldest = self._pending[0].arrived if self._pending else None
        return None if oldest is None else time.monotonic() - oldest


class StorageOutage:
    """Since when face writes have been failing, logged once when they start failing and once when they are back.

    Several workers call the store at once, so results arrive out of order: a
    write that started before storage came back may fail after another one has
    succeeded. Each result is therefore judged by when its call *started*: only
    a result newer than the newest one seen so far changes the state. Every
    failure during an outage is counted, whichever call it came from.
    """

    def __init__(self, describe: str):
        self.describe = describe
        self.failing_since: float | None = None  # monotonic
        self.failures = 0
        self._newest = float("-inf")
        self._lock = threading.Lock()

    def failed(self, started: float, reason: str) -> None:
        with self._lock:
            if self.failing_since is not None:
                self.failures += 1
            if started < self._newest:
                return
            self._newest = started
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                self.failures = 1
                log.warning("storage %s failing: %s; retrying with backoff, faces stay unacknowledged with "
                            "the broker meanwhile", self.describe, reason)

    def succeeded(self, started: float) -> None:
        with self._lock:
            if started < self._newest:
                return
            self._newest = started
            if self.failing_since is not None:
                log.warning("storage %s back after %d failures in %.1fs", self.describe, self.failures,
                            time.monotonic() - self.failing_since)
                self.failing_since = None
                self.failures = 0

    def failing_for(self) -> float | None:
        """Seconds since the current outage began; None when storage works."""
        since = self.failing_since
        return None if since is None else time.monotonic() - since

    def wall_since(self) -> float | None:
        """The wall-clock start of the current outage, derived afresh (a clock step moves it along)."""
        seconds = self.failing_for()
        return None if seconds is None else round(time.time() - seconds, 3)


class Saver:
    """The storage side: validates, stores or quarantines, then marks each message done."""

    def __init__(self, config: Config, runtime: Runtime, store: Store, acks: AckQueue | None = None,
                 decoders: DecoderPool | None = None):
        self.config = config
        self.saver = config.saver
        self.runtime = runtime
        self.store = store
        self.acks = acks
        self.queue: queue.Queue[Inbound] = queue.Queue()
        self.queued_bytes = 0
        self._queued_lock = threading.Lock()
        self.decoders = decoders or DecoderPool(self.saver.decoders, self.saver.decode_memory,
                                                self.saver.decode_timeout)
        self.ledger = PoisonLedger(Path(config.supervisor.state_dir) / "saver-attempts")
        self.gate = SoloGate()
        self.max_attempts = self.saver.max_attempts
        restarts = config.supervisor.max_restarts
        if restarts and self.max_attempts > restarts:
            # The supervisor would give up on the saver before the attempt records set the message aside.
            log.info("saver.max_attempts %d lowered to supervisor.max_restarts %d", self.max_attempts, restarts)
            self.max_attempts = restarts
        self.quota = QuarantineQuota(self.saver.quarantine_max_messages, self.saver.quarantine_max_bytes,
                                     self.saver.quarantine_rate, self.saver.quarantine_burst,
                                     self.saver.quarantine_total_bytes)
        self.quarantine_drops = DropLog(log, "quarantine copies of rejected messages", DROP_LOG_INTERVAL)
        self.qos0_drops = DropLog(log, "QoS 0 messages (in-memory queue full)", DROP_LOG_INTERVAL)
        self.store_failing = StorageOutage(store.describe())  # face writes
        self.decoder_failing = FailureClock()  # no decoder can be started
        self._answers_at_failure = 0
        self.quarantine_writes_failing = FailureClock()  # quarantine writes
        self.quarantine_full = FailureClock()  # no room: budget used up, volume at its reserve, or writes failing
        self._retained: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._retained_lock = threading.Lock()
        self.reserved_device = self.saver.quarantine_prefix.strip("/").split("/")[0]
        self.stuck_after = max(60.0, 6 * self.saver.timeout)
        self.stopping = threading.Event()
        self._busy: dict[int, float] = {}
        self._busy_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- workers -------------------------------------------------------------

    def start_workers(self) -> None:
        for number in range(self.saver.workers):
            thread = threading.Thread(target=self._work, name=f"{self.runtime.name}-store-{number + 1}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_workers(self, timeout: float) -> None:
        """Let each worker finish its current call (acknowledging it), then stop the decoders and return."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.decoders.close()
        self.quarantine_drops.flush(force=True)
        self.qos0_drops.flush(force=True)

    def admit(self, message: Inbound) -> bool:
        """Reserve room in the in-memory queue; False (drop it) for a QoS 0 message when full.

        QoS 1/2 messages are always admitted: the broker sends at most
        ``inflight`` of them unacknowledged (Receive Maximum), and dropping one
        would lose a face the broker thinks is safe.
        """
        size = len(message.payload)
        with self._queued_lock:
            if message.qos == 0 and (self.queue.qsize() >= self.saver.queue_size
                                     or self.queued_bytes + size > self.saver.queue_bytes):
                return False
            self.queued_bytes += size
        return True

    def workers_alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def stuck_for(self) -> float:
        """Seconds the oldest storage call has been running, if beyond ``stuck_after``; else 0."""
        now = time.monotonic()
        with self._busy_lock:
            oldest = min(self._busy.values(), default=now)
        return now - oldest if now - oldest > self.stuck_after else 0.0

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                message = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._queued_lock:
                self.queued_bytes -= len(message.payload)
            try:
                self.handle(message)
            except Stopped:
                return  # not stored: left unacknowledged for the broker to redeliver
            if self.acks is not None:
                self.acks.done(message)
            else:
                message.done = True

    # -- one message ---------------------------------------------------------

    def handle(self, message: Inbound) -> None:
        """Store the face in ``message``, or quarantine or drop it; raise only :class:`Stopped`."""
        topic = message.topic
        size = message.oversize or len(message.payload)
        if size > self.saver.max_bytes:
            log.warning("dropped oversize message on %r: %d bytes exceeds limit of %d",
                        topic[:128], size, self.saver.max_bytes)
            self.runtime.count("rejected")
            self.runtime.count("oversize")
            return
        if message.retain:
            self._reject_retained(message)
            return
        try:
            face = self._checked(message)
        except InvalidFace as error:
            if isinstance(error, ImageBomb):
                self.runtime.count("bombs")
            self._reject(message, error.reason, keep_payload=error.keep_payload)
            return
        except Stopped:
            raise
        except Exception as error:  # a bug in validation must not crash-loop on one message
            log.exception("unexpected error validating message on %r", topic[:128])
            self._reject(message, f"unexpected validation error: {type(error).__name__}: {error}",
                         keep_payload=False)
            return
        if self._retry(lambda: self.store.put_face(face), f"face {face.face_id} from {face.device_id}"):
            self.runtime.count("stored")
            self.runtime.observe("latency_ms", time.time() * 1000 - face.captured_ms)
            log.debug("stored face %s from %s", face.face_id, face.device_id)
        else:
            self.runtime.count("duplicates")
            log.info("face %s from %s already stored (redelivery)", face.face_id, face.device_id)

    def _checked(self, message: Inbound):
        """The validated face, its attempt recorded around the risky step; raise :class:`InvalidFace`.

        A redelivered message goes through its risky step alone (:class:`SoloGate`): if the saver
        dies then, the crash is charged to that message only, not to the faces beside it.
        """
        with self.gate.solo() if message.dup else self.gate.shared():
            attempts = self._attempt_number(message)
            try:
                if attempts > self.max_attempts:
                    self.runtime.count("poison")
                    raise InvalidFace(f"a saver or its decoder crashed or timed out on this message "
                                      f"{attempts - 1} times; not tried again", keep_payload=False)
                face = self._validate(message, attempts)
            except Stopped:
                raise  # not an attempt that ended: the record stays for the next life
            except Exception:
                self._clear_record(message)
                raise
            self._clear_record(message)
            return face

    def _clear_record(self, message: Inbound) -> None:
        if self.ledger.holds_records():  # usually none: then the digest is not even computed
            self.ledger.clear(message.digest)

    def _attempt_number(self, message: Inbound) -> int:
        """Which attempt at ``message`` this is, recorded on disk (cleared once validated) if it is a redelivery.

        A first delivery writes no record: if it kills the saver, the broker redelivers it, marked DUP,
        and the redelivery counts that first delivery as an attempt (``floor=1``) before trying again.
        So a message that kills every life is still set aside after ``max_attempts`` lives, and the
        common case, a face seen once, costs no file operations.
        """
        if message.dup:
            return self.ledger.attempt(message.digest, floor=1)
        if self.ledger.inherited and message.digest in self.ledger.inherited:
            # an earlier life left a record but the broker did not mark it DUP (a broker restart, or a
            # broker that hands a shared-subscription message to another saver): count what it saw
            return self.ledger.attempt(message.digest)
        return 1

    def _validate(self, message: Inbound, attempts: int = 1):
        """The face in the message, or :class:`InvalidFace`; decoder crashes count as attempts."""
        face = parse(message.topic, message.payload, message.properties, self.saver.max_bytes,
                     self.config.topic_prefix)
        if face.device_id == self.reserved_device:
            raise InvalidFace(f"device id {face.device_id!r} is reserved for the quarantine prefix")
        backoff = Backoff(self.saver.retry_min, self.saver.retry_max, jitter=RETRY_JITTER)
        while True:
            try:
                check_image(face.content_type, face.image, self.saver.max_pixels, self.decoders)
                return face
            except DecoderUnavailable as unavailable:
                # Not this message's fault: wait like for storage, the broker keeps the rest meanwhile.
                if self.stopping.is_set():
                    raise Stopped() from None
                if self.decoder_failing.failing_for() is None:
                    log.error("no image decoder: %s; retrying with backoff, faces stay unacknowledged with "
                              "the broker meanwhile", unavailable.reason)
                self.decoder_failing.failed()
                self._answers_at_failure = getattr(self.decoders, "answers", 0)
                self.runtime.count("decoder_unavailable")
                if self.stopping.wait(backoff.next()):
                    raise Stopped() from None
            except DecoderCrashed as crash:
                if self.stopping.is_set():
                    raise Stopped() from None  # shutting down, not a crash
                self.runtime.count("decoder_crashes")
                attempts = self.ledger.attempt(message.digest, floor=attempts)
                log.warning("decoding a message on %r failed: %s (attempt %d of %d)", message.topic[:128],
                            crash.reason, attempts - 1, self.max_attempts)
                if attempts > self.max_attempts:
                    self.runtime.count("poison")
                    raise InvalidFace(f"crashed or timed out the image decoder {attempts - 1} times "
                                      f"(last: {crash.reason})", keep_payload=False) from None

    def _reject_retained(self, message: Inbound) -> None:
        """A retained message on a faces topic: refused, quarantined the first time it is seen."""
        self.runtime.count("retained")
        digest = message.digest
        with self._retained_lock:
            seen = digest in self._retained
            self._retained[digest] = None
            self._retained.move_to_end(digest)
            while len(self._retained) > RETAINED_REMEMBERED:
                self._retained.popitem(last=False)
        if seen:
            self.runtime.count("rejected")
            log.debug("retained message on %r seen again; already quarantined", message.topic[:128])
            return
        self._reject(message, "retained message on a faces topic (faces are never published retained)")

    def _reject(self, message: Inbound, reason: str, keep_payload: bool = True) -> None:
        """Count a rejected message and keep a copy under the quarantine prefix, within its bounds."""
        self.runtime.count("rejected")
        entry = self.store.quarantine_entry(message.topic, message.payload, reason, message.properties,
                                            message.received_ms, keep_payload)
        device = self.quarantine_device(message.topic)
        refusal = self.store.room_for_quarantine(entry.size) or self.quota.admit(device, entry.size)
        if refusal:
            self.runtime.count("quarantine_dropped")
            self.quarantine_drops.note(f"{device}: {refusal}")
            return
        log.warning("rejected message on %r (%d bytes): %s", message.topic[:128], len(message.payload), reason)
        what = f"quarantine copy of a message on {message.topic[:64]!r}"
        for attempt in range(1, QUARANTINE_TRIES + 1):
            if self.stopping.is_set():
                raise Stopped()
            try:
                self.store.put_quarantine_entry(entry)
            except Exception as error:
                self.runtime.count("store_errors")
                self.quarantine_writes_failing.failed()
                first_line = str(error).splitlines()[0][:200] if str(error) else ""
                if attempt == QUARANTINE_TRIES:
                    self.runtime.count("quarantine_dropped")
                    self.quarantine_drops.note(f"write failed: {type(error).__name__}: {first_line}")
                    return
                log.debug("cannot write %s: %s: %s; retrying", what, type(error).__name__, first_line)
                if self.stopping.wait(self.saver.retry_min * attempt * random.uniform(0.8, 1.2)):
                    raise Stopped()
                continue
            self.quarantine_writes_failing.succeeded()
            self.runtime.count("quarantined")
            return

    def quarantine_device(self, topic: str) -> str:
        """Whom a quarantine copy is charged to: the topic's device id, or one shared bucket if invalid."""
        head = self.config.topic_prefix + "/"
        device = topic[len(head):].split("/", 1)[0] if topic.startswith(head) else ""
        return device if _DEVICE.fullmatch(device) and device != self.reserved_device else INVALID_DEVICE

    def report(self, connection: mqtt.ConnectionState | None = None) -> None:
        """Gauges for the stats file (and ``facehub health``), and any due drop summaries."""
        quota = self.quota.state()
        # Full: the all-devices budget is used up, the volume has no room for the largest message
        # above its reserve, or quarantine writes fail.
        full = bool(quota["full"] or self.store.room_for_quarantine(self.saver.max_bytes)
                    or self.quarantine_writes_failing.failing_for() is not None)
        if full:
            self.quarantine_full.failed()
        else:
            self.quarantine_full.succeeded()
        self.runtime.gauge("queue_depth", self.queue.qsize())
        self.runtime.gauge("queue_bytes", self.queued_bytes)
        self.runtime.gauge("unacked", len(self.acks) if self.acks is not None else 0)
        self.runtime.gauge("decoder_pids", self.decoders.pids())
        self.runtime.gauge("quarantine_full", full)
        self.runtime.gauge("quarantine_devices_over_quota", quota["devices_over_quota"])
        self.runtime.gauge("quarantine_failing_since", self.quarantine_full.wall_since())
        self.runtime.gauge("store_failing_since", self.store_failing.wall_since())
        if connection is not None:
            self.runtime.gauge_since("cloud_down_since", connection.down_for())
        oldest = self.acks.oldest_age() if self.acks is not None else None
        self.runtime.gauge("oldest_unacked_age", None if oldest is None else round(oldest, 3))
        failing = self.decoder_failing.failing_for()
        if failing is not None and getattr(self.decoders, "answers", 0) > self._answers_at_failure:
            log.warning("image decoder back after %.1fs", failing)
            self.decoder_failing.succeeded()
        self.runtime.gauge("decoder_failing_since", self.decoder_failing.wall_since())
        self.quarantine_drops.flush()
        self.qos0_drops.flush()

    def _retry(self, action: Callable[[], bool], what: str) -> bool:
        """Run ``action`` until it succeeds, backing off; raise :class:`Stopped` on shutdown."""
        backoff = Backoff(self.saver.retry_min, self.saver.retry_max, jitter=RETRY_JITTER)
        key = threading.get_ident()
        while True:
            started = time.monotonic()
            with self._busy_lock:
                self._busy[key] = started
            try:
                result = action()
            except Exception as error:
                self.runtime.count("store_errors")
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                self.store_failing.failed(started, reason)
                delay = backoff.next()
                log.debug("cannot store %s in %s: %s; retrying in %.1fs", what, self.store.describe(), reason,
                          delay)
            else:
                self.store_failing.succeeded(started)
                return result
            finally:
                with self._busy_lock:
                    self._busy.pop(key, None)
            if self.stopping.wait(delay):
                raise Stopped()


def client_id(config: Config, runtime: Runtime) -> str:
    """Stable per instance, so the persistent session survives restarts."""
    return f"{config.cloud.client_id or 'facehub'}-{runtime.name}"


def subscription(config: Config) -> str:
    return f"$share/{config.saver.share_group}/{config.topic_filter}"


def run(config: Config, runtime: Runtime) -> None:
    """Run one saver instance until ``runtime.stop`` is set."""
    store = open_store(config.saver)
    broker = dataclasses.replace(config.cloud, client_id=client_id(config, runtime))
    client = mqtt.make_client(broker, broker.client_id, manual_ack=True)
    acks = AckQueue(client)
    saver = Saver(config, runtime, store, acks)
    topic = subscription(config)

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        acks.new_connection()
        runtime.gauge("subscribed", False)
        # No retained messages at (re)subscription, and the retain flag as published, so a retained
        # face published while we are subscribed is seen as such and refused.
        client.subscribe(topic, options=SubscribeOptions(qos=broker.qos, retainAsPublished=True,
                                                         retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        ok = all(not code.is_failure for code in reason_codes)
        runtime.gauge("subscribed", ok)
        if not ok:
            log.error("cloud broker refused the subscription %s: %s", topic,
                      ", ".join(str(code) for code in reason_codes))

    def on_message(client, userdata, msg):
        try:
            message = Inbound(topic=_topic(msg), payload=msg.payload, properties=msg.properties,
                               mid=msg.mid, qos=msg.qos, connection=acks.connection,
                               received_ms=int(time.time() * 1000), retain=bool(msg.retain),
                               dup=bool(msg.dup))
            if len(message.payload) > config.saver.max_bytes:  # not kept in memory while it waits its turn
                message.oversize, message.payload = len(message.payload), b""
            if not saver.admit(message):
                runtime.count("dropped_qos0")
                saver.qos0_drops.note(f"{saver.saver.queue_size} messages or {saver.saver.queue_bytes} bytes "
                                      "waiting")
                return
            acks.add(message)
            saver.queue.put(message)
        except Exception:  # never let an exception kill paho's network thread
            log.exception("cannot queue a message on %r", getattr(msg, "topic", "?"))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    connection = mqtt.ConnectionState(f"{runtime.name} cloud broker {broker.host}:{broker.port}")
    connection.attach(client)
    log.info("saving %s into %s as %s (workers=%d, inflight=%d)", topic, store.describe(), broker.client_id,
             config.saver.workers, config.saver.inflight)
    saver.start_workers()
    mqtt.start(client, broker, receive_maximum=config.saver.inflight)
    try:
        _watch(saver, runtime, connection)
    finally:
        saver.stop_workers(timeout=config.saver.timeout + 5)
        mqtt.stop(client)
        runtime.flush()


def _watch(saver: Saver, runtime: Runtime, connection: mqtt.ConnectionState | None = None) -> None:
    """Beat while the workers make progress; stop beating when a storage call hangs."""
    warned = False
    while not runtime.stop.is_set():
        if not saver.workers_alive():
            raise RuntimeError("a storage worker thread died; exiting so the supervisor restarts the saver")
        stuck = saver.stuck_for()
        if stuck:
            if not warned:
                log.error("a storage call has been running for %.0fs; withholding the heartbeat so the "
                          "supervisor restarts the saver", stuck)
                warned = True
        else:
            warned = False
            runtime.beat()
        saver.report(connection)
        runtime.wait(0.5)


def _topic(msg) -> str:
    """The topic as text even if a broker let invalid UTF-8 through (then it is rejected)."""
    try:
        return msg.topic
    except UnicodeDecodeError:
        return bytes(msg._topic).decode("utf-8", "replace")
