"""The logger component: one log line per face seen on the local broker.

It is the simplest consumer of the wire format and so doubles as a live check
that the detector's messages parse: a malformed one is logged as such.
"""

from __future__ import annotations

import logging

from facehub import messages, mqtt
from facehub.config import Config
from facehub.runtime import Runtime

log = logging.getLogger("facehub.logger")


def describe(topic: str, payload: bytes, properties, max_bytes: int, prefix: str) -> str:
    """The line logged for one message: device, face id, bytes and box, or why it is malformed."""
    try:
        face = messages.parse(topic, payload, properties, max_bytes, prefix)
    except messages.InvalidFace as error:
        return f"malformed message on {topic[:128]!r} ({len(payload)} bytes): {error.reason}"
    x, y, w, h = face.box
    score = f" score={face.score:.2f}" if face.score is not None else ""
    return (f"face device={face.device_id} id={face.face_id} bytes={len(payload)} "
            f"box={x},{y},{w},{h} frame={face.frame}{score}")


def run(config: Config, runtime: Runtime) -> None:
    """Subscribe locally (QoS 0: a log line is not worth a durable session) and log each face."""
    client = mqtt.make_client(config.local, f"facehub-logger-{config.device_id}")

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe(config.topic_filter, qos=0)

    def on_message(client, userdata, message):
        line = describe(message.topic, message.payload, message.properties,
                        config.saver.max_bytes, config.topic_prefix)
        print(line, flush=True)
        runtime.count("logged" if line.startswith("face ") else "malformed")

    client.on_connect = on_connect
    client.on_message = on_message
    mqtt.ConnectionState("logger").attach(client)
    mqtt.start(client, config.local, persistent=False)
    try:
        runtime.run_until_stopped()
    finally:
        mqtt.stop(client)
