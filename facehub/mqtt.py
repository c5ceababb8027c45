"""The one place that builds paho-mqtt clients.

Every component talks MQTT v5 through a client made by :func:`make_client` and
started by :func:`start`, so TLS, credentials, stable client ids, persistent
sessions and reconnect backoff are configured the same way everywhere.

Persistent sessions matter for zero loss: with a stable client id, clean start
off and a session expiry interval, QoS 1 messages that arrive while a consumer
restarts are queued by the broker and delivered when it comes back.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from facehub.config import BrokerConfig

log = logging.getLogger(__name__)


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
    client.reconnect_delay_set(*jittered_backoff(broker.reconnect_min, broker.reconnect_max))
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


def jittered_backoff(minimum: float, maximum: float) -> tuple[float, float]:
    """Reconnect delays with a random start, so a fleet that lost its broker does not return in lockstep.

    paho doubles the delay from ``min`` up to ``max`` on each failed attempt; each
    client draws its own ``min`` in [minimum, 1.5 * minimum), which spreads the
    whole schedule of retries across clients.
    """
    start = minimum * random.uniform(1.0, 1.5)
    return start, max(start, maximum)


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
    (backpressure for consumers that acknowledge late).
    """
    client.connect_async(
        broker.host,
        broker.port,
        keepalive=broker.keepalive,
        clean_start=not persistent,
        properties=connect_properties(broker, persistent, receive_maximum),
    )
    client.loop_start()


def stop(client: paho.Client) -> None:
    try:
        client.disconnect()
    finally:
        client.loop_stop()


class ConnectionState:
    """Tracks whether a client is connected, logging each change once.

    Install with ``state.attach(client)``; ``connected`` is a
    :class:`threading.Event` other threads can wait on.
    """

    def __init__(self, name: str):
        self.name = name
        self.connected = threading.Event()

    def attach(self, client: paho.Client) -> None:
        previous_connect = client.on_connect
        previous_disconnect = client.on_disconnect

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                log.warning("%s: broker refused connection: %s", self.name, reason_code)
            else:
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
            self.connected.clear()
            if previous_disconnect:
                previous_disconnect(client, userdata, flags, reason_code, properties)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
