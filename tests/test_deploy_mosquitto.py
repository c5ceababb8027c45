"""The cloud broker as the mosquitto role configures it, run for real.

The role's templates (mosquitto.conf, acl, passwd with its ``mosquitto_passwd``
filter) are rendered with the role defaults plus test values, a throwaway CA and
server certificate are made, and Debian's mosquitto is started with the result on a
free 127.0.0.1 port. Clients are built by facehub.mqtt.make_client, the factory the
forwarder and the saver use, so "gets through" means the real clients get through.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import sys
import threading
from pathlib import Path

import pytest

from facehub.dev.servers import MOSQUITTO, Server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "containers" / "ci"))

import render  # noqa: E402

from facehub.config import BrokerConfig  # noqa: E402
from facehub.mqtt import make_client, start, stop  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")

DEVICES = ["cam-1", "cam-2"]
PASSWORDS = {"cam-1": "cam-1-password", "cam-2": "cam-2-password", "saver": "saver-password"}
WAIT = 10.0


def make_tls(folder: Path) -> None:
    """A CA and a server certificate for 127.0.0.1, as the role makes with community.crypto."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FaceHub test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


class LockedBroker(Server):
    """mosquitto started with the role's rendered configuration."""

    def __init__(self, workdir: Path):
        super().__init__("mosquitto-cloud", workdir)
        self.conf_path = workdir / "mosquitto.conf"

    def command(self) -> list[str]:
        return [MOSQUITTO, "-c", str(self.conf_path)]


@pytest.fixture
def cloud_broker(tmp_path):
    config_dir = tmp_path / "broker"
    data_dir = config_dir / "data"
    data_dir.mkdir(parents=True)
    make_tls(config_dir / "tls")
    broker = LockedBroker(config_dir)
    values = {
        "mosquitto_container_config_dir": str(config_dir),
        "mosquitto_container_data_dir": str(data_dir),
        "mosquitto_tls_port": broker.port,
        "mosquitto_bind_address": "127.0.0.1",
        "mosquitto_devices": DEVICES,
        "mosquitto_passwords": PASSWORDS,
    }
    for name, target in (("mosquitto.conf", "mosquitto.conf"), ("acl", "acl"), ("passwd", "passwd")):
        (config_dir / target).write_text(render.render("mosquitto", name, values))
    (config_dir / "passwd").chmod(0o600)
    (config_dir / "acl").chmod(0o600)
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to its own user before it reads these files,
        # as the role's files belong to the broker's user.
        user = pwd.getpwnam("mosquitto")
        for folder in (tmp_path, *tmp_path.parents):
            if folder == Path("/tmp") or folder == Path("/"):
                break
            folder.chmod(folder.stat().st_mode | 0o711)
        for path in [config_dir, *config_dir.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
    broker.start()
    yield broker, config_dir / "tls" / "ca.crt"
    broker.kill()


class Session:
    """One client made by facehub.mqtt, recording what the broker answers."""

    def __init__(self, port: int, ca_file: Path | None, username: str = "", password: str = "",
                 client_id: str = "", tls: bool = True):
        self.config = BrokerConfig(host="127.0.0.1", port=port, username=username, password=password,
                                   tls=tls, ca_file=str(ca_file) if ca_file else "",
                                   reconnect_min=30, reconnect_max=30)
        self.client = make_client(self.config, client_id or f"test-{username or 'anonymous'}")
        self.answered = threading.Event()
        self.connect_reason = None
        self.suback = threading.Event()
        self.granted: list = []
        self.messages: list[tuple[str, bytes]] = []
        self.arrived = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.answered.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_reason = reason_code
        self.answered.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.granted = list(reason_codes)
        self.suback.set()

    def _on_message(self, client, userdata, message):
        with self.arrived:
            self.messages.append((message.topic, message.payload))
            self.arrived.notify_all()

    def connect(self) -> "Session":
        start(self.client, self.config, persistent=False)
        assert self.answered.wait(WAIT), "the broker never answered"
        return self

    @property
    def accepted(self) -> bool:
        return self.connect_reason is not None and not self.connect_reason.is_failure

    def subscribe(self, topic: str) -> list:
        self.suback.clear()
        self.client.subscribe(topic, qos=1)
        assert self.suback.wait(WAIT), f"no SUBACK for {topic}"
        return self.granted

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT)

    def wait_for_message(self, payload: bytes) -> list[tuple[str, bytes]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: any(p == payload for _, p in self.messages), WAIT), \
                f"{payload!r} never arrived; got {self.messages}"
            return list(self.messages)

    def close(self) -> None:
        stop(self.client)


@pytest.fixture
def sessions():
    opened: list[Session] = []

    def open_session(*args, **kwargs) -> Session:
        session = Session(*args, **kwargs)
        opened.append(session)
        return session.connect()

    yield open_session
    for session in opened:
        session.close()


def test_anonymous_client_is_refused(cloud_broker, sessions):
    broker, ca = cloud_broker
    session = sessions(broker.port, ca)
    assert not session.accepted
    assert session.connect_reason is not None, "anonymous client was not even answered with a CONNACK"


def test_wrong_password_is_refused(cloud_broker, sessions):
    broker, ca = cloud_broker
    session = sessions(broker.port, ca, "cam-1", "not-the-password")
    assert not session.accepted


def test_plaintext_client_gets_no_session(cloud_broker, sessions):
    broker, ca = cloud_broker
    session = sessions(broker.port, None, "cam-1", PASSWORDS["cam-1"], tls=False)
    assert not session.accepted


def test_device_with_tls_and_credentials_reaches_the_saver(cloud_broker, sessions):
    broker, ca = cloud_broker
    saver = sessions(broker.port, ca, "saver", PASSWORDS["saver"])
    assert saver.accepted
    assert [code.value for code in saver.subscribe("$share/savers/faces/#")] == [1]
    device = sessions(broker.port, ca, "cam-1", PASSWORDS["cam-1"])
    assert device.accepted
    device.publish("faces/cam-1", b"face-from-cam-1")
    assert saver.wait_for_message(b"face-from-cam-1") == [("faces/cam-1", b"face-from-cam-1")]


def test_device_publishing_outside_its_topic_reaches_nobody(cloud_broker, sessions):
    broker, ca = cloud_broker
    saver = sessions(broker.port, ca, "saver", PASSWORDS["saver"])
    saver.subscribe("faces/#")
    device = sessions(broker.port, ca, "cam-1", PASSWORDS["cam-1"])
    device.publish("faces/cam-2", b"forged-as-cam-2")
    device.publish("elsewhere/topic", b"off-prefix")
    # Same client, same QoS: the broker keeps the order, so once the marker is in,
    # anything published before it would have been delivered before it.
    device.publish("faces/cam-1", b"marker")
    assert saver.wait_for_message(b"marker") == [("faces/cam-1", b"marker")]


def test_only_the_saver_may_subscribe(cloud_broker, sessions):
    broker, ca = cloud_broker
    snoop = sessions(broker.port, ca, "cam-2", PASSWORDS["cam-2"])
    snoop.subscribe("faces/#")
    snoop.subscribe("$share/savers/faces/#")
    saver = sessions(broker.port, ca, "saver", PASSWORDS["saver"])
    saver.subscribe("faces/#")
    device = sessions(broker.port, ca, "cam-1", PASSWORDS["cam-1"])
    device.publish("faces/cam-1", b"private-face")
    saver.wait_for_message(b"private-face")
    # A round trip on the snooping connection: its SUBACK is written after anything
    # the broker had queued for it, so a leaked face would be in by now.
    snoop.subscribe("faces/cam-2/#")
    assert snoop.messages == []


def test_password_file_is_stable_and_pbkdf2(tmp_path):
    """Same passwords, same file: re-running the role does not restart the broker."""
    values = {"mosquitto_devices": DEVICES, "mosquitto_passwords": PASSWORDS}
    text = render.render("mosquitto", "passwd", values)
    assert text == render.render("mosquitto", "passwd", values)
    users = dict(entry.split(":", 1) for entry in text.splitlines())
    assert sorted(users) == ["cam-1", "cam-2", "saver"]
    assert all(value.startswith("$7$101$") for value in users.values())
    assert len(set(users.values())) == 3
