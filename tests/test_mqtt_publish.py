"""facehub.mqtt_publish reads every PUBLISH exactly as paho does: same packet, same error."""

from __future__ import annotations

import random
import struct

import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from facehub import mqtt_publish
from facehub.messages import Face

V5 = MQTTProtocolVersion.MQTTv5
NAMES = ("ContentType", "UserProperty", "PayloadFormatIndicator", "MessageExpiryInterval", "TopicAlias",
         "ResponseTopic", "CorrelationData", "SubscriptionIdentifier")


def packet(topic: bytes, properties: bytes, payload: bytes, mid: int | None = 7) -> bytes:
    mid_bytes = b"" if mid is None else struct.pack("!H", mid)
    return struct.pack("!H", len(topic)) + topic + mid_bytes + properties + payload


def face_properties(**extra) -> Properties:
    props = Face(b"\xff\xd8\xff" + b"x" * 100, "cam-1", face_id="f" * 32, captured_ms=1_700_000_000_000).properties()
    for name, value in extra.items():
        setattr(props, name, value)
    return props


def outcome(decode, header: int, data: bytes, protocol=V5):
    """What a decoder makes of a packet: its fields and properties, or the error it raises."""
    try:
        result = decode(header, data, protocol)
    except Exception as error:  # the very exception paho raises is part of the behaviour
        return ("error", type(error), str(error))
    props = result.properties
    properties = None if props is None else {n: getattr(props, n) for n in NAMES if hasattr(props, n)}
    return (result.dup, result.qos, result.retain, result.topic, result.mid, properties, result.payload,
            type(result.payload), type(props), str(props), props is not None and props.isEmpty())


def same(header: int, data: bytes, protocol=V5) -> None:
    assert outcome(mqtt_publish.decode_publish, header, data, protocol) == \
        outcome(mqtt_publish._paho_decode_publish, header, data, protocol)


def utf8(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def properties(*items: bytes, length: int | None = None) -> bytes:
    """Properties with their length in front (the right one unless ``length`` says otherwise)."""
    body = b"".join(items)
    return VariableByteIntegers.encode(len(body) if length is None else length) + body


def user(name: bytes, value: bytes) -> bytes:
    return b"\x26" + utf8(name) + utf8(value)


CASES = {
    "a face": face_properties().pack(),
    "no properties": b"\x00",
    "content type only": properties(b"\x03" + utf8(b"image/jpeg")),
    "many user properties": properties(*(user(b"k%d" % n, b"v" * 40) for n in range(40))),
    "extra properties": face_properties(MessageExpiryInterval=60, PayloadFormatIndicator=0,
                                        CorrelationData=b"abc").pack(),
    "two content types": properties(b"\x03" + utf8(b"image/jpeg"), b"\x03" + utf8(b"image/png")),
    "invalid utf-8": properties(user(b"a\xff", b"b")),
    "encoded surrogate": properties(user(b"\xed\xa0\x80", b"b")),
    "null character": properties(user(b"a", b"b\x00")),
    "byte order mark": properties(user(b"\xef\xbb\xbf", b"b")),
    "string past the property length": properties(b"\x03" + utf8(b"image/jpeg"), length=5),
    "value past the property length": properties(user(b"ab", b"cd"), length=6),
    "non-minimal property length": b"\x8d\x00\x03" + utf8(b"image/jpeg") + b"\x00",
    "five-byte property length": b"\x80\x80\x80\x80\x01",
    "unknown identifier": properties(b"\x7f\x00"),
    "property of another packet": properties(b"\x21\x00\x05"),
    "multi-byte identifier": properties(b"\x83\x00\x00\x00"),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("header", [0x30, 0x32, 0x3b, 0x34, 0x3a])
def test_the_same_packet_as_paho(name, header):
    same(header, packet(b"faces/cam-1", CASES[name], b"\xff\xd8\xff payload"))


def test_the_same_on_short_and_odd_packets():
    props = face_properties().pack()
    for data in (b"", b"\x00", b"\x00\x05ab", packet(b"", props, b"p"), packet(b"faces/x", b"", b""),
                 packet(b"faces/x", props, b"")):
        for header in (0x30, 0x32):
            same(header, data)
    same(0x32, packet(b"faces/x", b"", b"payload"), MQTTProtocolVersion.MQTTv311)


def test_the_same_on_damaged_packets():
    """Random bytes changed, cut off or inserted in real faces' packets: both readers agree on each."""
    rng = random.Random(5)
    whole = packet(b"faces/cam-1", face_properties().pack(), b"\xff\xd8\xff" + bytes(200))
    for _ in range(3000):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 3)):
            spot = rng.randrange(min(len(data), 180))
            kind = rng.random()
            if kind < 0.6:
                data[spot] = rng.randrange(256)
            elif kind < 0.8:
                del data[spot]
            else:
                data.insert(spot, rng.randrange(256))
        same(rng.choice((0x30, 0x32, 0x34)), bytes(data))


def test_a_face_is_read_without_paho_s_reader(monkeypatch):
    def refuse(*args):
        raise AssertionError("paho's reader was used for a face")

    monkeypatch.setattr(mqtt_publish, "_paho_decode_publish", refuse)
    result = mqtt_publish.decode_publish(0x32, packet(b"faces/cam-1", face_properties().pack(), b"jpeg"), V5)
    assert result.properties.ContentType == "image/jpeg" and result.payload == b"jpeg" and result.mid == 7
    assert dict(result.properties.UserProperty)["device"] == "cam-1"


def test_install_puts_it_in_pahos_place():
    from paho.mqtt import _packet

    mqtt_publish.install()
    assert _packet.decode_publish is mqtt_publish.decode_publish
