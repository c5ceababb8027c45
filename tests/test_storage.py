"""Storage: key layout, durable folder writes with sidecars, S3 objects with metadata, quarantine."""

from __future__ import annotations

import json

import boto3
import cv2
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from facehub.config import SaverConfig
from facehub.messages import Face
from facehub.cloud.storage import FolderStore, S3Store, face_key, open_store, properties_record
from facehub.files import write_atomic
from facehub.dev.servers import list_objects

CAPTURED_MS = 1_709_600_523_004  # 2024-03-05T01:02:03.004Z


@pytest.fixture(scope="module")
def jpeg(photo) -> bytes:
    """A real face-sized JPEG cut from a photo made by the test."""
    ok, encoded = cv2.imencode(".jpg", photo[40:200, 60:220], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def s3_config(moto, url: str, **kwargs) -> SaverConfig:
    return SaverConfig(url=url, endpoint_url=moto.endpoint_url, key="testing", secret="testing", **kwargs)


def make_face(jpeg: bytes, face_id: str = "f00d", **kwargs) -> Face:
    values = dict(image=jpeg, device_id="cam-1", face_id=face_id, captured_ms=CAPTURED_MS, frame=7,
                  box=(1, 2, 30, 40), score=0.875)
    values.update(kwargs)
    return Face(**values)


def s3_client(endpoint_url: str):
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_face_key_derives_from_device_capture_time_and_id(jpeg):
    assert face_key(make_face(jpeg)) == "cam-1/2024/03/05/010203.004-f00d.jpg"
    assert face_key(make_face(jpeg, content_type="image/png")).endswith("-f00d.png")
    # Same face, same key; another id at the same millisecond, another key.
    assert face_key(make_face(jpeg)) == face_key(make_face(jpeg, frame=99))
    assert face_key(make_face(jpeg, face_id="beef")) != face_key(make_face(jpeg))


def test_folder_store_writes_face_and_sidecar_once(tmp_path, jpeg):
    store = open_store(SaverConfig(url=str(tmp_path / "out")))
    face = make_face(jpeg)

    assert store.put_face(face) is True
    assert store.put_face(face) is False

    image = tmp_path / "out" / "cam-1/2024/03/05/010203.004-f00d.jpg"
    sidecar = image.with_suffix(".json")
    assert image.read_bytes() == jpeg
    assert json.loads(sidecar.read_text()) == dict(face.metadata(), **{"content-type": "image/jpeg"})
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
                   if p.is_file())
    assert files == ["cam-1/2024/03/05/010203.004-f00d.jpg", "cam-1/2024/03/05/010203.004-f00d.json"]


def test_a_face_whose_sidecar_was_lost_is_written_again(tmp_path, jpeg):
    """Power lost after the image's rename reached the disk but not the sidecar's (one folder fsync
    covers both, before the acknowledgement): the redelivered face is stored again, sidecar and all."""
    store = open_store(SaverConfig(url=str(tmp_path / "out")))
    face = make_face(jpeg)
    assert store.put_face(face) is True
    image = tmp_path / "out" / face_key(face)
    image.with_suffix(".json").unlink()
    assert store.put_face(face) is True
    assert json.loads(image.with_suffix(".json").read_text())["face-id"] == face.face_id
    assert image.read_bytes() == jpeg
    assert store.put_face(face) is False
    assert all((p.stat().st_mode & 0o777) == 0o700 for p in (tmp_path / "out").rglob("*") if p.is_dir())


def test_file_url_names_a_folder(tmp_path, jpeg):
    store = open_store(SaverConfig(url=f"file://{tmp_path}/mnt"))
    assert isinstance(store, FolderStore)
    assert store.put_face(make_face(jpeg))
    assert (tmp_path / "mnt" / face_key(make_face(jpeg))).read_bytes() == jpeg


def test_durable_write_leaves_nothing_behind_when_it_fails(tmp_path):
    target = tmp_path / "a" / "face.jpg"
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes", durable=True)  # type: ignore[arg-type]
    assert not target.exists()
    assert list((tmp_path / "a").iterdir()) == []


def test_folder_quarantine_keeps_payload_and_reason_once(tmp_path):
    store = open_store(SaverConfig(url=str(tmp_path), quarantine_prefix="bad"))
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "image/jpeg"
    props.UserProperty = [("face-id", "x")]

    assert store.put_quarantine("faces/a/b", b"\x00junk", "topic suffix 'a/b' is not a valid device id",
                                props, received_ms=CAPTURED_MS) is True
    assert store.put_quarantine("faces/a/b", b"\x00junk", "same message again", props,
                                received_ms=CAPTURED_MS) is False

    (payload,) = (tmp_path / "bad/2024/03/05").glob("*.bin")
    record = json.loads(payload.with_suffix(".json").read_text())
    assert payload.read_bytes() == b"\x00junk"
    assert record["reason"] == "topic suffix 'a/b' is not a valid device id"
    assert record["topic"] == "faces/a/b"
    assert record["size"] == 5
    assert record["properties"]["ContentType"] == "image/jpeg"
    assert record["properties"]["UserProperty"] == [["face-id", "x"]]


def test_quarantine_record_bounds_hostile_properties():
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [(f"k{i}", "v" * 5000) for i in range(3000)]
    record = properties_record(props)
    assert record["UserPropertyCount"] == 3000
    assert len(record["UserProperty"]) == 100
    assert all(len(value) < 1100 for _, value in record["UserProperty"])
    assert properties_record(None) == {}


def test_s3_store_puts_object_with_metadata_once(moto, bucket, jpeg):
    store = open_store(s3_config(moto, f"s3://{bucket}/site-a"))
    assert isinstance(store, S3Store)
    face = make_face(jpeg)

    assert store.put_face(face) is True
    assert store.put_face(face) is False

    assert list(list_objects(moto.endpoint_url, bucket)) == [f"site-a/{face_key(face)}"]
    head = s3_client(moto.endpoint_url).head_object(Bucket=bucket, Key=f"site-a/{face_key(face)}")
    assert head["Metadata"] == face.metadata()
    assert head["ContentType"] == "image/jpeg"
    assert head["ContentLength"] == len(jpeg)


def test_s3_store_without_conditional_writes_checks_before_writing(moto, bucket, jpeg):
    store = open_store(s3_config(moto, f"s3://{bucket}"))
    store.conditional = False  # as after a store answered 501 to If-None-Match
    face = make_face(jpeg, face_id="cafe")
    assert store.put_face(face) is True
    assert store.put_face(face) is False
    assert list(list_objects(moto.endpoint_url, bucket)) == [face_key(face)]


def test_s3_quarantine_writes_payload_and_record(moto, bucket):
    store = open_store(s3_config(moto, f"s3://{bucket}/p"))
    assert store.put_quarantine("faces/../x", b"random", "bad topic", None, received_ms=CAPTURED_MS)
    keys = sorted(list_objects(moto.endpoint_url, bucket))
    assert len(keys) == 2 and keys[0].startswith("p/quarantine/2024/03/05/")
    assert keys[0].endswith(".bin") and keys[1] == keys[0][:-4] + ".json"
    body = s3_client(moto.endpoint_url).get_object(Bucket=bucket, Key=keys[1])["Body"].read()
    assert json.loads(body)["reason"] == "bad topic"


def test_s3_store_raises_while_the_server_is_down(s3_server, s3_bucket, jpeg):
    store = open_store(SaverConfig(url=f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url, timeout=5))
    s3_server.stop()
    with pytest.raises(Exception):
        store.put_face(make_face(jpeg))


def test_other_fsspec_urls_get_sidecars(jpeg):
    store = open_store(SaverConfig(url="memory://facehub-test-store"))
    face = make_face(jpeg)
    assert store.put_face(face) and not store.put_face(face)
    stem = f"/facehub-test-store/{face_key(face)[:-4]}"
    assert store.fs.cat_file(stem + ".jpg") == jpeg
    assert json.loads(store.fs.cat_file(stem + ".json"))["face-id"] == "f00d"
    store.fs.rm("/facehub-test-store", recursive=True)

