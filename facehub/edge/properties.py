"""MQTT v5 PUBLISH properties as compact JSON, so the spool can keep them beside each payload.

The forwarder relays faces with their properties intact (content type, user
properties with the face's metadata), so it stores them with the payload and
rebuilds them when it publishes to the cloud.
"""

from __future__ import annotations

import base64
import json

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# Properties that describe one hop, not the message: never stored or forwarded.
HOP_PROPERTIES = ("TopicAlias", "SubscriptionIdentifier")


def pack_properties(properties: Properties | None) -> str:
    """MQTT v5 PUBLISH properties as compact JSON (readable with the sqlite3 shell).

    Hop-local properties (topic alias, subscription identifier) are left out:
    they mean something only on the connection they arrived on. JSON rather
    than paho's wire encoding because paho decodes that one property at a time,
    which costs more than the rest of the forwarding path.
    """
    data: dict[str, object] = {}
    if properties is not None:
        for spaced in properties.names:
            name = spaced.replace(" ", "")
            value = getattr(properties, name, None)
            if value is None or name in HOP_PROPERTIES:
                continue
            if isinstance(value, (bytes, bytearray)):
                value = {"base64": base64.b64encode(value).decode("ascii")}
            data[name] = value
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def unpack_properties(text: str) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    for name, value in json.loads(text or "{}").items():
        if name == "UserProperty":
            value = [tuple(pair) for pair in value]
        elif isinstance(value, dict):
            value = base64.b64decode(value["base64"])
        setattr(properties, name, value)
    return properties
