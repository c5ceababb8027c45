"""What a compromised (or buggy) device can try against the cloud broker the role configures, and what it gets.

Each test runs the real broker (tests/locked_broker.py: the role's mosquitto.conf and
dynamic-security.json, Debian's mosquitto, TLS) and plays cam-1 as the attacker with its own
valid account. The attacks: receive other devices' faces (a direct subscription, or joining the
savers' shared subscription so that the broker hands it a share of the faces and drops them),
take over the saver's or another device's client id (which would end its connection and
destroy its queued faces), publish retained faces, publish as another device. The last test
runs the real forwarder and the real savers through the same broker while cam-1 attacks.

Waits poll with deadlines; "nothing arrived" is checked after a round trip on the same
connection (its SUBACK leaves the broker after anything queued before it).
"""

from __future__ import annotations

import threading
import types

import pytest

from facehub.dev.servers import wait_for
from locked_broker import (PASSWORDS, READER, SAVER_PASSWORD, SAVERS, SHARE, Session, available, device_client_id,
                           start_locked_broker)

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "ok")

FACES = 20


@pytest.fixture
def cloud(tmp_path):
    broker = start_locked_broker(tmp_path / "broker")
    yield broker
    broker.kill()


@pytest.fixture
def connect(cloud):
    """connect(username, password, client_id, persistent=False) -> Session, closed at the end."""
    opened: list[Session] = []

    def open_session(username: str, password: str, client_id: str, persistent: bool = False,
                     will_retain: bool | None = None) -> Session:
        session = Session(cloud.port, cloud.ca_file, username, password, client_id=client_id, persistent=persistent)
        if will_retain is not None:
            session.client.will_set(f"facehub/{username}/status", b"offline", qos=1, retain=will_retain)
        opened.append(session)
        return session.connect()

    yield open_session
    for session in opened:
        session.close()


def as_device(connect, name: str, client_id: str | None = None, **kwargs) -> Session:
    return connect(name, PASSWORDS[name], client_id or device_client_id(name), **kwargs)


def as_saver(connect, number: int = 1, **kwargs) -> Session:
    return connect(SAVERS[number - 1], SAVER_PASSWORD, SAVERS[number - 1], **kwargs)


def refused(code) -> bool:
    return code.getName() == "Not authorized"


def publish_faces(camera: Session, count: int = FACES, device: str = "cam-2") -> list[bytes]:
    """``count`` faces on the device's topic, each PUBACKed with success (so a forwarder would delete them)."""
    payloads = [f"{device}-face-{n:03d}".encode() for n in range(count)]
    for payload in payloads:
        code = camera.publish(f"faces/{device}", payload)
        assert code.value == 0, f"{payload!r}: PUBACK {code}"
    return payloads


# -- receiving what is not yours ----------------------------------------------------------------


def test_a_device_cannot_subscribe_to_any_face(connect):
    snoop = as_device(connect, "cam-1")
    for topic in ("faces/#", "faces/cam-2", "faces/+", "#", "+/+", SHARE, "$share/savers/faces/cam-2",
                  "$share/snoop/faces/#", "$share/savers/#", "$SYS/#", "$CONTROL/#"):
        assert [code.getName() for code in snoop.subscribe(topic)] == ["Not authorized"], topic
    collector = as_saver(connect)
    assert not collector.subscribe(SHARE)[0].is_failure
    camera = as_device(connect, "cam-2")
    sent = publish_faces(camera, 3)
    collector.wait(lambda: collector.payloads() == sent, "the faces at the saver")
    snoop.round_trip()
    assert snoop.messages == []


def test_joining_the_savers_group_swallows_no_face(connect):
    """The attack that worked: cam-1 in $share/savers got half of cam-2's faces, and the broker dropped them."""
    savers = [as_saver(connect, 1), as_saver(connect, 2)]
    for saver in savers:
        assert not saver.subscribe(SHARE)[0].is_failure
    attacker = as_device(connect, "cam-1")
    assert refused(attacker.subscribe(SHARE)[0])
    assert refused(attacker.subscribe("$share/savers/faces/cam-2")[0])
    sent = publish_faces(as_device(connect, "cam-2"))

    def stored() -> list[bytes]:
        return sorted(payload for saver in savers for payload in saver.payloads())
    savers[0].wait(lambda: len(stored()) >= FACES, f"{FACES} faces at the savers", timeout=20)
    assert stored() == sorted(sent), "a face was lost or delivered twice"
    attacker.round_trip()
    assert attacker.messages == []


# -- taking over a session -------------------------------------------------------------------


def test_a_device_cannot_take_over_the_savers_session_and_its_queued_faces(connect):
    """The attack that worked: cam-1 connected as facehub-saver-1 and the faces queued for the saver were gone."""
    saver = as_saver(connect, 1, persistent=True)
    assert not saver.subscribe(SHARE)[0].is_failure
    saver.close()  # away (a restart, an S3 outage): the broker queues its faces in its session
    sent = publish_faces(as_device(connect, "cam-2"))

    attempts = [
        ("cam-1", PASSWORDS["cam-1"], SAVERS[0], False),  # its own account, the saver's client id
        ("cam-1", PASSWORDS["cam-1"], SAVERS[0], True),  # the same, resuming the session
        (SAVERS[0], PASSWORDS["cam-1"], SAVERS[0], False),  # the saver's account, a wrong password
        (SAVERS[1], PASSWORDS["cam-1"], SAVERS[0], True),
    ]
    for username, password, client_id, persistent in attempts:
        intruder = connect(username, password, client_id, persistent=persistent)
        assert not intruder.accepted, f"{username} got in as {client_id}"
        assert refused(intruder.connect_reason)

    back = as_saver(connect, 1, persistent=True)
    assert back.accepted and back.session_present, "the saver's session did not survive"
    back.wait(lambda: len(back.payloads()) >= FACES, f"{FACES} queued faces", timeout=20)
    assert sorted(back.payloads()) == sorted(sent)


def test_no_account_can_displace_a_connected_saver_or_device(connect):
    saver = as_saver(connect, 1, persistent=True)
    assert not saver.subscribe(SHARE)[0].is_failure
    victim = as_device(connect, "cam-2")
    for client_id in (SAVERS[0], device_client_id("cam-2")):
        assert not as_device(connect, "cam-1", client_id=client_id).accepted, client_id
    # The saver's own second instance account cannot use the first one's client id either.
    assert not connect(SAVERS[1], SAVER_PASSWORD, SAVERS[0]).accepted
    # Both connections are still the ones they were: no DISCONNECT, and they still work.
    saver.round_trip()
    assert saver.connected and victim.connected
    assert saver.disconnects == [] and victim.disconnects == []
    sent = publish_faces(victim, 1)
    saver.wait(lambda: saver.payloads() == sent, "a face after the attempts")


def test_a_device_is_refused_with_any_client_id_but_its_own(connect):
    assert as_device(connect, "cam-1").accepted
    for client_id in ("cam-1", "facehub-forwarder-cam-1", "facehub-forwarder-cam-1-cloud-2", "test-cam-1"):
        assert not as_device(connect, "cam-1", client_id=client_id).accepted, client_id


# -- retained messages ----------------------------------------------------------------------


def test_retained_faces_are_refused_and_never_replayed(connect):
    saver = as_saver(connect, 1)
    assert not saver.subscribe(SHARE)[0].is_failure
    camera = as_device(connect, "cam-1")
    assert camera.connacks[-1][2].RetainAvailable == 0, "the broker should announce that it keeps nothing"
    mid = camera.publish_nowait("faces/cam-1", b"retained-face", retain=True)
    camera.wait(lambda: camera.disconnects, "the broker to disconnect a retained publish")
    assert camera.disconnects[-1].getName() == "Retain not supported"
    assert mid not in camera.pubacks, "a retained face was acknowledged"
    # Not delivered now, and not to a later subscription either.
    saver.round_trip()
    assert saver.messages == []
    late = as_saver(connect, 2)
    assert not late.subscribe("faces/#")[0].is_failure
    late.round_trip()
    assert late.messages == []
    # A device cannot leave a retained will behind either.
    with_will = as_device(connect, "cam-2", will_retain=True)
    assert not with_will.accepted and with_will.connect_reason.getName() == "Retain not supported"
    assert as_device(connect, "cam-2", will_retain=False).accepted


# -- publishing as someone else -------------------------------------------------------------


def test_a_device_cannot_publish_as_another_device(connect):
    saver = as_saver(connect, 1)
    assert not saver.subscribe(SHARE)[0].is_failure
    forger = as_device(connect, "cam-1")
    for topic in ("faces/cam-2", "faces/cam-2/extra", "faces", "faces/", "facehub/cam-2/status",
                  "faces/cam-1x"):
        code = forger.publish(topic, b"forged")
        assert refused(code), f"{topic}: {code}"
    assert forger.connected, "a refused publish does not end the connection"
    forger.publish("faces/cam-1", b"marker")
    saver.wait(lambda: b"marker" in saver.payloads(), "the marker")
    assert saver.messages == [("faces/cam-1", b"marker", False)]


def test_a_status_reader_sees_availability_and_stats_and_no_face(connect):
    reader = connect(READER, PASSWORDS[READER], READER)
    assert reader.accepted
    for topic in ("facehub/+/availability", "facehub/+/stats", "facehub/cam-2/availability"):
        assert not reader.subscribe(topic)[0].is_failure, topic
    for topic in ("faces/#", SHARE, "facehub/#", "#"):
        assert refused(reader.subscribe(topic)[0]), topic
    assert refused(reader.publish("faces/cam-2", b"forged"))
    assert refused(reader.publish("facehub/cam-2/availability", b"offline"))
    assert not as_device(connect, "cam-1", client_id=READER).accepted
    saver = as_saver(connect, 1)
    assert not saver.subscribe(SHARE)[0].is_failure
    camera = as_device(connect, "cam-2")
    assert not camera.publish("facehub/cam-2/availability", b"online").is_failure
    assert not camera.publish("facehub/cam-2/stats", b'{"spool_depth": 0}').is_failure
    sent = publish_faces(camera, 1)
    reader.wait(lambda: len(reader.messages) >= 2, "availability and stats")
    saver.wait(lambda: saver.payloads() == sent, "the face at the saver")
    reader.round_trip()
    # (two of its subscriptions match the availability topic: a copy for each)
    assert sorted({topic for topic, _, _ in reader.messages}) == ["facehub/cam-2/availability", "facehub/cam-2/stats"]


# -- the real forwarder and savers, under attack -------------------------------------------------


class RunningComponent:
    """A component's ``run(config, runtime)`` in a thread, as the supervisor would run it."""

    def __init__(self, run, config, name: str):
        from facehub.runtime import Runtime

        self.runtime = Runtime(name, heartbeat=types.SimpleNamespace(value=0.0),
                               state_dir=config.supervisor.state_dir)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(run, config), name=name, daemon=True)
        self.thread.start()

    def _run(self, run, config):
        try:
            run(config, self.runtime)
        except BaseException as error:  # noqa: BLE001 - raised by stop()
            self.errors.append(error)

    def stop(self) -> None:
        self.runtime.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), f"{self.runtime.name} did not stop"
        if self.errors:
            raise self.errors[0]


def test_real_forwarder_and_savers_store_every_face_while_another_device_attacks(
        cloud, connect, broker_factory, photo, tmp_path):
    import cv2

    from facehub import messages, mqtt
    from facehub.cloud import saver
    from facehub.config import BrokerConfig, Config, SaverConfig
    from facehub.edge import forwarder

    def cloud_config(username: str, password: str) -> BrokerConfig:
        return BrokerConfig(host="127.0.0.1", port=cloud.port, tls=True, ca_file=str(cloud.ca_file),
                            username=username, password=password, reconnect_min=0.5, reconnect_max=2)

    local = broker_factory("edge")
    folder = tmp_path / "stored"
    running: list[RunningComponent] = []
    try:
        for name in ("saver-1", "saver-2"):
            config = Config(device_id="cloud", cloud=cloud_config("{client_id}", SAVER_PASSWORD),
                            saver=SaverConfig(url=str(folder), retry_min=0.1, retry_max=1.0))
            config.supervisor.state_dir = str(tmp_path / "state")
            running.append(RunningComponent(saver.run, config.validate(), name))
        savers = running[:]
        wait_for(lambda: all(r.runtime.gauge_value("subscribed") for r in savers), 15,
                 message="both savers logged in with their own accounts and subscribed")

        # cam-1 tries to join the savers' group and to take over a saver and cam-2's forwarder.
        attacker = as_device(connect, "cam-1")
        assert refused(attacker.subscribe(SHARE)[0])
        for client_id in (SAVERS[0], SAVERS[1], device_client_id("cam-2")):
            assert not as_device(connect, "cam-1", client_id=client_id).accepted

        edge = Config(device_id="cam-2", cloud=cloud_config("cam-2", PASSWORDS["cam-2"]))
        edge.local = BrokerConfig(host=local.host, port=local.port, reconnect_min=0.5, reconnect_max=2)
        edge.forwarder.spool_path = str(tmp_path / "spool" / "spool.db")
        edge.supervisor.state_dir = str(tmp_path / "edge-state")
        relay = RunningComponent(forwarder.run, edge.validate(), "forwarder")
        running.append(relay)
        wait_for(lambda: relay.runtime.gauge_value("edge_subscribed"), 15, message="forwarder subscribed")

        faces = []
        for n in range(FACES):
            ok, jpeg = cv2.imencode(".jpg", photo[30:230, 40 + n:240 + n])
            assert ok
            faces.append(messages.Face(image=jpeg.tobytes(), device_id="cam-2", frame=n, box=(10, 20, 200, 200),
                                       score=0.9))
        publisher = mqtt.make_client(edge.local, "test-detector")
        state = mqtt.ConnectionState("test detector")
        state.attach(publisher)
        mqtt.start(publisher, edge.local, persistent=False)
        try:
            assert state.connected.wait(10)
            infos = [publisher.publish("faces/cam-2", face.image, qos=1, properties=face.properties())
                     for face in faces]
            for info in infos:
                info.wait_for_publish(10)
        finally:
            mqtt.stop(publisher)

        def stored() -> int:
            return sum(r.runtime.counter("stored") for r in savers)
        wait_for(lambda: stored() >= FACES, 60, message=f"{FACES} faces stored")
        wait_for(lambda: relay.runtime.gauge_value("spool_depth") == 0, 10, message="the spool drained")
        assert stored() == FACES
        assert relay.runtime.counter("forwarded") == FACES
        names = sorted(path.name for path in folder.rglob("*.jpg") if "quarantine" not in path.parts)
        assert len(names) == FACES and all(any(face.face_id in name for name in names) for face in faces)
        attacker.round_trip()
        assert attacker.messages == []
    finally:
        for component in reversed(running):
            component.stop()


# -- the upgrade from one shared saver account ------------------------------------------------------


def test_faces_queued_for_a_saver_across_the_upgrade_to_one_account_per_instance_are_kept(tmp_path):
    """Before, every saver logged in as "saver" (password file + ACL file). The broker restores a saved session
    with the user name it last had and checks each face queued for it against that account: without the
    retired "saver" account the faces arriving before the saver's first login with its new account were
    dropped, while their forwarders had a PUBACK."""
    import base64
    import hashlib
    import os

    from locked_broker import LockedBroker, give_to_broker_user, prepare_locked_broker

    new = prepare_locked_broker(tmp_path / "broker")
    old_dir = tmp_path / "broker" / "old"
    old_dir.mkdir()
    text = new.conf_path.read_text()
    head, tail = text.split("\nuser ", 1)
    head = head.split("\nplugin ")[0]  # the old broker: password file and ACL file instead of the plugin
    old_conf = f"{head}\npassword_file {old_dir}/passwd\nacl_file {old_dir}/acl\nretain_available true\nuser {tail}"
    (old_dir / "mosquitto.conf").write_text(old_conf.replace("retain_available false\n", ""))
    lines = []
    for user, password in (("saver", SAVER_PASSWORD), ("cam-2", PASSWORDS["cam-2"])):
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
        lines.append(f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")
    (old_dir / "passwd").write_text("\n".join(lines) + "\n")
    (old_dir / "acl").write_text("user saver\ntopic read faces/#\ntopic read $share/+/faces/#\n\n"
                                 "user cam-2\ntopic write faces/cam-2/#\n")
    for path in old_dir.iterdir():
        path.chmod(0o600)
    give_to_broker_user(old_dir)

    old = LockedBroker(tmp_path / "broker", port=new.port, conf_path=old_dir / "mosquitto.conf")
    old.start()
    sessions: list[Session] = []

    def session(*args, **kwargs) -> Session:
        sessions.append(Session(new.port, new.ca_file, *args, **kwargs))
        return sessions[-1].connect()
    try:
        before = session("saver", SAVER_PASSWORD, client_id=SAVERS[0], persistent=True)
        # Debian's mosquitto 2.0.11 saves no $share subscription (2.0.12 does; the image runs 2.0.22),
        # so the saved session subscribes plainly here: the same read check applies to both.
        assert before.accepted and not before.subscribe("faces/#")[0].is_failure
        before.close()
        old.stop()  # SIGTERM: the broker saves its sessions

        new.start()
        camera = session("cam-2", PASSWORDS["cam-2"], client_id=device_client_id("cam-2"))
        sent = publish_faces(camera)
        assert not session("saver", SAVER_PASSWORD, client_id=SAVERS[0]).accepted, \
            "the retired account must not log in"
        after = session(SAVERS[0], SAVER_PASSWORD, client_id=SAVERS[0], persistent=True)
        assert after.accepted and after.session_present
        after.wait(lambda: len(after.payloads()) >= FACES, f"{FACES} faces queued across the upgrade", timeout=20)
        assert sorted(after.payloads()) == sorted(sent)
    finally:
        for opened in sessions:
            opened.close()
        old.kill()
        new.kill()
