"""Small programs the chaos test runs inside its network namespaces.

The test process stays in the machine's own namespace; anything that must talk
to a broker or to S3 from inside the edge or cloud namespace runs as
``ip netns exec NS python chaos_clients.py COMMAND ...``:

- ``publish``: push real wire-format faces (a real JPEG plus the MQTT v5
  properties of :class:`facehub.messages.Face`) through the edge broker at a
  steady rate, with its own persistent session; writes the ids it sent and the
  ids the broker acknowledged.
- ``collect``: a persistent QoS 1 subscriber on the edge broker that writes the
  face id of every face it sees (the detector's and the publisher's): the
  published set the stored set is compared with.
- ``seed-session``: create a client's persistent session and subscription
  before that client first runs.
- ``wait-clients``: wait until at least N clients are connected to a broker.
- ``make-bucket`` / ``list-s3``: create the bucket, list its keys as JSON.
- ``proxy``: a TCP relay in front of moto's S3 server; killing it is an S3
  outage that keeps moto's in-memory objects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

SESSION_EXPIRY = 3600


def sample_jpeg(size: int = 96) -> bytes:
    """A small real JPEG: a drawn face-like picture (any decoder opens it)."""
    import cv2
    import numpy as np

    y, x = np.mgrid[0:size, 0:size]
    image = np.dstack([(x * 255 // size), (y * 255 // size), np.full_like(x, 128)]).astype(np.uint8)
    centre = size // 2
    cv2.circle(image, (centre, centre), size // 3, (180, 200, 230), -1)
    cv2.circle(image, (centre - size // 8, centre - size // 10), size // 20, (40, 40, 40), -1)
    cv2.circle(image, (centre + size // 8, centre - size // 10), size // 20, (40, 40, 40), -1)
    cv2.ellipse(image, (centre, centre + size // 8), (size // 8, size // 20), 0, 0, 180, (60, 60, 160), 2)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def connect(host: str, port: int, client_id: str, clean_start: bool = False,
            on_message=None) -> tuple[paho.Client, threading.Event]:
    """A started MQTT v5 client with a persistent session; returns it and its 'connected' event."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            connected.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        connected.clear()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    if on_message:
        client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY
    client.reconnect_delay_set(1, 2)
    client.connect_async(host, port, keepalive=10, clean_start=clean_start, properties=props)
    client.loop_start()
    return client, connected


def subscribe_and_wait(client: paho.Client, topic: str, qos: int, timeout: float = 10.0) -> None:
    done = threading.Event()
    client.on_subscribe = lambda *args: done.set()
    client.subscribe(topic, options=SubscribeOptions(qos=qos))
    if not done.wait(timeout):
        raise SystemExit(f"no SUBACK for {topic} within {timeout}s")


def cmd_publish(args) -> int:
    """Publish ``count`` faces at ``rate`` per second; write sent and acknowledged ids."""
    from facehub.messages import Face

    image = sample_jpeg()
    acked: dict[int, str] = {}
    pending: dict[int, str] = {}
    early: dict[int, bool] = {}   # acknowledged before publish() returned its mid to us
    lock = threading.Lock()

    # paho calls on_publish holding a lock publish() needs: never hold ours around publish().
    def on_publish(client, userdata, mid, reason_code, properties):
        with lock:
            face_id = pending.pop(mid, None)
            if face_id is None:
                early[mid] = not reason_code.is_failure
            elif not reason_code.is_failure:
                acked[mid] = face_id

    client, connected = connect(args.host, args.port, args.client_id)
    client.on_publish = on_publish
    if not connected.wait(15):
        raise SystemExit("publisher: edge broker not reachable")
    topic = f"{args.topic_prefix}/{args.device}"
    sent = []
    start = time.monotonic()
    with open(args.sent, "w") as sent_file:
        for i in range(args.count):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            face = Face(image=image, device_id=args.device, face_id=uuid.uuid4().hex, frame=i,
                        box=(10, 10, 96, 96), score=0.99)
            info = client.publish(topic, face.image, qos=args.qos, properties=face.properties())
            if args.qos:
                with lock:
                    if info.mid in early:
                        if early.pop(info.mid):
                            acked[info.mid] = face.face_id
                    else:
                        pending[info.mid] = face.face_id
            sent.append(face.face_id)
            sent_file.write(face.face_id + "\n")
            sent_file.flush()
    deadline = time.monotonic() + 60
    while args.qos and pending and time.monotonic() < deadline:
        time.sleep(0.1)
    client.disconnect()
    client.loop_stop()
    Path(args.acked).write_text("".join(f"{face_id}\n" for face_id in acked.values()))
    print(json.dumps({"sent": len(sent), "acked": len(acked), "unacked": len(pending),
                      "seconds": round(time.monotonic() - start, 1)}), flush=True)
    return 0


def cmd_collect(args) -> int:
    """Write the face id of every face on the broker, one per line, until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open(args.out, "a", buffering=1) as out:   # line-buffered: the test reads it live

        def on_message(client, userdata, message):
            pairs = getattr(message.properties, "UserProperty", None) or []
            face_id = dict(pairs).get("face-id", "")
            out.write((face_id or f"no-id-on-{message.topic}") + "\n")

        client, connected = connect(args.host, args.port, args.client_id, on_message=on_message)
        if not connected.wait(15):
            raise SystemExit("collector: broker not reachable")
        subscribe_and_wait(client, args.topic, qos=1)
        Path(args.ready).write_text("subscribed\n")
        stop.wait()
        client.disconnect()
        client.loop_stop()
    return 0


def cmd_seed_session(args) -> int:
    """Create ``client_id``'s session with its subscription, as if it had run before."""
    client, connected = connect(args.host, args.port, args.client_id, clean_start=True)
    if not connected.wait(15):
        raise SystemExit("seed-session: broker not reachable")
    subscribe_and_wait(client, args.topic, qos=args.qos)
    client.disconnect()
    client.loop_stop()
    return 0


def cmd_wait_clients(args) -> int:
    """Wait until the broker's ``$SYS`` count of connected clients, minus us, reaches ``count``.

    (Not the subscription count: mosquitto 2.0 leaves shared subscriptions out of it.)
    """
    reached = threading.Event()

    def on_message(client, userdata, message):
        if int(message.payload or b"0") - 1 >= args.count:
            reached.set()

    client, connected = connect(args.host, args.port, f"chaos-probe-{uuid.uuid4().hex[:8]}",
                                clean_start=True, on_message=on_message)
    if not connected.wait(15):
        raise SystemExit("wait-clients: broker not reachable")
    client.subscribe("$SYS/broker/clients/connected")
    ok = reached.wait(args.timeout)
    client.disconnect()
    client.loop_stop()
    return 0 if ok else 1


def cmd_make_bucket(args) -> int:
    from facehub.dev.servers import make_bucket

    make_bucket(args.endpoint, args.bucket)
    return 0


def cmd_list_s3(args) -> int:
    from facehub.dev.servers import list_objects

    print(json.dumps(sorted(list_objects(args.endpoint, args.bucket, args.prefix))))
    return 0


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def cmd_proxy(args) -> int:
    """Relay TCP connections from ``listen`` to ``target`` until killed."""
    listen_host, listen_port = args.listen.rsplit(":", 1)
    target_host, target_port = args.target.rsplit(":", 1)

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_relay(client_reader, server_writer), _relay(server_reader, client_writer))

    async def main():
        server = await asyncio.start_server(handle, listen_host, int(listen_port))
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    publish = commands.add_parser("publish")
    collect = commands.add_parser("collect")
    seed = commands.add_parser("seed-session")
    wait = commands.add_parser("wait-clients")
    for sub in (publish, collect, seed, wait):
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, required=True)
    publish.add_argument("--client-id", default="chaos-publisher")
    publish.add_argument("--device", default="chaos-pub")
    publish.add_argument("--topic-prefix", default="faces")
    publish.add_argument("--count", type=int, default=2000)
    publish.add_argument("--rate", type=float, default=25.0, help="faces per second")
    publish.add_argument("--qos", type=int, default=1)
    publish.add_argument("--sent", required=True, help="file for the ids handed to the client")
    publish.add_argument("--acked", required=True, help="file for the ids the broker acknowledged")
    publish.set_defaults(run=cmd_publish)

    collect.add_argument("--client-id", default="chaos-collector")
    collect.add_argument("--topic", default="faces/#")
    collect.add_argument("--out", required=True)
    collect.add_argument("--ready", required=True, help="file written once subscribed")
    collect.set_defaults(run=cmd_collect)

    seed.add_argument("--client-id", required=True)
    seed.add_argument("--topic", required=True)
    seed.add_argument("--qos", type=int, default=1)
    seed.set_defaults(run=cmd_seed_session)

    wait.add_argument("--count", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=30.0)
    wait.set_defaults(run=cmd_wait_clients)

    for name, handler in (("make-bucket", cmd_make_bucket), ("list-s3", cmd_list_s3)):
        sub = commands.add_parser(name)
        sub.add_argument("--endpoint", required=True)
        sub.add_argument("--bucket", required=True)
        sub.add_argument("--prefix", default="")
        sub.set_defaults(run=handler)

    proxy = commands.add_parser("proxy")
    proxy.add_argument("--listen", required=True, help="host:port")
    proxy.add_argument("--target", required=True, help="host:port")
    proxy.set_defaults(run=cmd_proxy)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
