"""The wire format: one MQTT v5 message per face.

The payload is the encoded crop and nothing else, so ``mosquitto_sub -C 1 -t
'faces/#' > face.jpg`` gives an image. Everything else travels as MQTT v5
properties (content type plus user properties), see README "Wire format".

Foreign input is validated here and only here: :func:`parse` turns a received
message into a :class:`Face` or raises :class:`InvalidFace` with a reason that
the saver logs, counts and keeps under its quarantine prefix.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SCHEMA_VERSION = "1"
CONTENT_TYPES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
MAX_USER_PROPERTIES = 64
MAX_PROPERTY_LENGTH = 256
# Ids become parts of storage keys and file names: a letter or digit first (so
# never "." or ".." or a hidden file), then letters, digits, '.', '_' or '-'.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_INTEGER = re.compile(r"-?[0-9]{1,20}")
# The last millisecond that still has a four-digit year (9999-12-31T23:59:59.999Z),
# so every accepted capture time maps to a date-based storage key.
MAX_CAPTURED_MS = 253_402_300_799_999
_IMAGE_MAGIC = {
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/webp": (b"RIFF",),
}


class InvalidFace(ValueError):
    """A received message that is not a well-formed face; ``reason`` says why.

    ``keep_payload`` is False when the payload itself is dangerous to keep (an
    image bomb, a message that crashed its decoder): the receiver then keeps a
    record of the message without it.
    """

    def __init__(self, reason: str, keep_payload: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.keep_payload = keep_payload


@dataclass(frozen=True)
class Face:
    """One detected face: the encoded crop and where it came from."""

    image: bytes
    device_id: str
    face_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    captured_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    frame: int = 0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    score: float | None = None
    content_type: str = "image/jpeg"
    track: int | None = None

    @property
    def extension(self) -> str:
        return CONTENT_TYPES.get(self.content_type, "bin")

    def metadata(self) -> dict[str, str]:
        """The face's metadata as flat strings (user properties, object metadata)."""
        meta = {
            "schema": SCHEMA_VERSION,
            "device": self.device_id,
            "face-id": self.face_id,
            "captured-ms": str(self.captured_ms),
            "frame": str(self.frame),
            "box": ",".join(str(v) for v in self.box),
        }
        if self.score is not None:
            meta["score"] = f"{self.score:.4f}"
        if self.track is not None:
            meta["track"] = str(self.track)
        return meta

    def properties(self) -> Properties:
        """MQTT v5 PUBLISH properties carrying the metadata."""
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = self.content_type
        props.UserProperty = list(self.metadata().items())
        return props


def parse(topic: str, payload: bytes, properties: Properties | None, max_bytes: int,
          topic_prefix: str = "faces") -> Face:
    """Validate a received message and return the face it carries.

    Raises :class:`InvalidFace` with a short reason for anything a well-behaved
    detector would not send: wrong topic, oversize or non-image payload,
    missing or malformed properties, a device id that disagrees with the topic.
    """
    device_from_topic = _device_from_topic(topic, topic_prefix)
    if len(payload) == 0:
        raise InvalidFace("empty payload")
    if len(payload) > max_bytes:
        raise InvalidFace(f"payload of {len(payload)} bytes exceeds limit of {max_bytes}")
    content_type = getattr(properties, "ContentType", None) or "image/jpeg"
    if content_type not in CONTENT_TYPES:
        raise InvalidFace(f"unsupported content type {content_type[:64]!r}")
    if not payload.startswith(_IMAGE_MAGIC[content_type]):
        raise InvalidFace(f"payload is not {content_type} data (bad magic bytes)")
    meta = _user_properties(getattr(properties, "UserProperty", None) or [])
    device_id = meta.get("device", device_from_topic)
    if device_id != device_from_topic:
        raise InvalidFace(f"device property {device_id!r} disagrees with topic {topic!r}")
    face_id = _required(meta, "face-id")
    if not _SAFE_ID.fullmatch(face_id):
        raise InvalidFace("face-id must be 1-128 characters of [A-Za-z0-9._-], starting with a letter or digit")
    return Face(
        image=payload,
        device_id=device_id,
        face_id=face_id,
        captured_ms=_int(meta, "captured-ms", minimum=0, maximum=MAX_CAPTURED_MS),
        frame=_int(meta, "frame", minimum=0, default=0),
        box=_box(meta.get("box", "0,0,0,0")),
        score=_float(meta.get("score")),
        content_type=content_type,
        track=_int(meta, "track", minimum=0) if "track" in meta else None,
    )


def _device_from_topic(topic: str, prefix: str) -> str:
    head = prefix + "/"
    if not topic.startswith(head):
        raise InvalidFace(f"topic {topic[:128]!r} is not under {head!r}")
    device = topic[len(head):]
    if not _SAFE_ID.fullmatch(device):
        raise InvalidFace(f"topic suffix {device[:128]!r} is not a valid device id")
    return device


def _user_properties(pairs: Iterable[Sequence[str]]) -> dict[str, str]:
    pairs = list(pairs)
    if len(pairs) > MAX_USER_PROPERTIES:
        raise InvalidFace(f"{len(pairs)} user properties exceed limit of {MAX_USER_PROPERTIES}")
    meta: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise InvalidFace("malformed user property")
        key, value = str(pair[0]), str(pair[1])
        if len(key) > MAX_PROPERTY_LENGTH or len(value) > MAX_PROPERTY_LENGTH:
            raise InvalidFace(f"user property {key[:32]!r} is too long")
        if key in meta:
            raise InvalidFace(f"user property {key[:32]!r} is repeated")
        meta[key] = value
    return meta


def _required(meta: dict[str, str], key: str) -> str:
    if key not in meta:
        raise InvalidFace(f"missing user property {key!r}")
    return meta[key]


def _int(meta: dict[str, str], key: str, minimum: int, default: int | None = None,
         maximum: int | None = None) -> int:
    raw = meta.get(key)
    if raw is None:
        if default is None:
            raise InvalidFace(f"missing user property {key!r}")
        return default
    if not _INTEGER.fullmatch(raw):
        raise InvalidFace(f"user property {key!r} is not an integer: {raw[:32]!r}")
    value = int(raw)
    if value < minimum:
        raise InvalidFace(f"user property {key!r} is below {minimum}")
    if maximum is not None and value > maximum:
        raise InvalidFace(f"user property {key!r} is above {maximum}")
    return value


def _float(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidFace(f"user property 'score' is not a number: {raw[:32]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidFace("user property 'score' is not finite")
    return value


def _box(raw: str) -> tuple[int, int, int, int]:
    parts = raw.split(",")
    if not all(_INTEGER.fullmatch(p) for p in parts):
        raise InvalidFace(f"user property 'box' is not four integers: {raw[:32]!r}")
    box = tuple(int(p) for p in parts)
    if len(box) != 4 or any(v < 0 for v in box):
        raise InvalidFace(f"user property 'box' is not four non-negative integers: {raw[:32]!r}")
    return box  # type: ignore[return-value]
