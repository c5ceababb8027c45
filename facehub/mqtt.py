"""The one place that builds paho-mqtt clients.

Every component talks MQTT v5 through a client made by :func:`make_client` and
started by :func:`start`, so TLS, credentials, stable client ids, persistent
sessions and reconnect backoff are configured the same way everywhere.

Persistent sessions matter for zero loss: with a stable client id, clean start
off and a session expiry interval, QoS 1 messages that arrive while a consumer
restarts are queued by the broker and delivered when it comes back.

Reconnects: paho's network thread retries a lost broker by itself; :func:`start`
paces those retries with :class:`facehub.backoff.Backoff` (``reconnect_min``
doubling up to ``reconnect_max``, each delay shortened by up to a quarter at
random). With the default cap of 4 s a client is back within about 4 s of its
broker's return, and a broker that stays down sees one connection attempt per
client every 3-4 s, spread out rather than in lockstep.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from facehub import mqtt_publish
from facehub.backoff import Backoff
from facehub.config import BrokerConfig

log = logging.getLogger(__name__)

RECONNECT_JITTER = 0.25  # each reconnect delay is shortened by up to this fraction, at random


def make_client(broker: BrokerConfig, client_id: str, manual_ack: bool = False) -> paho.Client:
    """A configured, not yet connected MQTT v5 client.

    ``broker.client_id`` wins over ``client_id`` so a deployment can pin it.
    ``{client_id}`` in ``broker.username`` is replaced by the client id: the cloud
    broker binds each account to one client id, so clients that share one
    configuration (the saver instances) log in with one account each.
    With ``manual_ack`` the caller acknowledges each QoS>0 message itself
    (``client.ack(mid, qos)``) once the message is safe downstream.
    """
    client_id = broker.client_id or client_id
    mqtt_publish.install()  # received PUBLISH packets read in a fraction of paho's time, with its result
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    if broker.username:
        client.username_pw_set(account_name(broker.username, client_id), broker.password or None)
    if broker.tls:
        client.tls_set(
            ca_certs=broker.ca_file or None,
            certfile=broker.cert_file or None,
            keyfile=broker.key_file or None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(broker.tls_insecure)
    client.reconnect_delay_set(broker.reconnect_min, broker.reconnect_max)  # until start() paces them
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.on_socket_open = send_without_delay
    return client


def account_name(username: str, client_id: str) -> str:
    """The user name a client logs in with: ``{client_id}`` replaced by its client id."""
    return username.replace("{client_id}", client_id)


def send_without_delay(client: paho.Client, userdata, sock) -> None:
    """Turn Nagle's algorithm off: faces and acknowledgements are small writes that must go out at once.

    With it on, a small packet sent while an earlier one is unacknowledged
    waits for the peer's delayed ACK: tens of milliseconds per face.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as error:
        log.debug("cannot set TCP_NODELAY: %s", error)


def connect_properties(broker: BrokerConfig, persistent: bool = True,
                       receive_maximum: int | None = None) -> Properties | None:
    """CONNECT properties: session expiry for persistent sessions, Receive Maximum if asked."""
    props = Properties(PacketTypes.CONNECT)
    if persistent and broker.session_expiry:
        props.SessionExpiryInterval = broker.session_expiry
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    return props if props.json() else None


def start(client: paho.Client, broker: BrokerConfig, persistent: bool = True,
          receive_maximum: int | None = None) -> None:
    """Connect in the background and keep reconnecting with backoff.

    Never raises for an unreachable broker: paho's network thread retries, and
    ``on_connect``/``on_disconnect`` callbacks log each transition.
    ``receive_maximum`` caps the unacknowledged QoS>0 messages the broker sends us
    (backpressure for consumers that acknowledge late). Set the client's callbacks
    before calling this: the reconnect pacing wraps the ones present.
    """
    pace_reconnects(client, broker)
    client.connect_async(
        broker.host,
        broker.port,
        keepalive=broker.keepalive,
        clean_start=not persistent,
        properties=connect_properties(broker, persistent, receive_maximum),
    )
    client.loop_start()


def pace_reconnects(client: paho.Client, broker: BrokerConfig) -> Backoff:
    """Give each of paho's reconnect waits its delay from a jittered :class:`Backoff`.

    paho waits before every retry (after a lost connection, a failed or a
    refused attempt), and each of those is announced by ``on_disconnect`` or
    ``on_connect_fail`` first: there the next delay is drawn and set as both
    paho's minimum and maximum, so paho waits exactly that long. A successful
    CONNACK starts the schedule again from ``reconnect_min``. The callbacks
    present are kept and called after.
    """
    backoff = Backoff(broker.reconnect_min, broker.reconnect_max, jitter=RECONNECT_JITTER)
    previous_connect, previous_disconnect = client.on_connect, client.on_disconnect
    previous_connect_fail = client.on_connect_fail

    def schedule_retry() -> None:
        delay = backoff.next()
        client.reconnect_delay_set(delay, delay)

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            backoff.reset()
        if previous_connect:
            previous_connect(client, userdata, flags, reason_code, properties)

    def on_disconnect(client, userdata, flags, reason_code, properties):
        schedule_retry()
        if previous_disconnect:
            previous_disconnect(client, userdata, flags, reason_code, properties)

    def on_connect_fail(client, userdata):
        schedule_retry()
        if previous_connect_fail:
            previous_connect_fail(client, userdata)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_connect_fail = on_connect_fail
    return backoff


def stop(client: paho.Client) -> None:
    try:
        client.disconnect()
    finally:
        client.loop_stop()


class ConnectionState:
    """Tracks whether a client is connected, logging each change once.

    Install with ``state.attach(client)``; ``connected`` is a
    :class:`threading.Event` other threads can wait on. :meth:`down_for` says
    how long the broker has been out of reach (monotonic clock), counted from
    the lost connection, or from the tracker's creation before the first one.
    """

    def __init__(self, name: str):
        self.name = name
        self.connected = threading.Event()
        self._down_at: float | None = time.monotonic()

    def down_for(self) -> float | None:
        """Seconds since the connection was lost (or never made); None while connected."""
        down_at = self._down_at
        return None if down_at is None else max(0.0, time.monotonic() - down_at)

    def attach(self, client: paho.Client) -> None:
        previous_connect = client.on_connect
        previous_disconnect = client.on_disconnect

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                log.warning("%s: broker refused connection: %s", self.name, reason_code)
            else:
                self._down_at = None
                self.connected.set()
                log.info("%s: connected (session present: %s)", self.name, flags.session_present)
            if previous_connect:
                previous_connect(client, userdata, flags, reason_code, properties)

        def on_disconnect(client, userdata, flags, reason_code, properties):
            if self.connected.is_set():
                if reason_code.is_failure or reason_code.value != 0:
                    log.warning("%s: disconnected: %s; reconnecting with backoff", self.name, reason_code)
                else:
                    log.info("%s: disconnected", self.name)
                self._down_at = time.monotonic()
            self.connected.clear()
            if previous_disconnect:
                previous_disconnect(client, userdata, flags, reason_code, properties)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
