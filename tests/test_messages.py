"""Property tests over the wire format: foreign input either parses or raises InvalidFace,
and a Face survives Face -> MQTT v5 properties (packed and unpacked as on the wire) -> parse."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from facehub import messages
from facehub.messages import MAX_CAPTURED_MS, Face, InvalidFace, parse
from facehub.cloud.storage import face_key

MAX_BYTES = 4096
JPEG_MAGIC = b"\xff\xd8\xff"
SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
KEYS = ["schema", "device", "face-id", "captured-ms", "frame", "box", "score", "track"]

ids = st.text(SAFE, min_size=1, max_size=1).flatmap(
    lambda first: st.text(SAFE + "._-", max_size=127).map(lambda rest: first + rest))
# Values that look almost right, plus anything at all.
tricky_values = st.one_of(
    st.text(),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.lists(st.integers(min_value=-5, max_value=10**6), max_size=5).map(lambda v: ",".join(map(str, v))),
    st.sampled_from(["", " 1", "1 ", "+1", "1_000", "\u0661\u0662", "0x10", "1e3", "..", ".", "a/b",
                     "x\n", "nan", "inf", "9" * 30, str(MAX_CAPTURED_MS + 1), "-0"]),
)
user_properties = st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=20)), tricky_values),
                           max_size=12)
topics = st.one_of(
    st.text(),
    st.builds(lambda suffix: "faces/" + suffix, st.one_of(st.text(), ids, st.sampled_from(
        ["..", ".", "../x", "a/b", "", "-", "cam\n", "cam\x00", "d" * 200, "quarantine"]))),
)
payloads = st.one_of(st.binary(max_size=MAX_BYTES * 2), st.binary(max_size=200).map(lambda b: JPEG_MAGIC + b),
                     st.binary(max_size=50).map(lambda b: b"\x89PNG\r\n\x1a\n" + b))


@st.composite
def properties(draw) -> Properties | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    props = Properties(PacketTypes.PUBLISH)
    content_type = draw(st.one_of(st.none(), st.sampled_from(list(messages.CONTENT_TYPES)), st.text(max_size=30)))
    if content_type is not None:
        props.ContentType = content_type
    pairs = draw(user_properties)
    if pairs:
        props.UserProperty = pairs
    return props


@st.composite
def faces(draw) -> Face:
    content_type = draw(st.sampled_from(list(messages.CONTENT_TYPES)))
    magic = messages._IMAGE_MAGIC[content_type][0]
    score = draw(st.one_of(st.none(), st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)))
    return Face(
        image=magic + draw(st.binary(max_size=100)),
        device_id=draw(ids),
        face_id=draw(ids),
        captured_ms=draw(st.integers(min_value=0, max_value=MAX_CAPTURED_MS)),
        frame=draw(st.integers(min_value=0, max_value=2**63)),
        box=draw(st.tuples(*[st.integers(min_value=0, max_value=100_000)] * 4)),
        score=score,
        content_type=content_type,
        track=draw(st.one_of(st.none(), st.integers(min_value=0, max_value=2**31))),
    )


def over_the_wire(props: Properties) -> Properties:
    """Pack the properties as paho sends them and unpack them as a receiver gets them."""
    received = Properties(PacketTypes.PUBLISH)
    received.unpack(props.pack())
    return received


@st.composite
def nearly_valid(draw) -> tuple[str, bytes, Properties]:
    """A well-formed face message with one thing changed: where parser bugs hide."""
    face = draw(faces())
    meta = face.metadata()
    topic = f"faces/{face.device_id}"
    change = draw(st.sampled_from(["value", "drop", "topic", "device", "extra"]))
    if change == "value":
        meta[draw(st.sampled_from(sorted(meta)))] = draw(tricky_values)
    elif change == "drop":
        meta.pop(draw(st.sampled_from(sorted(meta))))
    elif change == "topic":
        meta.pop("device")
        topic = draw(topics)
    elif change == "device":
        meta.pop("device")
        topic = "faces/" + draw(st.sampled_from(["..", ".", "-", "_x", ".hidden", "cam\n", "a/b", "d" * 129]))
    else:
        meta[draw(st.text(max_size=10))] = draw(tricky_values)
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = face.content_type
    props.UserProperty = list(meta.items())
    return topic, face.image, props


def check_parse(topic, payload, props) -> None:
    """``parse`` raises InvalidFace or returns a face that is safe to turn into a storage key."""
    try:
        face = parse(topic, payload, props, MAX_BYTES)
    except InvalidFace as error:
        assert error.reason
        return
    assert messages._SAFE_ID.fullmatch(face.device_id) and messages._SAFE_ID.fullmatch(face.face_id)
    assert face.device_id[0].isalnum() and face.face_id[0].isalnum()
    assert 0 < len(face.image) <= MAX_BYTES
    key = face_key(face)
    assert ".." not in key.split("/") and "\n" not in key and key.startswith(face.device_id + "/")
    assert len(key.split("/")) == 5


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=topics, payload=payloads, props=properties())
def test_any_message_parses_or_raises_invalid_face(topic, payload, props):
    check_parse(topic, payload, props)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=nearly_valid())
def test_nearly_valid_messages_parse_or_raise_invalid_face(message):
    check_parse(*message)


@settings(max_examples=300, deadline=None)
@given(face=faces())
def test_face_round_trips_through_properties(face):
    parsed = parse(f"faces/{face.device_id}", face.image, over_the_wire(face.properties()), MAX_BYTES)
    expected_score = None if face.score is None else float(f"{face.score:.4f}")
    assert parsed == Face(**{**face.__dict__, "score": expected_score})
    assert parsed.metadata() == face.metadata()
    assert face_key(parsed) == face_key(face)


@given(face=faces(), extra=st.integers(min_value=1, max_value=1000))
@settings(max_examples=50, deadline=None)
def test_oversize_payloads_are_rejected(face, extra):
    payload = face.image + b"\0" * (MAX_BYTES + extra - len(face.image))
    with pytest.raises(InvalidFace, match="exceeds limit"):
        parse(f"faces/{face.device_id}", payload, face.properties(), MAX_BYTES)
