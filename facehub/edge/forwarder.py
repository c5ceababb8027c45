"""The forwarder: edge broker -> durable spool -> cloud broker, losing nothing.

Store and forward, in three steps:

1. *Receive.* A persistent session on the edge broker (stable client id, clean
   start off, session expiry) subscribes to this device's own topic
   (``<prefix>/<device_id>``) with manual acks: the edge broker is open to
   anything on the box, and faces published under another device's name would
   only be refused by the cloud.
   paho's network thread hands each message to a bounded queue; nothing is
   acknowledged yet, so the edge broker still owns it.
2. *Store.* The forwarder's main loop writes whatever has arrived to the spool
   in one transaction (one fsync per batch, see :mod:`facehub.edge.spool`), and only
   then acknowledges those messages to the edge broker. A crash before the ack
   means the broker delivers them again.
3. *Send.* The oldest pending spool entries are published to the cloud broker
   (properties intact) with at most ``forwarder.inflight`` unacknowledged at a
   time. An entry is deleted from the spool only when the cloud broker's PUBACK
   (QoS 1) or PUBCOMP (QoS 2) arrives with a success reason code; with QoS 0
   when paho has written it to the socket.

Reconnects. Within one process the forwarder relies on paho to resend QoS 1/2
messages that were in flight when the cloud connection dropped: paho keeps
them until acknowledged and resends them (DUP set) on reconnect, with the same
client object and packet ids, so their spool entries stay in flight and the
window cannot stall or double up. QoS 0 messages paho has not written are
discarded by paho on reconnect, so on a cloud disconnect the forwarder returns
its unconfirmed QoS 0 entries to pending and publishes them again from the
spool. Across a crash or ``kill -9`` the in-flight marks (memory only) are gone
and every stored entry is sent again: at-least-once, made exactly-once in the
bucket by the saver's face-id keys.

Refusals. The cloud broker may refuse a face for a while (no saver subscribed yet,
quota) or for good (not authorized, invalid topic or payload): a face refused for
good ``forwarder.max_refusals`` times moves to the spool's dead letters
(``dead_lettered``, gauge ``dead_letters``), so it cannot hold up the faces behind
it; transient refusals are retried with backoff, as long as the spool's limits allow.

Availability and stats. The cloud connection carries a last will, ``offline`` on
``<status_prefix>/<device_id>/availability``; after each connect the forwarder
publishes ``online`` there, and ``offline`` on a clean stop. Every
``forwarder.stats_interval`` it publishes a JSON summary on ``.../stats`` (frames,
faces, spool depth, oldest spooled age, detector fps, search ms p95, uptime,
version). These are not retained: the cloud broker refuses retained messages
(a device must not be able to plant one), so a watcher keeps a persistent session.

Delivery gauges (read by ``facehub health --delivery``): ``local_down_since``
and ``cloud_down_since`` (when that broker went out of reach), ``spool_failing_since``
(when spool writes started failing) and ``oldest_spooled_age`` (seconds the
oldest face in the spool has waited for the cloud's acknowledgement).

Threads: paho's two network threads only put events on queues (the incoming
queue is bounded, which pushes back on the edge broker; the completion queue
is bounded by the in-flight window and never blocks, because paho calls
``on_publish`` holding a lock that ``publish()`` needs). All spool and tracking
work happens in the main loop, which also beats the heartbeat.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from facehub import __version__, mqtt
from facehub.backoff import Backoff
from facehub.config import Config
from facehub.runtime import Runtime, read_stats
from facehub.edge.properties import pack_properties
from facehub.edge.spool import Record, Spool, SpoolError

log = logging.getLogger("facehub.forwarder")

INCOMING_QUEUE = 10_000      # received, not yet spooled (bounded: backpressure on the edge broker)
STORE_BATCH = 1_000          # messages written per spool transaction at most
EXPIRE_INTERVAL = 5.0        # seconds between spool expiry sweeps
STORE_RETRY_FOR = 30.0       # a spool write failing this long is fatal: restart, broker redelivers
LOOP_WAIT = 0.25             # main loop wakes at least this often (heartbeat)
OLDEST_INTERVAL = 0.5        # seconds between looks at the oldest spooled face


@dataclass(frozen=True)
class Unacked:
    """A message taken from the edge broker, not yet acknowledged to it."""

    mid: int
    qos: int
    record: Record


NO_MATCHING_SUBSCRIBERS = 16  # MQTT v5 PUBACK reason code: accepted, but nobody will get it
# PUBACK reason codes that will not change by trying again: not authorized, topic name
# invalid, packet too large, payload format invalid
REFUSED_FOR_GOOD = frozenset({135, 144, 149, 153})
ONLINE, OFFLINE = "online", "offline"


def delivered_to_a_subscriber(reason_code) -> bool:
    """True when the cloud broker took responsibility for the face (it has somewhere to go)."""
    return not reason_code.is_failure and reason_code.value != NO_MATCHING_SUBSCRIBERS


def client_ids(config: Config) -> tuple[str, str]:
    """Stable client ids (edge, cloud): persistent sessions need the same id after a restart."""
    base = f"facehub-forwarder-{config.device_id}"
    return base, f"{base}-cloud"


def device_stats(components: dict[str, dict], runtime: Runtime, spool: Spool, uptime: float,
                 detector_fps: float | None) -> dict:
    """What the stats topic says: the detector's and forwarder's main figures, from their stats files."""
    detector = components.get("detector", {})
    counters = detector.get("counters", {})
    search = detector.get("percentiles", {}).get("search_ms", {})
    oldest = spool.oldest_received()
    return {
        "version": __version__,
        "uptime": round(uptime, 1),
        "frames": counters.get("frames", 0),
        "faces": counters.get("faces_published", 0),
        "detector_fps": detector_fps,
        "search_ms_p95": search.get("p95"),
        "forwarded": runtime.counter("forwarded"),
        "spool_depth": spool.depth,
        "dead_letters": spool.dead_letters,
        "oldest_spooled_age": None if oldest is None else round(max(0.0, time.time() - oldest), 1),
    }


def run(config: Config, runtime: Runtime) -> None:
    """Forward faces from the edge broker to the cloud broker until ``runtime.stop`` is set."""
    spool = Spool.from_config(config.forwarder)
    try:
        Forwarder(config, runtime, spool).run()
    finally:
        spool.close()


class Forwarder:
    """One edge subscription, one spool, one cloud publisher, one main loop."""

    def __init__(self, config: Config, runtime: Runtime, spool: Spool):
        self.config = config
        self.runtime = runtime
        self.spool = spool
        self.window = config.forwarder.inflight
        self.cloud_qos = config.cloud.qos
        self._incoming: queue.Queue[Unacked] = queue.Queue(maxsize=INCOMING_QUEUE)
        self._completions: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sent: dict[int, int] = {}   # paho mid -> spool id, owned by the main loop
        self._broker_receive_maximum = 65535
        self._cloud_ready = threading.Event()  # connected, and the broker's limits are known
        self._refusals = Backoff(config.cloud.reconnect_min, config.cloud.reconnect_max)
        self._next_expiry = 0.0
        self._next_oldest = 0.0
        self._store_failing_since: float | None = None
        self._unstored: list[Unacked] = []   # taken from the queue, spool write failed

        local_id, cloud_id = client_ids(config)
        self.local = mqtt.make_client(config.local, local_id, manual_ack=True)
        self.local_state = mqtt.ConnectionState("forwarder edge broker")
        self.local.on_connect = self._on_local_connect
        self.local.on_message = self._on_message
        self.local.on_subscribe = self._on_local_subscribe
        self.subscribed = threading.Event()
        self.local_state.attach(self.local)

        self.cloud = mqtt.make_client(config.cloud, cloud_id)
        self.cloud.max_inflight_messages_set(self.window)
        self.availability_topic = f"{config.status_topic}/availability"
        self.stats_topic = f"{config.status_topic}/stats"
        self.cloud.will_set(self.availability_topic, OFFLINE, qos=1, retain=False)
        self._started = time.monotonic()
        self._next_stats = time.monotonic() + config.forwarder.stats_interval
        self._refusal_counts: dict[int, int] = {}  # spool id -> refusals for good so far
        self._last_frames: tuple[int, float] = (0, 0.0)  # detector frames at the last stats message
        self.cloud_state = mqtt.ConnectionState("forwarder cloud broker")
        self.cloud.on_connect = self._on_cloud_connect
        self.cloud.on_disconnect = self._on_cloud_disconnect
        self.cloud.on_publish = self._on_publish
        self.cloud_state.attach(self.cloud)

    # -- paho callbacks (network threads): only queue events ---------------------------------

    def _on_local_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        # The subscription survives in the persistent session; renewing it is harmless. A session
        # made by an older version may still hold the filter of every device's faces: drop it.
        client.unsubscribe(self.config.topic_filter)
        client.subscribe(self.config.topic, options=SubscribeOptions(qos=self.config.local.qos))

    def _on_local_subscribe(self, client, userdata, mid, reason_codes, properties):
        if all(not code.is_failure for code in reason_codes):
            self.subscribed.set()
        else:
            log.error("edge broker refused the subscription to %s: %s", self.config.topic,
                      ", ".join(str(code) for code in reason_codes))

    def _on_message(self, client, userdata, message: paho.MQTTMessage):
        record = Record(topic=message.topic, payload=bytes(message.payload),
                        properties=pack_properties(message.properties), qos=message.qos,
                        received=time.time())
        item = Unacked(message.mid, message.qos, record)
        self.runtime.count("received")
        while not self.runtime.stop.is_set():
            try:
                self._incoming.put(item, timeout=0.5)
                self._wake.set()
                return
            except queue.Full:
                continue  # the main loop is behind: hold the edge broker back
        # Stopping: not acknowledged, so the edge broker delivers it again next time.

    def _on_cloud_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            # Never more unacknowledged publishes than the broker says it accepts (paho does not check).
            self._broker_receive_maximum = getattr(properties, "ReceiveMaximum", 65535)
            client.publish(self.availability_topic, ONLINE, qos=1)
            self._cloud_ready.set()
            self._wake.set()

    def _on_cloud_disconnect(self, client, userdata, flags, reason_code, properties):
        self._cloud_ready.clear()
        self._completions.put(("down",))
        self._wake.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._completions.put(("done", mid, reason_code))
        self._wake.set()

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> None:
        log.info("forwarding %s from %s:%d to %s:%d (QoS %d -> %d, spool %s, fsync=%s, window %d)",
                 self.config.topic, self.config.local.host, self.config.local.port,
                 self.config.cloud.host, self.config.cloud.port, self.config.local.qos,
                 self.cloud_qos, self.spool.path, self.spool.fsync, self.window)
        mqtt.start(self.cloud, self.config.cloud, persistent=True)
        mqtt.start(self.local, self.config.local, persistent=True)
        try:
            while not self.runtime.stop.is_set():
                self.step(LOOP_WAIT)
        finally:
            mqtt.stop(self.local)       # first: nothing new arrives, unacked ones stay at the broker
            self._drain_completions()   # delete what the cloud confirmed meanwhile
            self._say_offline()
            mqtt.stop(self.cloud)
            self._update_gauges()
            self.runtime.flush()

    def step(self, wait: float) -> None:
        """One round: store what arrived, settle what the cloud confirmed, send more."""
        self._wake.wait(wait)
        self._wake.clear()
        self._store_incoming()
        self._drain_completions()
        self._send()
        self._housekeeping()
        self.runtime.beat()

    def _store_incoming(self) -> None:
        """Spool everything received (one transaction per batch), then ack it to the edge broker."""
        while True:
            batch = self._take_incoming()
            if not batch:
                return
            try:
                result = self.spool.put_many([item.record for item in batch])
            except SpoolError as error:
                self._store_failed(batch, error)
                return
            self._store_failing_since = None
            for item in batch:
                if item.qos > 0:
                    self.local.ack(item.mid, item.qos)
            self.runtime.count("spooled", len(batch) - result.rejected)
            if result.dropped or result.rejected:
                self.runtime.count("spool_dropped", result.dropped + result.rejected)
            if len(batch) < STORE_BATCH:
                return

    def _take_incoming(self) -> list[Unacked]:
        batch, self._unstored = self._unstored, []
        while len(batch) < STORE_BATCH:
            try:
                batch.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        return batch

    def _store_failed(self, batch: list[Unacked], error: Exception) -> None:
        """Keep the batch (unacknowledged) for the next round; fatal if the spool stays unwritable.

        Raising ends the component; its restart reconnects the persistent
        session and the edge broker delivers everything unacknowledged again.
        """
        now = time.monotonic()
        if self._store_failing_since is None:
            self._store_failing_since = now
        self.runtime.count("spool_errors")
        if now - self._store_failing_since > STORE_RETRY_FOR:
            raise SpoolError(f"spool unwritable for {STORE_RETRY_FOR:.0f}s: {error}") from error
        log.error("cannot write %d messages to the spool, retrying: %s", len(batch), error)
        self._unstored = batch
        self.runtime.wait(1.0)

    def _drain_completions(self) -> None:
        """Apply the cloud client's events in order: confirmed, refused, disconnected."""
        delivered: list[int] = []
        refused: list[int] = []
        reason = None
        while True:
            try:
                event = self._completions.get_nowait()
            except queue.Empty:
                break
            if event[0] == "done":
                entry_id = self._sent.pop(event[1], None)
                if entry_id is None:
                    continue
                if not delivered_to_a_subscriber(event[2]):
                    refused.append(entry_id)
                    reason = event[2]
                else:
                    delivered.append(entry_id)
            elif event[0] == "down" and self.cloud_qos == 0:
                self._settle(delivered)
                delivered = []
                self.spool.release(self._sent.values())  # paho drops unsent QoS 0 packets
                self._sent.clear()
        self._settle(delivered)
        if refused:
            self._refused(refused, reason)
        if buried := [entry_id for entry_id in refused
                      if self._refusal_counts.get(entry_id, 0) >= self.config.forwarder.max_refusals]:
            self._bury(buried, reason)

    def _refused(self, entry_ids: list[int], reason) -> None:
        """The cloud broker said no (not authorized, quota exceeded, no subscriber...): keep them, retry.

        Nothing is dropped here: a broker that keeps refusing is a
        misconfiguration to fix, meanwhile the spool's size and age limits apply.
        "No matching subscribers" counts as a refusal too: the broker would
        discard the face, which happens when no saver has ever subscribed yet
        (a fresh cloud broker, savers still starting).
        """
        self.spool.release(entry_ids)
        self.runtime.count("forward_refused", len(entry_ids))
        if reason is not None and reason.value in REFUSED_FOR_GOOD:
            for entry_id in entry_ids:
                self._refusal_counts[entry_id] = self._refusal_counts.get(entry_id, 0) + 1
        delay = self._refusals.next()
        log.warning("cloud broker refused %d publishes (%s); they stay in the spool, retrying in %.1fs",
                    len(entry_ids), reason, delay)

    def _bury(self, entry_ids: list[int], reason) -> None:
        """Faces the cloud refuses for good move out of the way, to the spool's dead letters."""
        moved = self.spool.bury(entry_ids, str(reason), self.config.forwarder.dead_letters_max)
        for entry_id in entry_ids:
            self._refusal_counts.pop(entry_id, None)
        self.runtime.count("dead_lettered", moved)
        self._refusals.reset()  # what is left behind them may well be fine
        log.error("moved %d faces the cloud broker refused %d times (%s) to the spool's dead letters "
                  "(%s, table dead_letters)", moved, self.config.forwarder.max_refusals, reason, self.spool.path)

    def _settle(self, delivered: list[int]) -> None:
        if not delivered:
            return
        try:
            self.spool.ack(delivered)
        except SpoolError as error:
            # Still stored: they will be sent again (a duplicate, never a loss).
            log.error("cannot delete %d delivered entries from the spool: %s", len(delivered), error)
            self.spool.release(delivered)
            self.runtime.count("spool_errors")
            return
        self.runtime.count("forwarded", len(delivered))
        for entry_id in delivered:
            self._refusal_counts.pop(entry_id, None)
        self._refusals.reset()

    def _send(self) -> None:
        """Publish the oldest pending entries while the window has room and the cloud is up."""
        if not self._cloud_ready.is_set() or not self._refusals.due:
            return
        room = self.effective_window - len(self._sent)
        if room <= 0:
            return
        for entry in self.spool.claim(room):
            try:
                info = self.cloud.publish(entry.topic, entry.payload, qos=self.cloud_qos,
                                          properties=entry.mqtt_properties())
            except (ValueError, TypeError) as error:
                self._unsendable(entry.id, error)
                continue
            if self.cloud_qos == 0 and info.rc != paho.MQTT_ERR_SUCCESS:
                self.spool.release([entry.id])  # not written; QoS 0 is not queued by paho
                break
            # QoS 1/2: paho owns it now and (re)sends it until the broker acknowledges.
            self._sent[info.mid] = entry.id

    @property
    def effective_window(self) -> int:
        """forwarder.inflight, or less when the cloud broker's Receive Maximum is smaller."""
        return min(self.window, self._broker_receive_maximum)

    def _unsendable(self, entry_id: int, error: Exception) -> None:
        """An entry paho refuses to publish can never leave: drop it, counted and logged."""
        log.error("dropping spool entry %d: cannot be published: %s", entry_id, error)
        self.spool.ack([entry_id])
        self.runtime.count("spool_dropped")

    def _housekeeping(self) -> None:
        self._publish_stats()
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRE_INTERVAL
            expired = self.spool.expire()
            if expired:
                self.runtime.count("spool_expired", expired)
            self.spool.log_drops()
        self._update_gauges()

    def _say_offline(self) -> None:
        """A clean stop: tell the cloud at once instead of leaving it to the will (keepalive x 1.5)."""
        if not self._cloud_ready.is_set():
            return
        info = self.cloud.publish(self.availability_topic, OFFLINE, qos=1)
        try:
            info.wait_for_publish(timeout=2.0)
        except (RuntimeError, ValueError):
            pass  # not connected after all: the will says it

    def _publish_stats(self) -> None:
        """The device's summary on the stats topic, every ``forwarder.stats_interval`` seconds."""
        interval = self.config.forwarder.stats_interval
        now = time.monotonic()
        if not interval or now < self._next_stats or not self._cloud_ready.is_set():
            return
        self._next_stats = now + interval
        components = read_stats(self.config.supervisor.state_dir)
        frames = components.get("detector", {}).get("counters", {}).get("frames", 0)
        last_frames, last_at = self._last_frames
        fps = round((frames - last_frames) / (now - last_at), 1) if last_at and frames >= last_frames else None
        self._last_frames = (frames, now)
        stats = device_stats(components, self.runtime, self.spool, uptime=now - self._started, detector_fps=fps)
        self.cloud.publish(self.stats_topic, json.dumps(stats, sort_keys=True), qos=0)

    def _update_gauges(self) -> None:
        self.runtime.gauge("spool_depth", self.spool.depth)
        self.runtime.gauge("spool_bytes", self.spool.bytes)
        self.runtime.gauge("dead_letters", self.spool.dead_letters)
        self.runtime.gauge("inflight", len(self._sent))
        self.runtime.gauge("window", self.effective_window)
        self.runtime.gauge("edge_connected", self.local_state.connected.is_set())
        self.runtime.gauge("edge_subscribed", self.subscribed.is_set())
        self.runtime.gauge("cloud_connected", self.cloud_state.connected.is_set())
        self.runtime.gauge_since("local_down_since", self.local_state.down_for())
        self.runtime.gauge_since("cloud_down_since", self.cloud_state.down_for())
        failing = self._store_failing_since
        self.runtime.gauge_since("spool_failing_since", None if failing is None else time.monotonic() - failing)
        now = time.monotonic()
        if now >= self._next_oldest:
            self._next_oldest = now + OLDEST_INTERVAL
            oldest = self.spool.oldest_received()  # wall clock: it is stored and outlives the process
            age = None if oldest is None else round(max(0.0, time.time() - oldest), 3)
            self.runtime.gauge("oldest_spooled_age", age)
