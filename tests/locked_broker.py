"""The cloud broker as the mosquitto role configures it, run for real, and clients that record its answers.

The role's templates (mosquitto.conf and dynamic-security.json, with the role's filter
plugin for the password hashes) are rendered with the role defaults plus test values, a
throwaway CA and server certificate are made, and Debian's mosquitto is started with the
result and its dynamic security plugin on a free 127.0.0.1 port, its configuration folder
read-only as in the container. Clients are built by facehub.mqtt.make_client, the factory
the forwarder and the saver use, so "gets through" means the real clients get through.

Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import datetime
import glob
import ipaddress
import os
import pwd
import subprocess
import sys
import threading
from pathlib import Path

from facehub.config import BrokerConfig
from facehub.dev.servers import MOSQUITTO, Server
from facehub.mqtt import make_client, start, stop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "containers" / "ci"))

import render  # noqa: E402

WAIT = 10.0
DEVICES = ["cam-1", "cam-2"]
READER = "facehub-console"  # reads availability and stats, nothing else
PASSWORDS = {"cam-1": "cam-1-0123456789abcdef", "cam-2": "cam-2-0123456789abcdef",
             READER: "console-0123456789abcdef"}
SAVER_PASSWORD = "savers-0123456789abcdef"
SAVERS = ["facehub-saver-1", "facehub-saver-2"]
SHARE = "$share/savers/faces/#"


def device_client_id(device: str) -> str:
    """The client id the forwarder uses on the cloud broker."""
    from facehub.config import Config
    from facehub.edge.forwarder import client_ids

    return client_ids(Config(device_id=device))[1]


def dynsec_plugin() -> str | None:
    """Where this machine's mosquitto package put its dynamic security plugin."""
    try:
        listed = subprocess.run(["dpkg", "-L", "mosquitto"], capture_output=True, text=True, check=False).stdout
    except OSError:
        listed = ""
    candidates = [line for line in listed.splitlines() if line.endswith("/mosquitto_dynamic_security.so")]
    candidates += glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob("/usr/lib/mosquitto_dynamic_security.so")
    return next((path for path in candidates if os.path.exists(path)), None)


def available() -> str:
    """Why the locked broker cannot run here, or ''."""
    if not Path(MOSQUITTO).exists():
        return "mosquitto is not installed"
    if not dynsec_plugin():
        return "mosquitto's dynamic security plugin is not installed"
    return ""


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

    def __init__(self, workdir: Path, port: int | None = None, conf_path: Path | None = None):
        super().__init__("mosquitto-cloud", workdir, port=port)
        self.conf_path = conf_path or workdir / "config" / "mosquitto.conf"
        self.config_dir = workdir / "config"
        self.ca_file = self.config_dir / "tls" / "ca.crt"

    def command(self) -> list[str]:
        return [MOSQUITTO, "-c", str(self.conf_path)]


def role_values(broker: LockedBroker, data_dir: Path, **overrides) -> dict:
    values = {
        "mosquitto_container_config_dir": str(broker.config_dir),
        "mosquitto_container_data_dir": str(data_dir),
        "mosquitto_tls_port": broker.port,
        "mosquitto_bind_address": "127.0.0.1",
        "mosquitto_dynsec_plugin": dynsec_plugin(),
        "mosquitto_devices": DEVICES,
        "mosquitto_passwords": PASSWORDS,
        "mosquitto_saver_password": SAVER_PASSWORD,
        "mosquitto_saver_instances": len(SAVERS),
        "mosquitto_status_readers": [READER],
    }
    values.update(overrides)
    return values


def start_locked_broker(workdir: Path, **overrides) -> LockedBroker:
    """Render the role's broker files into ``workdir`` and start mosquitto with them."""
    return prepare_locked_broker(workdir, **overrides).start()


def give_to_broker_user(*paths: Path) -> None:
    """Started as root, mosquitto drops to its own user before it reads its files: they are that user's."""
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam("mosquitto")
    for top in paths:
        for path in [top, *top.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)


def prepare_locked_broker(workdir: Path, **overrides) -> LockedBroker:
    """The role's broker files in ``workdir``, the broker not started yet."""
    broker = LockedBroker(workdir)
    config_dir, data_dir = broker.config_dir, workdir / "data"
    data_dir.mkdir(parents=True)
    make_tls(config_dir / "tls")
    values = role_values(broker, data_dir, **overrides)
    for name in ("mosquitto.conf", "dynamic-security.json"):
        (config_dir / name).write_text(render.render("mosquitto", name, values))
    (config_dir / "dynamic-security.json").chmod(0o400)
    if os.geteuid() == 0:
        for folder in (workdir, *workdir.parents):
            if folder == Path("/tmp") or folder == Path("/"):
                break
            folder.chmod(folder.stat().st_mode | 0o711)
    give_to_broker_user(workdir)
    # Read-only, as the container mounts it: nothing may be written into the configuration.
    for folder in (config_dir, config_dir / "tls"):
        folder.chmod(0o550)
    return broker


class Session:
    """One client made by facehub.mqtt, recording everything the broker answers."""

    def __init__(self, port: int, ca_file: Path | None, username: str = "", password: str = "",
                 client_id: str = "", tls: bool = True, persistent: bool = False):
        self.config = BrokerConfig(host="127.0.0.1", port=port, username=username, password=password,
                                   tls=tls, ca_file=str(ca_file) if ca_file else "",
                                   reconnect_min=60, reconnect_max=60)
        self.persistent = persistent
        self.client = make_client(self.config, client_id or f"test-{username or 'anonymous'}")
        self.changed = threading.Condition()
        self.connacks: list = []  # (reason code, session present, properties)
        self.disconnects: list = []  # reason codes
        self.subacks: dict[int, list] = {}  # mid -> reason codes
        self.pubacks: dict[int, object] = {}  # mid -> reason code
        self.messages: list[tuple[str, bytes, bool]] = []  # (topic, payload, retain)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    # -- callbacks (paho's network thread) --

    def _record(self, action) -> None:
        with self.changed:
            action()
            self.changed.notify_all()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self._record(lambda: self.connacks.append((reason_code, flags.session_present, properties)))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._record(lambda: self.disconnects.append(reason_code))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._record(lambda: self.subacks.__setitem__(mid, list(reason_codes)))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._record(lambda: self.pubacks.__setitem__(mid, reason_code))

    def _on_message(self, client, userdata, message):
        self._record(lambda: self.messages.append((message.topic, message.payload, bool(message.retain))))

    # -- what a test does --

    def wait(self, predicate, what: str, timeout: float = WAIT):
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"connacks={self.connacks} disconnects={self.disconnects} "
                                     f"messages={len(self.messages)}")
            return predicate()

    def connect(self) -> "Session":
        start(self.client, self.config, persistent=self.persistent)
        self.wait(lambda: self.connacks or self.disconnects, "an answer to CONNECT")
        return self

    @property
    def accepted(self) -> bool:
        return bool(self.connacks) and not self.connacks[-1][0].is_failure

    @property
    def connect_reason(self):
        return self.connacks[-1][0] if self.connacks else None

    @property
    def session_present(self) -> bool:
        return bool(self.connacks) and bool(self.connacks[-1][1])

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def subscribe(self, topic: str) -> list:
        """SUBSCRIBE at QoS 1; the broker's reason codes."""
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == 0, f"could not send SUBSCRIBE {topic}: {result}"
        return self.wait(lambda: self.subacks.get(mid), f"the SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, retain: bool = False):
        """PUBLISH at QoS 1 and wait for the PUBACK; its reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self.wait(lambda: self.pubacks.get(info.mid), f"the PUBACK for {topic}")

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> int:
        return self.client.publish(topic, payload, qos=1, retain=retain).mid

    def round_trip(self) -> None:
        """A SUBACK on this connection: whatever the broker had queued for it before is in by now."""
        self.subscribe("round-trip/none")

    def payloads(self) -> list[bytes]:
        with self.changed:
            return [payload for _, payload, _ in self.messages]

    def close(self) -> None:
        stop(self.client)
