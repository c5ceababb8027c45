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
  delivered to it when it is back.
- **Backpressure.** When storage fails the workers retry with exponential
  backoff (``retry_min``..``retry_max``), counting ``store_errors``, and stop
  acknowledging; the broker stops sending once ``inflight`` messages are
  unacknowledged (MQTT v5 Receive Maximum) and keeps the rest queued. Nothing
  is dropped. Storage work runs off paho's network thread, so keepalives go on.
- **Heartbeat.** The main loop beats while workers make progress, including
  while they back off between retries; a single storage call that has hung for
  ``stuck_after`` seconds stops the heartbeat so the supervisor restarts us.
- **Bad input** (not a face, not a decodable image, bad properties, odd topic)
  is logged in one line with the reason, counted ``rejected``, kept under the
  quarantine prefix (``quarantined``) and then acknowledged. Payloads larger
  than ``max_bytes`` are counted ``rejected`` and ``oversize`` and dropped.

Counters: ``stored``, ``duplicates``, ``rejected``, ``quarantined``,
``oversize``, ``store_errors``; gauges ``queue_depth``, ``unacked`` and ``subscribed``;
``latency_ms`` (capture to stored) percentiles.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np

from facehub import mqtt
from facehub.config import Config
from facehub.messages import InvalidFace, parse
from facehub.runtime import Runtime
from facehub.cloud.storage import Store, open_store

log = logging.getLogger(__name__)

JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"IEND\xaeB`\x82"
MAX_PIXELS = 50_000_000


class Stopped(Exception):
    """Raised inside a worker when the saver is stopping mid-retry."""


@dataclass
class Received:
    """One message between arrival and acknowledgement."""

    topic: str
    payload: bytes
    properties: Any
    mid: int
    qos: int
    connection: int
    received_ms: int
    done: bool = False


def check_image(content_type: str, data: bytes) -> None:
    """Raise :class:`InvalidFace` unless ``data`` is a complete, decodable image.

    Decoding alone is not enough: some decoders return a grey-padded image for
    a truncated JPEG, so the end marker is checked too. JPEGs are decoded at
    1/8 scale, which reads every byte but bounds memory for huge dimensions.
    """
    flags = cv2.IMREAD_GRAYSCALE
    if content_type == "image/jpeg":
        if not data.rstrip(b"\0\r\n ").endswith(JPEG_EOI):
            raise InvalidFace("JPEG is truncated (no end-of-image marker)")
        flags = cv2.IMREAD_REDUCED_GRAYSCALE_8
    elif content_type == "image/png":
        if not data.endswith(PNG_IEND):
            raise InvalidFace("PNG is truncated (no IEND chunk)")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if width * height > MAX_PIXELS:
            raise InvalidFace(f"PNG of {width}x{height} pixels is too large for a face")
    elif content_type == "image/webp":
        if len(data) < 12 or int.from_bytes(data[4:8], "little") + 8 != len(data) or data[8:12] != b"WEBP":
            raise InvalidFace("WebP is truncated or malformed (RIFF size mismatch)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as error:
        raise InvalidFace(f"{content_type} does not decode: {str(error).strip()[:100]}") from None
    if image is None or image.size == 0:
        raise InvalidFace(f"payload does not decode as {content_type}")


class AckQueue:
    """Acknowledges messages in arrival order, each once it is done.

    ``add`` runs on paho's network thread, ``done`` on workers. Messages that
    arrived on an earlier connection are not acknowledged on a later one: the
    broker redelivers them and the packet id may have been reused meanwhile.
    """

    def __init__(self, client):
        self.client = client
        self.connection = 0
        self._pending: collections.deque[Received] = collections.deque()
        self._lock = threading.Lock()

    def new_connection(self) -> None:
        with self._lock:
            self.connection += 1

    def add(self, message: Received) -> None:
        with self._lock:
            self._pending.append(message)

    def done(self, message: Received) -> None:
        with self._lock:
            message.done = True
            while self._pending and self._pending[0].done:
                head = self._pending.popleft()
                if head.qos > 0 and head.connection == self.connection:
                    self.client.ack(head.mid, head.qos)

    def __len__(self) -> int:
        return len(self._pending)


class Saver:
    """The storage side: validates, stores or quarantines, then marks each message done."""

    def __init__(self, config: Config, runtime: Runtime, store: Store, acks: AckQueue | None = None):
        self.config = config
        self.saver = config.saver
        self.runtime = runtime
        self.store = store
        self.acks = acks
        self.queue: queue.Queue[Received] = queue.Queue()
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
        """Let each worker finish its current call (acknowledging it), then return."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

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
            try:
                self.handle(message)
            except Stopped:
                return  # not stored: left unacknowledged for the broker to redeliver
            if self.acks is not None:
                self.acks.done(message)
            else:
                message.done = True

    # -- one message ---------------------------------------------------------

    def handle(self, message: Received) -> None:
        """Store the face in ``message``, or quarantine or drop it; raise only :class:`Stopped`."""
        topic = message.topic
        if len(message.payload) > self.saver.max_bytes:
            log.warning("dropped oversize message on %r: %d bytes exceeds limit of %d",
                        topic[:128], len(message.payload), self.saver.max_bytes)
            self.runtime.count("rejected")
            self.runtime.count("oversize")
            return
        try:
            face = parse(topic, message.payload, message.properties, self.saver.max_bytes,
                         self.config.topic_prefix)
            if face.device_id == self.reserved_device:
                raise InvalidFace(f"device id {face.device_id!r} is reserved for the quarantine prefix")
            check_image(face.content_type, face.image)
        except InvalidFace as error:
            self._reject(message, error.reason)
            return
        except Exception as error:  # a bug in validation must not crash-loop on one message
            log.exception("unexpected error validating message on %r", topic[:128])
            self._reject(message, f"unexpected validation error: {type(error).__name__}: {error}")
            return
        if self._retry(lambda: self.store.put_face(face), f"face {face.face_id} from {face.device_id}"):
            self.runtime.count("stored")
            self.runtime.observe("latency_ms", time.time() * 1000 - face.captured_ms)
            log.debug("stored face %s from %s", face.face_id, face.device_id)
        else:
            self.runtime.count("duplicates")
            log.info("face %s from %s already stored (redelivery)", face.face_id, face.device_id)

    def _reject(self, message: Received, reason: str) -> None:
        log.warning("rejected message on %r (%d bytes): %s", message.topic[:128], len(message.payload), reason)
        self.runtime.count("rejected")
        self._retry(lambda: self.store.put_quarantine(message.topic, message.payload, reason,
                                                      message.properties, message.received_ms),
                    f"quarantine copy of a message on {message.topic[:64]!r}")
        self.runtime.count("quarantined")

    def _retry(self, action: Callable[[], bool], what: str) -> bool:
        """Run ``action`` until it succeeds, backing off; raise :class:`Stopped` on shutdown."""
        delay = self.saver.retry_min
        key = threading.get_ident()
        while True:
            with self._busy_lock:
                self._busy[key] = time.monotonic()
            try:
                return action()
            except Exception as error:
                self.runtime.count("store_errors")
                log.warning("cannot store %s in %s: %s: %s; retrying in %.1fs", what, self.store.describe(),
                            type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
                            delay)
            finally:
                with self._busy_lock:
                    self._busy.pop(key, None)
            if self.stopping.wait(delay * random.uniform(0.8, 1.2)):
                raise Stopped()
            delay = min(delay * 2, self.saver.retry_max)


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
        client.subscribe(topic, qos=broker.qos)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        ok = all(not code.is_failure for code in reason_codes)
        runtime.gauge("subscribed", ok)
        if not ok:
            log.error("cloud broker refused the subscription %s: %s", topic,
                      ", ".join(str(code) for code in reason_codes))

    def on_message(client, userdata, msg):
        try:
            message = Received(topic=_topic(msg), payload=msg.payload, properties=msg.properties,
                               mid=msg.mid, qos=msg.qos, connection=acks.connection,
                               received_ms=int(time.time() * 1000))
            acks.add(message)
            saver.queue.put(message)
        except Exception:  # never let an exception kill paho's network thread
            log.exception("cannot queue a message on %r", getattr(msg, "topic", "?"))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    mqtt.ConnectionState(f"{runtime.name} cloud broker {broker.host}:{broker.port}").attach(client)
    log.info("saving %s into %s as %s (workers=%d, inflight=%d)", topic, store.describe(), broker.client_id,
             config.saver.workers, config.saver.inflight)
    saver.start_workers()
    mqtt.start(client, broker, receive_maximum=config.saver.inflight)
    try:
        _watch(saver, runtime)
    finally:
        saver.stop_workers(timeout=config.saver.timeout + 5)
        mqtt.stop(client)
        runtime.flush()


def _watch(saver: Saver, runtime: Runtime) -> None:
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
        runtime.gauge("queue_depth", saver.queue.qsize())
        runtime.gauge("unacked", len(saver.acks) if saver.acks is not None else 0)
        runtime.wait(0.5)


def _topic(msg) -> str:
    """The topic as text even if a broker let invalid UTF-8 through (then it is rejected)."""
    try:
        return msg.topic
    except UnicodeDecodeError:
        return bytes(msg._topic).decode("utf-8", "replace")
