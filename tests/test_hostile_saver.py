"""Hostile messages against the real ``facehub run cloud``: a real supervisor, real mosquitto, real storage.

A compromised or broken device sends what no detector would: image bombs, truncated
images made to look complete, bad properties, retained messages, floods at QoS 0 and
QoS 1, a message that kills the saver. For each the saver must store nothing as a
face, count what it did, survive without a restart (except where the test kills it
on purpose), stay small in memory, and store the next valid face.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import boto3
import cv2
import numpy as np
import pytest
from paho.mqtt.properties import Properties

import hostile_images as hi
from hostile_images import vm_hwm
from hostile_components import MARK
from test_saver import Publisher, bad_messages, make_face
from facehub.cloud import saver as saver_module
from facehub.cloud.decoder import Decoded, DecoderCrashed, DecoderUnavailable
from facehub.cloud.storage import FolderStore, face_key
from facehub.config import BrokerConfig, Config, SaverConfig, SupervisorConfig
from facehub.dev.servers import S3_ENV, list_objects, wait_for
from facehub.messages import Face
from facehub.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
MiB = 1024 * 1024
RSS_LIMIT = 400 * MiB


class Cloud:
    """``facehub run cloud`` as a process (or the test supervisor over other components), read
    through its status file: states, pids, restarts, and each saver's counters and gauges."""

    def __init__(self, tmp_path: Path, broker, url: str, env: dict[str, str] | None = None,
                 children: list[str] | None = None):
        self.state_dir = tmp_path / "state"
        self.log_path = tmp_path / "cloud.log"
        full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}",
                    "FACEHUB_CLOUD_HOST": broker.host, "FACEHUB_CLOUD_PORT": str(broker.port),
                    "FACEHUB_CLOUD_RECONNECT_MAX": "1",
                    "FACEHUB_SAVER_URL": url, "FACEHUB_SAVER_RETRY_MIN": "0.1", "FACEHUB_SAVER_RETRY_MAX": "0.5",
                    # the machine's own disk may be fuller than the default reserve; the volume test sets it
                    "FACEHUB_SAVER_QUARANTINE_RESERVE": "0",
                    "FACEHUB_SUPERVISOR_STATE_DIR": str(self.state_dir),
                    "FACEHUB_SUPERVISOR_STATUS_INTERVAL": "0.2", "FACEHUB_SUPERVISOR_BACKOFF_MIN": "0.2",
                    "FACEHUB_SUPERVISOR_BACKOFF_MAX": "0.5", **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        if children:
            self.role = "test"
            command = [sys.executable, str(TESTS / "facehub_supervised.py"), "run", "test", str(self.state_dir),
                       *children]
        else:
            self.role = "cloud"
            command = [sys.executable, "-m", "facehub.cli", "run", "cloud"]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, env=full_env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def status(self) -> dict:
        try:
            return json.loads((self.state_dir / f"supervisor-{self.role}.json").read_text())
        except (OSError, ValueError):
            return {}

    def children(self) -> dict:
        return self.status().get("children", {})

    def stats(self) -> dict:
        return self.status().get("stats", {})

    def counters(self) -> Counter:
        total: Counter = Counter()
        for data in self.stats().values():
            total.update(data.get("counters", {}))
        return total

    def gauges(self, name: str = "saver-1") -> dict:
        return self.stats().get(name, {}).get("gauges", {})

    def wait_ready(self, names: tuple[str, ...] = ("saver-1",), timeout: float = 60) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the supervisor exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            status = self.status()
            children, stats = status.get("children", {}), status.get("stats", {})
            return all(children.get(n, {}).get("state") == "RUNNING"
                       and stats.get(n, {}).get("pid") == children[n].get("pid")
                       and stats[n].get("gauges", {}).get("subscribed") for n in names)
        wait_for(ready, timeout, interval=0.1, message=f"{', '.join(names)} running and subscribed")

    def wait_counters(self, predicate, timeout: float, what: str) -> Counter:
        try:
            wait_for(lambda: predicate(self.counters()), timeout, interval=0.1, message=what)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; counters: "
                                 f"{dict(self.counters())}\n{self.output()[-3000:]}") from None
        return self.counters()

    def restarts(self) -> dict[str, int]:
        return {name: child["restarts"] for name, child in self.children().items()}

    def peak_rss(self) -> dict[str, int]:
        """VmHWM of every running saver process and of its decoder processes, bytes."""
        peaks = {}
        for name, child in self.children().items():
            peaks[name] = vm_hwm(child["pid"])
            for number, pid in enumerate(self.gauges(name).get("decoder_pids", []), 1):
                if Path(f"/proc/{pid}").exists():
                    peaks[f"{name} decoder {number}"] = vm_hwm(pid)
        return peaks

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def clouds():
    started: list[Cloud] = []
    yield started
    for cloud in started:
        cloud.kill()


@pytest.fixture
def publisher(broker):
    pub = Publisher(broker)
    yield pub
    pub.close()


def props(face: Face, content_type: str | None = None) -> Properties:
    result = face.properties()
    if content_type:
        result.ContentType = content_type
    return result


def garbage(size: int) -> bytes:
    """A JPEG start and end, then random bytes: refused as a JPEG with data after its end, never a bomb."""
    return b"\xff\xd8\xff\xd9" + os.urandom(size)


def face_files(root: Path) -> set[str]:
    """Every stored face (not a sidecar, not in quarantine), relative to the store."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] != "quarantine" and p.suffix != ".json"}


def quarantine_files(root: Path, suffix: str) -> list[Path]:
    return sorted((root / "quarantine").rglob(f"*{suffix}")) if (root / "quarantine").exists() else []


def report(title: str, cloud: Cloud) -> None:
    """The figures a run produced, printed for ``pytest -s``."""
    peaks = ", ".join(f"{name} {value / MiB:.0f} MiB" for name, value in sorted(cloud.peak_rss().items()))
    print(f"\n{title}: peak RSS {peaks}; counters {dict(sorted(cloud.counters().items()))}")


# -- bombs --------------------------------------------------------------------------------------


BOMBS = [
    ("progressive JPEG declaring 16384x16384", "image/jpeg", lambda im: hi.jpeg_bomb(im, 16384)),
    ("progressive JPEG declaring 32768x32768", "image/jpeg", lambda im: hi.jpeg_bomb(im, 32768)),
    ("baseline JPEG declaring 32768x32768", "image/jpeg", lambda im: hi.jpeg_bomb(im, 32768, progressive=False)),
    ("JPEG with a second frame of 30000x30000", "image/jpeg", lambda im: hi.jpeg_second_frame(im, 30000)),
    ("valid PNG of 16384x16384 black pixels", "image/png", lambda im: hi.png_bomb(16384)),
    ("PNG whose IHDR declares 100000x100000", "image/png",
     lambda im: hi.png_with_size(hi.png(im[:32, :32]), 100_000, 100_000)),
    ("lossless WebP declaring 16383x16383", "image/webp", lambda im: hi.webp_vp8l_bomb(im, 16383)),
    ("extended WebP of 16383x16383", "image/webp", lambda im: hi.webp_vp8x_bomb(im, 16383)),
    ("extended WebP canvas of 2^24 x 2^24", "image/webp", lambda im: hi.webp_vp8x_canvas_bomb(im)),
]


def test_bombs_are_refused_unopened_and_kept_without_their_payload(broker, moto, bucket, publisher, photo,
                                                                   clouds, tmp_path, monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    cloud = Cloud(tmp_path, broker, f"s3://{bucket}/hostile",
                  env={"FACEHUB_SAVER_ENDPOINT_URL": moto.endpoint_url, "FACEHUB_SAVER_INSTANCES": "2"})
    clouds.append(cloud)
    cloud.wait_ready(("saver-1", "saver-2"))

    for number, (label, content_type, make) in enumerate(BOMBS, 1):
        face = make_face(photo, number)
        publisher.send(f"faces/{face.device_id}", make(photo), props(face, content_type))
        cloud.wait_counters(lambda c, n=number: c["bombs"] == n and c["quarantined"] == n, 30,
                            f"{label} refused and its record kept")
    valid = make_face(photo, 100)
    publisher.face(valid)
    counters = cloud.wait_counters(lambda c: c["stored"] == 1, 30, "the valid face after the bombs stored")

    objects = list_objects(moto.endpoint_url, bucket, "hostile/")
    assert {key for key in objects if not key.startswith("hostile/quarantine/")} == {f"hostile/{face_key(valid)}"}
    quarantine = sorted(key for key in objects if key.startswith("hostile/quarantine/"))
    assert len(quarantine) == len(BOMBS) and all(key.endswith(".json") for key in quarantine), quarantine
    s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
    records = [json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()) for key in quarantine]
    assert all(r["payload"]["kept"] is False and "over the limit of 16777216" in r["reason"] for r in records)
    assert counters["quarantined"] == len(BOMBS) and counters["decoder_crashes"] == 0
    assert cloud.restarts() == {"saver-1": 0, "saver-2": 0}
    peaks = cloud.peak_rss()
    report("bombs", cloud)
    assert all(peak < RSS_LIMIT for peak in peaks.values()), peaks
    assert cloud.stop() == 0


# -- broken images and bad properties -----------------------------------------------------------


def broken_images(photo) -> list[tuple[str, str, bytes]]:
    crop = photo[30:230, 40:240]
    jpeg, progressive, png = hi.jpeg(crop), hi.jpeg(crop, progressive=True), hi.png(crop)
    webp = hi.webp(crop)
    idat = png.index(b"IDAT")
    return [
        ("truncated JPEG", "image/jpeg", jpeg[: len(jpeg) // 2]),
        ("truncated JPEG with FF D9 appended", "image/jpeg", hi.truncated_with_eoi(jpeg)),
        ("truncated progressive JPEG with FF D9 appended", "image/jpeg", hi.truncated_with_eoi(progressive)),
        ("JPEG with its scan data overwritten", "image/jpeg",
         jpeg[: len(jpeg) // 3] + bytes(len(jpeg) // 3) + jpeg[2 * (len(jpeg) // 3):]),
        ("JPEG with junk after its end", "image/jpeg", jpeg + os.urandom(500)),
        ("truncated PNG", "image/png", png[: len(png) // 2]),
        ("PNG with a damaged CRC", "image/png", png[:idat + 8] + bytes([png[idat + 8] ^ 0xFF]) + png[idat + 9:]),
        ("truncated WebP", "image/webp", webp[: len(webp) // 2]),
        ("truncated WebP with its RIFF size made to agree", "image/webp", hi.truncated_webp(webp)),
        ("PNG labelled as JPEG", "image/jpeg", png),
    ]


def test_broken_images_and_bad_properties_are_refused(broker, publisher, photo, clouds, tmp_path):
    store = tmp_path / "faces"
    cloud = Cloud(tmp_path, broker, str(store))
    clouds.append(cloud)
    cloud.wait_ready()

    broken = broken_images(photo)
    for number, (label, content_type, payload) in enumerate(broken, 1):
        face = make_face(photo, number)
        publisher.send(f"faces/{face.device_id}", payload, props(face, content_type))
        cloud.wait_counters(lambda c, n=number: c["rejected"] == n and c["quarantined"] == n, 30,
                            f"{label} refused and quarantined")
    bad = bad_messages(photo)
    for number, (label, topic, payload, properties) in enumerate(bad, len(broken) + 1):
        publisher.send(topic, payload, properties)
        cloud.wait_counters(lambda c, n=number: c["rejected"] == n and c["quarantined"] == n, 30,
                            f"{label} refused and quarantined")
    valid = make_face(photo, 100)
    publisher.face(valid)
    counters = cloud.wait_counters(lambda c: c["stored"] == 1, 30, "the valid face afterwards stored")

    assert face_files(store) == {face_key(valid)}
    records = [json.loads(path.read_text()) for path in quarantine_files(store, ".json")]
    reasons = [r["reason"] for r in records]
    assert len(records) == len(broken) + len(bad)
    assert sum("Corrupt JPEG data" in r or "Premature end of JPEG" in r for r in reasons) >= 3, reasons
    assert len(quarantine_files(store, ".bin")) == len(records)  # harmless payloads are kept
    assert counters["bombs"] == 0 and counters["poison"] == 0
    assert cloud.restarts() == {"saver-1": 0}
    report("broken images and bad properties", cloud)
    assert all(peak < RSS_LIMIT for peak in cloud.peak_rss().values())
    assert cloud.stop() == 0


# -- retained messages --------------------------------------------------------------------------


def test_retained_faces_are_refused_once_and_never_replayed(broker, photo, clouds, tmp_path):
    store = tmp_path / "faces"
    early = make_face(photo, 1)
    publisher = Publisher(broker)
    publisher.client.publish(f"faces/{early.device_id}", early.image, qos=1, retain=True,
                             properties=early.properties()).wait_for_publish(10)
    # One worker: messages are handled in arrival order, so a retained message replayed at the
    # resubscription would be counted before the face sent after it is stored.
    cloud = Cloud(tmp_path, broker, str(store), env={"FACEHUB_SAVER_WORKERS": "1"})
    clouds.append(cloud)
    cloud.wait_ready()

    first = make_face(photo, 2)
    publisher.face(first)
    cloud.wait_counters(lambda c: c["stored"] == 1, 30, "a face stored")
    assert cloud.counters()["retained"] == 0  # the retained face from before was not even delivered

    live = make_face(photo, 3)
    publisher.client.publish(f"faces/{live.device_id}", live.image, qos=1, retain=True,
                             properties=live.properties()).wait_for_publish(10)
    cloud.wait_counters(lambda c: c["retained"] == 1 and c["quarantined"] == 1, 30,
                        "the retained face refused and quarantined")
    publisher.close()

    broker.stop()  # every saver reconnects and subscribes again: a retained message would come back now
    broker.start()
    publisher = Publisher(broker)
    after: list[Face] = []
    try:
        # This mosquitto does not restore a shared subscription from its persistence file, so a face
        # published before the saver has subscribed again reaches no one: send until one is stored.
        def one_stored_after_the_reconnect() -> bool:
            after.append(make_face(photo, 4 + len(after)))
            publisher.face(after[-1])
            try:
                cloud.wait_counters(lambda c: c["stored"] >= 2, 2, "a face stored after the reconnect")
            except AssertionError:
                return False
            return True
        wait_for(one_stored_after_the_reconnect, 60, interval=0, message="a face stored after the reconnect")
    finally:
        publisher.close()

    counters = cloud.counters()
    assert counters["retained"] == 1 and counters["quarantined"] == 1 and counters["rejected"] == 1
    stored = face_files(store)
    assert face_key(first) in stored and stored <= {face_key(first)} | {face_key(f) for f in after}
    assert face_key(early) not in stored and face_key(live) not in stored
    (record,) = [json.loads(p.read_text()) for p in quarantine_files(store, ".json")]
    assert record["reason"].startswith("retained message")
    assert cloud.restarts() == {"saver-1": 0}
    assert cloud.stop() == 0


# -- floods -------------------------------------------------------------------------------------


def big_jpeg(size: int = 1_000_000) -> bytes:
    """A valid noisy JPEG of about ``size`` bytes."""
    side = int((size / 2.4) ** 0.5)
    noise = np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    return data.tobytes()


def test_a_qos0_flood_is_held_to_the_queue_bound_and_counted(broker, publisher, photo, clouds, tmp_path):
    """Storage for device 'flood' is blocked (a file where its folder must go), so the one worker
    hangs on the first face and every QoS 0 face after it waits in memory, up to the bound."""
    store = tmp_path / "faces"
    store.mkdir()
    (store / "flood").write_text("not a folder")
    queue_bytes = 8_000_000
    cloud = Cloud(tmp_path, broker, str(store), env={"FACEHUB_SAVER_WORKERS": "1", "FACEHUB_SAVER_QUEUE_SIZE": "20",
                                                     "FACEHUB_SAVER_QUEUE_BYTES": str(queue_bytes)})
    clouds.append(cloud)
    cloud.wait_ready()
    image = big_jpeg()
    faces = [Face(image=image, device_id="flood", frame=n) for n in range(301)]

    publisher.face(faces[0], qos=0)
    cloud.wait_counters(lambda c: c["store_errors"] >= 1, 30, "the worker stuck on blocked storage")
    before = vm_hwm(cloud.children()["saver-1"]["pid"])
    for face in faces[1:]:
        publisher.face(face, qos=0)
    waiting = queue_bytes // len(image)  # fewer than queue_size: the byte bound binds first
    dropped = len(faces) - 1 - waiting
    cloud.wait_counters(lambda c: c["dropped_qos0"] == dropped, 60, f"{dropped} QoS 0 faces dropped")
    assert cloud.gauges()["queue_bytes"] <= queue_bytes
    grown = vm_hwm(cloud.children()["saver-1"]["pid"]) - before

    (store / "flood").unlink()
    counters = cloud.wait_counters(lambda c: c["stored"] == 1 + waiting, 60, "the faces that waited stored")
    assert counters["dropped_qos0"] == dropped and counters["rejected"] == 0
    assert len(face_files(store)) == 1 + waiting
    assert cloud.restarts() == {"saver-1": 0}
    report(f"QoS 0 flood of {len(faces) - 1} faces of {len(image)} bytes (saver grew {grown / MiB:.0f} MiB)", cloud)
    assert grown < 100 * MiB, f"the saver grew by {grown / MiB:.0f} MiB during a {len(faces) * len(image) / MiB:.0f} " \
                              "MiB flood"
    assert all(peak < RSS_LIMIT for peak in cloud.peak_rss().values())
    assert "dropped" in cloud.output() and cloud.output().count("QoS 0 messages (in-memory queue full)") <= 2
    assert cloud.stop() == 0


def test_a_qos1_flood_of_garbage_fills_only_its_device_quota(broker, publisher, photo, clouds, tmp_path):
    store = tmp_path / "faces"
    cloud = Cloud(tmp_path, broker, str(store), env={"FACEHUB_SAVER_QUARANTINE_MAX_MESSAGES": "25",
                                                     "FACEHUB_SAVER_QUARANTINE_RATE": "0"})
    clouds.append(cloud)
    cloud.wait_ready()
    sent = 300
    for number in range(sent):
        face = make_face(photo, number, device="noisy")
        publisher.send("faces/noisy", garbage(20_000), face.properties())
    cloud.wait_counters(lambda c: c["rejected"] == sent, 60, f"{sent} garbage messages refused")
    counters = cloud.counters()
    assert (counters["quarantined"], counters["quarantine_dropped"]) == (25, sent - 25)
    assert len(quarantine_files(store, ".bin")) == 25
    wait_for(lambda: cloud.gauges().get("quarantine_devices_over_quota") == 1, 10,
             message="one device reported over its quota")
    assert cloud.gauges()["quarantine_full"] is False  # one device's quota is not the quarantine's

    other = make_face(photo, 1, device="other-cam")
    publisher.send("faces/other-cam", garbage(1000), other.properties())
    valid = make_face(photo, 2, device="noisy")  # a device over its quarantine quota still has its faces stored
    publisher.face(valid)
    counters = cloud.wait_counters(lambda c: c["stored"] == 1 and c["quarantined"] == 26, 30,
                                   "another device quarantined, the valid face stored")
    assert face_files(store) == {face_key(valid)}
    output = cloud.output()
    assert output.count("rejected message on") == 26  # one line per copy kept ...
    assert output.count("quarantine copies of rejected messages") <= 2  # ... and the drops summarised
    assert cloud.restarts() == {"saver-1": 0}
    assert cloud.stop() == 0


@pytest.fixture
def small_volume(tmp_path):
    """A 20 MB tmpfs, as full as a small disk gets; needs root (mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small volume needs root")
    mount = tmp_path / "volume"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_garbage_from_many_devices_leaves_a_small_volume_room_for_faces(broker, publisher, photo, clouds,
                                                                       tmp_path, small_volume):
    cloud = Cloud(tmp_path, broker, str(small_volume), env={"FACEHUB_SAVER_QUARANTINE_RESERVE": "0.25"})
    clouds.append(cloud)
    cloud.wait_ready()
    sent = 150
    for number in range(sent):  # one message per device: no device quota applies, only the volume's reserve
        face = make_face(photo, number, device=f"bad-{number}")
        publisher.send(f"faces/bad-{number}", garbage(130_000), face.properties())
    counters = cloud.wait_counters(lambda c: c["rejected"] == sent, 60, f"{sent} garbage messages refused")
    assert counters["quarantine_dropped"] > 0 and counters["quarantined"] + counters["quarantine_dropped"] == sent
    wait_for(lambda: cloud.gauges().get("quarantine_full") is True
             and cloud.gauges().get("quarantine_failing_since"), 10, message="quarantine reported full")

    faces = [make_face(photo, n) for n in range(20)]
    for face in faces:
        publisher.face(face)
    counters = cloud.wait_counters(lambda c: c["stored"] == len(faces), 60, "every valid face stored")
    assert counters["store_errors"] == 0
    assert face_files(small_volume) == {face_key(f) for f in faces}
    usage = os.statvfs(small_volume)
    print(f"\nsmall volume: {counters['quarantined']} copies kept, {counters['quarantine_dropped']} dropped, "
          f"{usage.f_bavail * usage.f_frsize / MiB:.1f} MiB of {usage.f_blocks * usage.f_frsize / MiB:.0f} free")
    assert cloud.restarts() == {"saver-1": 0}
    assert cloud.stop() == 0


# -- a message that kills the saver -------------------------------------------------------------


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The JPEG with a comment segment (COM) right after its start marker."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def test_a_message_that_kills_the_saver_is_quarantined_after_max_attempts(broker, publisher, photo, clouds,
                                                                          tmp_path):
    """Each life of the saver is killed (SIGKILL) by the marked message; the broker redelivers it to
    the next life from the persistent session, and the attempt records stop the loop after three.
    The faces published right behind it, checked beside it or queued when it struck, are all stored:
    none of them is taken for the poison."""
    store = tmp_path / "faces"
    cloud = Cloud(tmp_path, broker, str(store), children=["saver-1=hostile_components:killed_by_mark"],
                  env={"FACEHUB_SAVER_MAX_ATTEMPTS": "3", "FACEHUB_SUPERVISOR_MAX_RESTARTS": "5"})
    clouds.append(cloud)
    cloud.wait_ready()
    poison = make_face(photo, 1)
    publisher.send(f"faces/{poison.device_id}", with_comment(poison.image, MARK), poison.properties())
    behind = [make_face(photo, number) for number in range(10, 20)]
    for face in behind:
        publisher.face(face)

    wait_for(lambda: cloud.restarts().get("saver-1") == 3, 120, interval=0.1, message="three lives killed")
    cloud.wait_ready()
    counters = cloud.wait_counters(lambda c: c["poison"] == 1 and c["quarantined"] == 1, 60,
                                   "the message quarantined by the fourth life")
    wait_for(lambda: face_files(store) == {face_key(f) for f in behind}, 30,
             message="every face behind the poison stored")
    valid = make_face(photo, 2)
    publisher.face(valid)
    wait_for(lambda: face_key(valid) in face_files(store), 30, message="a valid face stored afterwards")

    (record,) = [json.loads(p.read_text()) for p in quarantine_files(store, ".json")]
    assert "crashed or timed out on this message 3 times" in record["reason"]
    assert record["payload"]["kept"] is False and not quarantine_files(store, ".bin")
    assert face_files(store) == {face_key(f) for f in behind + [valid]}
    assert cloud.restarts() == {"saver-1": 3} and cloud.children()["saver-1"]["state"] == "RUNNING"
    assert not list((cloud.state_dir / "saver-attempts").iterdir())  # no record left behind
    assert counters["rejected"] == 1
    assert cloud.stop() == 0


# -- the saver's own bookkeeping, in one process ------------------------------------------------


class CrashingDecoders:
    """Stands in for the decoder pool: every decode ends as if the decoder died."""

    def __init__(self):
        self.calls = 0

    def decode(self, content_type, data):
        self.calls += 1
        raise DecoderCrashed("decoder was killed by SIGSEGV before its answer")

    def pids(self):
        return []

    def close(self):
        pass


class StartingDecoders:
    """Stands in for the decoder pool: no decoder can be started ``failures`` times, then images decode."""

    def __init__(self, failures: int):
        self.failures = failures
        self.answers = 0

    def decode(self, content_type, data):
        if self.failures:
            self.failures -= 1
            raise DecoderUnavailable("cannot start a decoder: [Errno 11] Resource temporarily unavailable")
        self.answers += 1
        return Decoded(200, 200) if content_type != "image/jpeg" else Decoded(25, 25)

    def pids(self):
        return []

    def close(self):
        pass


def local_saver(tmp_path, decoders=None, **options) -> saver_module.Saver:
    options = {"quarantine_reserve": 0.0, **options}
    config = Config(device_id="cloud", cloud=BrokerConfig(),
                    saver=SaverConfig(url=str(tmp_path / "faces"), retry_min=0.01, retry_max=0.05, **options),
                    supervisor=SupervisorConfig(state_dir=str(tmp_path / "state"))).validate()
    store = FolderStore(tmp_path / "faces", "quarantine", config.saver.quarantine_reserve)
    return saver_module.Saver(config, Runtime("saver-1"), store, decoders=decoders)


def received(face: Face, payload: bytes | None = None, qos: int = 1, retain: bool = False,
             dup: bool = False) -> saver_module.Inbound:
    return saver_module.Inbound(f"faces/{face.device_id}", face.image if payload is None else payload,
                                 face.properties(), 1, qos, 1, 0, retain=retain, dup=dup)


def test_a_message_that_keeps_crashing_the_decoder_is_quarantined_without_its_payload(tmp_path, photo):
    decoders = CrashingDecoders()
    worker = local_saver(tmp_path, decoders, max_attempts=3)
    face = make_face(photo)
    worker.handle(received(face))
    assert decoders.calls == 3
    assert worker.runtime.stats["poison"] == 1 and worker.runtime.stats["decoder_crashes"] == 3
    (record,) = [json.loads(p.read_text()) for p in quarantine_files(tmp_path / "faces", ".json")]
    assert "crashed or timed out the image decoder 3 times" in record["reason"]
    assert record["payload"] == {"kept": False, "sha256": record["payload"]["sha256"],
                                 "head": face.image[:64].hex()}
    assert not list((tmp_path / "state" / "saver-attempts").iterdir())


def test_attempts_stop_before_the_supervisor_gives_up(tmp_path):
    config = Config(saver=SaverConfig(url=str(tmp_path / "faces"), max_attempts=6),
                    supervisor=SupervisorConfig(state_dir=str(tmp_path / "state"), max_restarts=2)).validate()
    worker = saver_module.Saver(config, Runtime("saver-1"), FolderStore(tmp_path / "faces", "quarantine"),
                                decoders=CrashingDecoders())
    assert worker.max_attempts == 2


def test_attempts_survive_the_saver(tmp_path, photo):
    """A record left by a life that died (two attempts so far) makes the next life try once more, then give up."""
    decoders = CrashingDecoders()
    worker = local_saver(tmp_path, decoders, max_attempts=3)
    face = make_face(photo)
    digest = saver_module.message_digest(f"faces/{face.device_id}", face.image, face.properties())
    worker.ledger.attempt(digest)
    worker.ledger.attempt(digest)
    worker.handle(received(face, dup=True))  # the broker redelivers it to the next life, marked DUP
    assert decoders.calls == 1 and worker.runtime.stats["poison"] == 1


def test_a_redelivery_counts_its_first_delivery(tmp_path, photo):
    """A first delivery leaves no record; if it killed the saver, its redelivery (DUP) counts it."""
    decoders = CrashingDecoders()
    worker = local_saver(tmp_path, decoders, max_attempts=2)
    face = make_face(photo)
    worker.handle(received(face, dup=True))  # attempt 2 of 2 (the first delivery died with the saver)
    assert decoders.calls == 1 and worker.runtime.stats["poison"] == 1
    assert not list((tmp_path / "state" / "saver-attempts").iterdir())


def test_faces_checked_once_leave_no_record_and_redeliveries_clear_theirs(tmp_path, photo):
    worker = local_saver(tmp_path, StartingDecoders(failures=0))
    attempts = tmp_path / "state" / "saver-attempts"
    first, again = make_face(photo, 1), make_face(photo, 2)
    digest = saver_module.message_digest(f"faces/{again.device_id}", again.image, again.properties())
    worker.ledger.attempt(digest)  # a life died while checking it once
    worker.handle(received(first))
    worker.handle(received(again, dup=True))
    assert worker.runtime.stats["stored"] == 2 and worker.runtime.stats["poison"] == 0
    assert face_files(tmp_path / "faces") == {face_key(first), face_key(again)}
    assert not list(attempts.iterdir())


def test_retained_messages_are_quarantined_once(tmp_path, photo):
    worker = local_saver(tmp_path)
    try:
        face = make_face(photo)
        for _ in range(3):
            worker.handle(received(face, retain=True))
        stats = worker.runtime.stats
        assert (stats["retained"], stats["rejected"], stats["quarantined"], stats["stored"]) == (3, 3, 1, 0)
        assert not face_files(tmp_path / "faces")
    finally:
        worker.stop_workers(5)


def test_the_queue_refuses_qos0_beyond_its_bounds_but_never_qos1(tmp_path, photo):
    worker = local_saver(tmp_path, CrashingDecoders(), queue_size=3, queue_bytes=20_000, max_bytes=10_000)
    face = make_face(photo)

    def offer(message) -> bool:  # as the network thread does: admit, then queue
        if not worker.admit(message):
            return False
        worker.queue.put(message)
        return True

    small = received(face, payload=b"x" * 1000, qos=0)
    assert [offer(small) for _ in range(5)] == [True, True, True, False, False]  # the count bound
    assert offer(received(face, payload=b"x" * 1000, qos=1))  # QoS 1: bounded by the broker instead
    while not worker.queue.empty():
        worker.queue.get()
    worker.queued_bytes = 0
    big = received(face, payload=b"x" * 9000, qos=0)
    assert [offer(big) for _ in range(3)] == [True, True, False]  # the byte bound


def test_a_failing_quarantine_is_given_up_counted_and_reported(tmp_path, photo):
    worker = local_saver(tmp_path, CrashingDecoders())
    (tmp_path / "faces" / "quarantine").write_text("a file where the folder must go")
    face = make_face(photo)
    worker.handle(received(face, payload=b"\xff\xd8\xff garbage"))
    stats = worker.runtime.stats
    assert (stats["rejected"], stats["quarantined"], stats["quarantine_dropped"]) == (1, 0, 1)
    assert stats["store_errors"] == saver_module.QUARANTINE_TRIES
    worker.report()
    gauges = worker.runtime.gauges
    assert gauges["quarantine_full"] is True and gauges["quarantine_failing_since"] is not None
    assert gauges["store_failing_since"] is None

    (tmp_path / "faces" / "quarantine").unlink()
    worker.handle(received(face, payload=b"\xff\xd8\xff other garbage"))
    worker.report()
    assert worker.runtime.gauges["quarantine_full"] is False
    assert worker.runtime.gauges["quarantine_failing_since"] is None


def test_no_decoder_is_an_outage_not_the_messages_fault(tmp_path, photo):
    """Faces wait (unacknowledged) while no decoder can be started, and are stored once one can."""
    decoders = StartingDecoders(failures=4)
    worker = local_saver(tmp_path, decoders, max_attempts=3)
    face = make_face(photo)
    seen: list = []
    original = worker.runtime.count

    def count(key, amount=1):  # the gauge as health would see it while decoders are failing
        if key == "decoder_unavailable":
            worker.report()
            seen.append(worker.runtime.gauges["decoder_failing_since"])
        original(key, amount)
    worker.runtime.count = count
    worker.handle(received(face))
    stats = worker.runtime.stats
    assert (stats["stored"], stats["decoder_unavailable"], stats["poison"], stats["rejected"]) == (1, 4, 0, 0)
    assert len(seen) == 4 and all(seen)  # failing from the first failure on
    worker.report()
    assert worker.runtime.gauges["decoder_failing_since"] is None
    assert face_files(tmp_path / "faces") == {face_key(face)}
