"""The saver against a real mosquitto and moto's S3 server: storing, idempotence, bad input,
storage outages, persistent sessions and shared subscriptions."""

from __future__ import annotations

import json
import logging
import os
import threading
import types
import uuid

import boto3
import cv2
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from facehub.cloud import saver
from facehub.cloud.decoder import DecoderPool
from facehub.config import BrokerConfig, Config, SaverConfig
from facehub.messages import Face
from facehub.runtime import Runtime
from facehub.cloud.storage import FolderStore, face_key
from facehub.dev.servers import list_objects, make_bucket, wait_for

PREFIX = "run"


# -- helpers -----------------------------------------------------------------------------


def face_jpeg(photo, n: int = 0) -> bytes:
    """A real ~10 KB face-sized JPEG; ``n`` shifts the crop so faces differ."""
    x = n % 40
    ok, encoded = cv2.imencode(".jpg", photo[30:230, 40 + x:240 + x], [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return encoded.tobytes()


def make_face(photo, n: int = 0, device: str = "cam-1") -> Face:
    return Face(image=face_jpeg(photo, n), device_id=device, frame=n, box=(10, 20, 200, 200), score=0.9)


class Publisher:
    """A plain MQTT v5 client publishing whatever a test hands it, waiting for each PUBACK."""

    def __init__(self, broker):
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, props: Properties | None = None, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos, properties=props)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"publish to {topic[:40]!r} failed: {info.rc}"

    def face(self, face: Face, qos: int = 1) -> None:
        self.send(f"faces/{face.device_id}", face.image, face.properties(), qos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RunningSaver:
    """``saver.run`` in a thread with its own Runtime, as the supervisor would run it."""

    def __init__(self, config: Config, name: str = "saver-1"):
        self.heartbeat = types.SimpleNamespace(value=0.0)
        self.runtime = Runtime(name, heartbeat=self.heartbeat)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config,), name=name, daemon=True)
        self.thread.start()

    def _run(self, config):
        try:
            saver.run(config, self.runtime)
        except BaseException as error:  # surfaced by stop()
            self.error = error

    @property
    def stats(self):
        return self.runtime.stats

    def stop(self) -> None:
        self.runtime.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "saver did not stop"
        if self.error:
            raise self.error


def make_config(broker, url: str, endpoint_url: str = "", **saver) -> Config:
    options = dict(url=url, endpoint_url=endpoint_url, retry_min=0.1, retry_max=1.0, timeout=5.0)
    if endpoint_url:
        options.update(key="testing", secret="testing", region="us-east-1")
    options.update(saver)
    return Config(device_id="cloud", cloud=BrokerConfig(host=broker.host, port=broker.port),
                  saver=SaverConfig(**options)).validate()


def wait_subscribed(broker, publisher: Publisher, running: list[RunningSaver], timeout: float = 15) -> None:
    """Publish throw-away probes until every saver has rejected one, so the subscriptions exist.

    One probe at a time, each given a second to arrive, so no probe is still on its way when
    this returns (probes sent before the subscription existed are never delivered).
    """
    def probed():
        publisher.send("faces/probe", b"probe")
        try:
            wait_for(lambda: all(r.stats["rejected"] for r in running), 1.0)
            return True
        except TimeoutError:
            return False
    wait_for(probed, timeout, interval=0, message="savers subscribed")
    wait_for(lambda: all(r.stats["quarantined"] == r.stats["rejected"] for r in running), 10,
             message="probes quarantined")

def wait_stats(savers: "list[RunningSaver] | RunningSaver", predicate, timeout: float, what: str) -> None:
    """Wait until ``predicate(stats)`` holds (stats summed over savers); report the counters if not."""
    savers = savers if isinstance(savers, list) else [savers]

    def total():
        stats: dict[str, int] = {}
        for running in savers:
            for key, value in dict(running.stats).items():
                stats[key] = stats.get(key, 0) + value
        return stats
    try:
        wait_for(lambda: predicate(total()), timeout, interval=0.05, message=what)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; counters: {total()}") from None


def s3(endpoint_url: str):
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def face_objects(endpoint_url: str, bucket: str) -> set[str]:
    return {key for key in list_objects(endpoint_url, bucket, PREFIX + "/")
            if not key.startswith(f"{PREFIX}/quarantine/")}


@pytest.fixture
def publisher(broker):
    pub = Publisher(broker)
    yield pub
    pub.close()


@pytest.fixture
def stop_savers():
    running: list[RunningSaver] = []
    yield running
    for r in running:
        r.runtime.stop.set()
    for r in running:
        r.thread.join(30)


# -- storing -----------------------------------------------------------------------------


def test_faces_are_stored_at_their_keys_with_metadata(broker, moto, bucket, publisher, photo,
                                                      stop_savers):
    config = make_config(broker, f"s3://{bucket}/{PREFIX}", moto.endpoint_url)
    running = RunningSaver(config)
    stop_savers.append(running)
    wait_subscribed(broker, publisher, [running])

    faces = [make_face(photo, n, device=f"cam-{n % 3}") for n in range(30)]
    for face in faces:
        publisher.face(face)

    wait_stats(running, lambda s: s.get("stored") == 30, 30, "30 faces stored")
    assert face_objects(moto.endpoint_url, bucket) == {f"{PREFIX}/{face_key(f)}" for f in faces}
    client = s3(moto.endpoint_url)
    for face in faces[:5]:
        head = client.head_object(Bucket=bucket, Key=f"{PREFIX}/{face_key(face)}")
        assert head["Metadata"] == face.metadata()
        assert head["ContentType"] == "image/jpeg"
    body = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{face_key(faces[0])}")["Body"].read()
    assert body == faces[0].image
    running.stop()
    assert running.stats["duplicates"] == 0 and running.stats["store_errors"] == 0


def test_a_redelivered_face_is_stored_once(broker, moto, bucket, publisher, photo, stop_savers):
    running = RunningSaver(make_config(broker, f"s3://{bucket}/{PREFIX}", moto.endpoint_url))
    stop_savers.append(running)
    wait_subscribed(broker, publisher, [running])
    face = make_face(photo)

    publisher.face(face)
    publisher.face(face)

    wait_stats(running, lambda s: s.get("stored", 0) + s.get("duplicates", 0) == 2, 20, "both copies handled")
    assert (running.stats["stored"], running.stats["duplicates"]) == (1, 1)
    assert face_objects(moto.endpoint_url, bucket) == {f"{PREFIX}/{face_key(face)}"}


def test_folder_storage_writes_sidecars(broker, publisher, photo, tmp_path, stop_savers):
    out = tmp_path / "mount"
    running = RunningSaver(make_config(broker, f"file://{out}"))
    stop_savers.append(running)
    wait_subscribed(broker, publisher, [running])
    faces = [make_face(photo, n) for n in range(5)]
    for face in faces:
        publisher.face(face)

    wait_stats(running, lambda s: s.get("stored") == 5, 20, "5 faces stored")
    for face in faces:
        image = out / face_key(face)
        assert image.read_bytes() == face.image
        assert json.loads(image.with_suffix(".json").read_text())["face-id"] == face.face_id
    assert not [p for p in out.rglob("*.tmp")]


def test_faces_queued_while_the_saver_is_down_are_stored_after_restart(broker, moto, bucket, publisher,
                                                                       photo, stop_savers):
    config = make_config(broker, f"s3://{bucket}/{PREFIX}", moto.endpoint_url)
    first = RunningSaver(config)
    stop_savers.append(first)
    wait_subscribed(broker, publisher, [first])
    first.stop()

    faces = [make_face(photo, n) for n in range(10)]
    for face in faces:
        publisher.face(face)
    second = RunningSaver(config)  # same name, same client id, same persistent session
    stop_savers.append(second)

    wait_stats(second, lambda s: s.get("stored") == 10, 20, "queued faces stored")
    assert face_objects(moto.endpoint_url, bucket) == {f"{PREFIX}/{face_key(f)}" for f in faces}


# -- bad input ---------------------------------------------------------------------------


def props_for(face: Face, **changes: str | None) -> Properties:
    """The face's properties with some user properties changed (None removes one)."""
    meta = face.metadata()
    for key, value in changes.items():
        key = key.replace("_", "-")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = face.content_type
    props.UserProperty = list(meta.items())
    return props


def bad_messages(photo) -> list[tuple[str, str, bytes, Properties | None]]:
    """(label, topic, payload, properties) of messages a saver must reject but survive."""
    good = make_face(photo, 99)
    many = Properties(PacketTypes.PUBLISH)
    many.ContentType = "image/jpeg"
    many.UserProperty = list(good.metadata().items()) + [(f"x-{i}", "y" * 20) for i in range(5000)]
    wrong_type = Properties(PacketTypes.PUBLISH)
    wrong_type.ContentType = "text/plain"
    wrong_type.UserProperty = list(good.metadata().items())
    topic = f"faces/{good.device_id}"
    return [
        ("random bytes", topic, os.urandom(3000), good.properties()),
        ("random bytes, no properties", topic, os.urandom(500), None),
        ("truncated JPEG", topic, good.image[: len(good.image) // 2], good.properties()),
        ("JPEG header then junk", topic, good.image[:200] + os.urandom(2000) + b"\xff\xd9", good.properties()),
        ("no properties at all", topic, good.image, None),
        ("missing face id", topic, good.image, props_for(good, face_id=None)),
        ("missing capture time", topic, good.image, props_for(good, captured_ms=None)),
        ("capture time not a number", topic, good.image, props_for(good, captured_ms="yesterday")),
        ("capture time beyond year 9999", topic, good.image, props_for(good, captured_ms="9" * 19)),
        ("box of three numbers", topic, good.image, props_for(good, box="1,2,3")),
        ("score not finite", topic, good.image, props_for(good, score="nan")),
        ("face id with a path", topic, good.image, props_for(good, face_id="../../etc")),
        ("device disagrees with topic", topic, good.image, props_for(good, device="cam-2")),
        ("unsupported content type", topic, good.image, wrong_type),
        ("thousands of user properties", topic, good.image, many),
        ("dot-dot topic", "faces/../x", good.image, props_for(good, device=None)),
        ("dot-dot device", "faces/..", good.image, props_for(good, device=None)),
        ("nested topic", "faces/a/b", good.image, props_for(good, device=None)),
        ("bare prefix topic", "faces", good.image, props_for(good, device=None)),
        ("very long topic", "faces/" + "d" * 20000, good.image, props_for(good, device=None)),
        ("quarantine as a device", "faces/quarantine", good.image, props_for(good, device="quarantine")),
    ]


def test_bad_input_is_rejected_counted_and_quarantined_while_good_faces_are_stored(
        broker, moto, bucket, publisher, photo, stop_savers, caplog):
    config = make_config(broker, f"s3://{bucket}/{PREFIX}", moto.endpoint_url, max_bytes=50_000)
    running = RunningSaver(config)
    stop_savers.append(running)
    wait_subscribed(broker, publisher, [running])
    probes = running.stats["rejected"]
    bad = bad_messages(photo)
    good = []
    caplog.set_level(logging.WARNING, logger="facehub.cloud.saver")

    for n, (label, topic, payload, props) in enumerate(bad):
        publisher.send(topic, payload, props)
        face = make_face(photo, n)
        publisher.face(face)
        good.append(face)
    publisher.send("faces/cam-1", b"\xff\xd8\xff" + os.urandom(60_000), good[0].properties())  # oversize
    last = make_face(photo, 500)
    publisher.face(last)
    good.append(last)

    expected_rejected = probes + len(bad) + 1
    wait_stats(running, lambda s: s.get("stored") == len(good) and s.get("rejected") == expected_rejected
               and s.get("quarantined") == expected_rejected - 1, 30,
               f"{len(good)} stored, {expected_rejected} rejected, {expected_rejected - 1} quarantined")
    assert running.stats["oversize"] == 1
    assert face_objects(moto.endpoint_url, bucket) == {f"{PREFIX}/{face_key(f)}" for f in good}

    # Each bad message (and the probes, which are bad too) is kept with its reason.
    quarantine = list_objects(moto.endpoint_url, bucket, f"{PREFIX}/quarantine/")
    records = [json.loads(s3(moto.endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read())
               for key in quarantine if key.endswith(".json")]
    payloads = [key for key in quarantine if key.endswith(".bin")]
    kept_topics = [r["topic"] for r in records]
    assert len(payloads) == len(records) >= len(bad) + 1  # the probes are identical, so kept once
    for label, topic, payload, props in bad:
        assert topic in kept_topics, f"{label} not quarantined"
    assert all(r["reason"] for r in records)
    (thousands,) = [r for r in records if r["properties"].get("UserPropertyCount", 0) > 5000]
    assert thousands["reason"] == f"{thousands['properties']['UserPropertyCount']} user properties exceed limit of 64"
    truncated_payload = next(payload for label, _, payload, _ in bad if label == "truncated JPEG")
    (truncated,) = [r for r in records if r["reason"] == "JPEG is truncated (no end-of-image marker)"]
    assert truncated["size"] == len(truncated_payload)

    # One log line per rejection, with a reason and no traceback.
    rejected_lines = [r for r in caplog.records if r.name == "facehub.cloud.saver" and "rejected" in r.getMessage()]
    assert len(rejected_lines) >= len(bad)
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in rejected_lines)
    oversize_lines = [r for r in caplog.records if "oversize" in r.getMessage()]
    assert len(oversize_lines) == 1 and "exceeds limit of 50000" in oversize_lines[0].getMessage()
    running.stop()


# -- storage outage ----------------------------------------------------------------------


def test_storage_outage_stops_acks_retries_and_loses_nothing(broker, s3_server, s3_bucket, publisher, photo,
                                                             stop_savers):
    """moto keeps its objects in memory, so after the restart the bucket is created again and
    the test asserts that every face published during the outage is stored afterwards."""
    running = RunningSaver(make_config(broker, f"s3://{s3_bucket}/{PREFIX}", s3_server.endpoint_url,
                                       inflight=50))
    stop_savers.append(running)
    wait_subscribed(broker, publisher, [running])
    before = [make_face(photo, n) for n in range(5)]
    for face in before:
        publisher.face(face)
    wait_stats(running, lambda s: s.get("stored") == 5, 20, "faces before the outage stored")

    s3_server.stop()
    during = [make_face(photo, 100 + n) for n in range(80)]  # more than inflight: the broker must hold some
    for face in during:
        publisher.face(face)
    wait_stats(running, lambda s: s.get("store_errors", 0) >= 3, 30, "store errors while S3 is down")
    outage_beat = running.heartbeat.value
    wait_for(lambda: running.heartbeat.value > outage_beat, 5, message="heartbeat while retrying")
    assert running.stats["stored"] == 5
    assert running.runtime.gauges.get("unacked", 0) <= 50  # Receive Maximum holds the rest at the broker

    s3_server.start(timeout=30)
    make_bucket(s3_server.endpoint_url, s3_bucket)
    wait_stats(running, lambda s: s.get("stored") == 85, 60, "all faces stored after the outage")
    assert face_objects(s3_server.endpoint_url, s3_bucket) == {f"{PREFIX}/{face_key(f)}" for f in during}
    assert running.stats["duplicates"] == 0
    running.stop()


def test_faces_not_acknowledged_during_an_outage_reach_the_restarted_saver(broker, s3_server, s3_bucket,
                                                                          publisher, photo, stop_savers):
    """Proves the saver did not acknowledge what it could not store: a saver stopped mid-outage
    leaves the faces with the broker, and its successor (same client id) stores them."""
    config = make_config(broker, f"s3://{s3_bucket}/{PREFIX}", s3_server.endpoint_url)
    first = RunningSaver(config)
    stop_savers.append(first)
    wait_subscribed(broker, publisher, [first])
    s3_server.stop()
    faces = [make_face(photo, n) for n in range(12)]
    for face in faces:
        publisher.face(face)
    wait_stats(first, lambda s: s.get("store_errors", 0) >= 4, 30, "store errors while S3 is down")
    first.stop()
    assert first.stats["stored"] == 0

    s3_server.start(timeout=30)
    make_bucket(s3_server.endpoint_url, s3_bucket)
    second = RunningSaver(config)
    stop_savers.append(second)
    wait_stats(second, lambda s: s.get("stored") == 12, 30, "the faces left with the broker stored")
    assert face_objects(s3_server.endpoint_url, s3_bucket) == {f"{PREFIX}/{face_key(f)}" for f in faces}


# -- shared subscription -----------------------------------------------------------------


def test_two_savers_share_the_work_and_store_each_face_once(broker, moto, bucket, publisher, photo,
                                                            stop_savers):
    config = make_config(broker, f"s3://{bucket}/{PREFIX}", moto.endpoint_url)
    savers = [RunningSaver(config, "saver-1"), RunningSaver(config, "saver-2")]
    stop_savers.extend(savers)
    wait_subscribed(broker, publisher, savers)
    faces = [make_face(photo, n) for n in range(200)]
    for face in faces:
        publisher.face(face)

    wait_stats(savers, lambda s: s.get("stored") == 200, 60, "200 faces stored by the two savers")
    objects = face_objects(moto.endpoint_url, bucket)
    assert len(objects) == len({f.face_id for f in faces}) == 200
    assert objects == {f"{PREFIX}/{face_key(f)}" for f in faces}
    assert all(s.stats["stored"] > 0 for s in savers), "the shared subscription did not split the work"
    assert sum(s.stats["duplicates"] for s in savers) == 0


# -- pieces ------------------------------------------------------------------------------


def test_check_image_rejects_incomplete_images(photo):
    decoders = DecoderPool(1, 256 << 20, 10)
    check = lambda content_type, data: saver.check_image(content_type, data, 4096 * 4096, decoders)  # noqa: E731
    try:
        jpeg = face_jpeg(photo)
        check("image/jpeg", jpeg)
        ok, png = cv2.imencode(".png", photo[:64, :64])
        check("image/png", png.tobytes())
        ok, webp = cv2.imencode(".webp", photo[:64, :64])
        check("image/webp", webp.tobytes())
        for content_type, data in [("image/jpeg", jpeg[:-40]), ("image/jpeg", jpeg[:600] + b"\xff\xd9"),
                                   ("image/png", png.tobytes()[:-30]), ("image/webp", webp.tobytes()[:-10]),
                                   ("image/png", png.tobytes()[:16] + (10**5).to_bytes(4, "big") * 2
                                    + png.tobytes()[24:])]:
            with pytest.raises(saver.InvalidFace):
                check(content_type, data)
    finally:
        decoders.close()


class RecordingClient:
    """Stands in for paho's ``ack`` only, to check acknowledgement order."""

    def __init__(self):
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


def received(mid: int, connection: int, qos: int = 1) -> saver.Inbound:
    return saver.Inbound("faces/x", b"", None, mid, qos, connection, 0)


def test_acks_leave_in_arrival_order_and_only_on_their_connection():
    client = RecordingClient()
    acks = saver.AckQueue(client)
    acks.new_connection()
    first, second, third = received(1, 1), received(2, 1), received(3, 1)
    for message in (first, second, third):
        acks.add(message)
    acks.done(third)
    acks.done(second)
    assert client.acked == []  # the first is still being stored
    acks.done(first)
    assert client.acked == [1, 2, 3]

    old = received(4, 1)
    acks.add(old)
    acks.new_connection()  # the broker will redeliver 4; its id may be reused meanwhile
    fresh = received(4, 2)
    acks.add(fresh)
    acks.done(old)
    acks.done(fresh)
    assert client.acked == [1, 2, 3, 4] and len(acks) == 0


class BlockingStore(FolderStore):
    """A real folder store whose writes hang until released, like a dead NFS or FUSE mount."""

    def __init__(self, root):
        super().__init__(root, "quarantine")
        self.release = threading.Event()

    def put_face(self, face):
        self.release.wait(30)
        return super().put_face(face)


def test_a_hung_storage_call_is_reported_as_stuck(tmp_path, photo):
    config = make_config(types.SimpleNamespace(host="127.0.0.1", port=1883), str(tmp_path), workers=1)
    store = BlockingStore(tmp_path)
    runtime = Runtime("saver-1")
    worker = saver.Saver(config, runtime, store)
    worker.stuck_after = 0.3
    face = make_face(photo)
    worker.start_workers()
    worker.queue.put(saver.Inbound("faces/cam-1", face.image, face.properties(), 1, 1, 1, 0))

    wait_for(lambda: worker.stuck_for() > 0, 5, message="stuck storage call noticed")
    store.release.set()
    wait_for(lambda: runtime.stats["stored"] == 1, 5, message="face stored once released")
    assert worker.stuck_for() == 0
    worker.stop_workers(5)
