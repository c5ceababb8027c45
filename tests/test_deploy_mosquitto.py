"""The cloud broker as the mosquitto role configures it, run for real: who gets in, and the files the role writes.

See tests/locked_broker.py for how the broker is made (the role's templates, Debian's
mosquitto and its dynamic security plugin, TLS). What a compromised device can try against
it is in tests/test_broker_identities.py.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from locked_broker import (DEVICES, PASSWORDS, READER, ROOT, SAVER_PASSWORD, SAVERS, SHARE, Session, available,
                           device_client_id, render, start_locked_broker)

broker_needed = pytest.mark.skipif(bool(available()), reason=available() or "ok")
ROLE = ROOT / "roles" / "mosquitto"


def filters():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mosquitto_dynsec", ROLE / "filter_plugins" / "mosquitto_dynsec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cloud_broker(tmp_path):
    broker = start_locked_broker(tmp_path / "broker")
    yield broker, broker.ca_file
    broker.kill()


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


def device(sessions, broker, ca, name: str = "cam-1") -> Session:
    return sessions(broker.port, ca, name, PASSWORDS[name], client_id=device_client_id(name))


def saver(sessions, broker, ca, number: int = 1, **kwargs) -> Session:
    return sessions(broker.port, ca, SAVERS[number - 1], SAVER_PASSWORD, client_id=SAVERS[number - 1], **kwargs)


# -- who gets in --------------------------------------------------------------------------


@broker_needed
def test_anonymous_client_is_refused(cloud_broker, sessions):
    broker, ca = cloud_broker
    session = sessions(broker.port, ca)
    assert not session.accepted
    assert session.connect_reason is not None, "anonymous client was not even answered with a CONNACK"


@broker_needed
def test_wrong_password_is_refused(cloud_broker, sessions):
    broker, ca = cloud_broker
    session = sessions(broker.port, ca, "cam-1", "not-the-password", client_id=device_client_id("cam-1"))
    assert not session.accepted


@broker_needed
def test_plaintext_client_gets_no_session(cloud_broker, sessions):
    broker, ca = cloud_broker
    session = sessions(broker.port, None, "cam-1", PASSWORDS["cam-1"], client_id=device_client_id("cam-1"),
                       tls=False)
    assert not session.accepted


@broker_needed
def test_device_with_tls_and_credentials_reaches_the_saver(cloud_broker, sessions):
    broker, ca = cloud_broker
    collector = saver(sessions, broker, ca)
    assert collector.accepted
    assert [code.value for code in collector.subscribe(SHARE)] == [1]
    camera = device(sessions, broker, ca)
    assert camera.accepted
    assert camera.publish("faces/cam-1", b"face-from-cam-1").value == 0
    collector.wait(lambda: collector.payloads() == [b"face-from-cam-1"], "the face")
    assert collector.messages == [("faces/cam-1", b"face-from-cam-1", False)]


@broker_needed
def test_device_publishing_outside_its_topic_is_refused_and_reaches_nobody(cloud_broker, sessions):
    broker, ca = cloud_broker
    collector = saver(sessions, broker, ca)
    collector.subscribe("faces/#")
    camera = device(sessions, broker, ca)
    assert camera.publish("faces/cam-2", b"forged-as-cam-2").getName() == "Not authorized"
    assert camera.publish("elsewhere/topic", b"off-prefix").getName() == "Not authorized"
    assert camera.publish("facehub/cam-2/status", b"forged-status").getName() == "Not authorized"
    assert camera.publish("$CONTROL/dynamic-security/v1", b'{"commands": []}').getName() == "Not authorized"
    # Its own availability and stats topics are its to use (nobody reads them here).
    assert not camera.publish("facehub/cam-1/status", b"online").is_failure
    # Same client, same QoS: the broker keeps the order, so once the marker is in,
    # anything published before it would have been delivered before it.
    camera.publish("faces/cam-1", b"marker")
    collector.wait(lambda: b"marker" in collector.payloads(), "the marker")
    assert collector.payloads() == [b"marker"]


@broker_needed
def test_only_the_savers_may_subscribe(cloud_broker, sessions):
    broker, ca = cloud_broker
    snoop = device(sessions, broker, ca, "cam-2")
    for topic in ("faces/#", SHARE, "faces/cam-1", "#"):
        assert [code.getName() for code in snoop.subscribe(topic)] == ["Not authorized"], topic
    collector = saver(sessions, broker, ca)
    assert [code.value for code in collector.subscribe("faces/#")] == [1]
    camera = device(sessions, broker, ca)
    camera.publish("faces/cam-1", b"private-face")
    collector.wait(lambda: b"private-face" in collector.payloads(), "the face")
    snoop.round_trip()
    assert snoop.messages == []


@broker_needed
def test_the_configuration_is_never_written(cloud_broker, sessions):
    """No admin account: the accounts the role wrote are the accounts the broker has, byte for byte."""
    broker, ca = cloud_broker
    path = broker.config_dir / "dynamic-security.json"
    before = path.read_bytes()
    camera = device(sessions, broker, ca)
    command = {"commands": [{"command": "createClient", "username": "intruder", "password": "intruder-password"}]}
    assert camera.publish("$CONTROL/dynamic-security/v1", json.dumps(command).encode()).getName() == "Not authorized"
    intruder = sessions(broker.port, ca, "intruder", "intruder-password", client_id="intruder")
    assert not intruder.accepted
    assert path.read_bytes() == before


# -- the files the role writes --------------------------------------------------------------


def rendered(**overrides) -> tuple[str, dict]:
    values = {"mosquitto_devices": DEVICES, "mosquitto_passwords": PASSWORDS, "mosquitto_status_readers": [READER],
              "mosquitto_saver_password": SAVER_PASSWORD, "mosquitto_saver_instances": 2, **overrides}
    return render.render("mosquitto", "mosquitto.conf", values), \
        json.loads(render.render("mosquitto", "dynamic-security.json", values))


def test_broker_configuration_refuses_retained_and_keeps_its_limits():
    conf, _ = rendered()
    lines = [line.strip() for line in conf.splitlines() if line.strip() and not line.startswith("#")]
    assert "retain_available false" in lines
    assert "allow_anonymous false" in lines
    assert any(re.fullmatch(r"max_queued_bytes [1-9][0-9]*", line) for line in lines)
    assert any(line.startswith("plugin ") and line.endswith("mosquitto_dynamic_security.so") for line in lines)
    assert not any(line.split()[0] in ("password_file", "acl_file") for line in lines), \
        "a password file or ACL file next to the plugin would be a second way in"


def test_every_account_is_bound_to_one_client_id_and_nothing_is_granted_by_default():
    _, dynsec = rendered()
    assert dynsec["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}
    clients = {client["username"]: client for client in dynsec["clients"]}
    # The user name all savers shared before: no password, disabled, for sessions saved before the upgrade.
    retired = clients.pop("saver")
    assert retired["disabled"] is True and "password" not in retired and "clientid" not in retired
    assert retired["roles"] == [{"rolename": "saver"}]
    assert sorted(clients) == sorted(DEVICES + SAVERS + [READER])
    assert {name: client["clientid"] for name, client in clients.items()} == {
        "cam-1": "facehub-forwarder-cam-1-cloud", "cam-2": "facehub-forwarder-cam-2-cloud",
        "facehub-saver-1": "facehub-saver-1", "facehub-saver-2": "facehub-saver-2", READER: READER}
    roles = {role["rolename"]: {(acl["acltype"], acl["topic"]) for acl in role["acls"] if acl["allow"]}
             for role in dynsec["roles"]}
    assert roles["device-cam-1"] == {("publishClientSend", "faces/cam-1/#"), ("publishClientSend", "facehub/cam-1/#")}
    assert roles["device-cam-2"] == {("publishClientSend", "faces/cam-2/#"), ("publishClientSend", "facehub/cam-2/#")}
    assert roles["saver"] == {("subscribePattern", SHARE), ("subscribePattern", "faces/#"),
                              ("publishClientReceive", "faces/#")}
    assert roles["status-reader"] == {("subscribePattern", "facehub/+/availability"), ("subscribePattern", "facehub/+/stats"),
                                      ("publishClientReceive", "facehub/+/availability"),
                                      ("publishClientReceive", "facehub/+/stats")}
    assert sorted(roles) == ["device-cam-1", "device-cam-2", "saver", "status-reader"]
    assert not any("$CONTROL" in topic for role in roles.values() for _, topic in role)


def verifies(entry: dict, password: str) -> bool:
    salt = base64.b64decode(entry["salt"])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, entry["iterations"], 64)
    return len(salt) == 12 and base64.b64decode(entry["password"]) == digest


def test_passwords_are_pbkdf2_with_random_salts_and_mosquittos_default_rounds():
    _, first = rendered()
    _, second = rendered()
    for dynsec in (first, second):
        clients = {client["username"]: client for client in dynsec["clients"] if not client.get("disabled")}
        assert all(client["iterations"] == 101 for client in clients.values())
        assert all(verifies(clients[name], PASSWORDS[name]) for name in DEVICES)
        assert all(verifies(clients[name], SAVER_PASSWORD) for name in SAVERS)
    salts = [client["salt"] for dynsec in (first, second) for client in dynsec["clients"] if "salt" in client]
    assert len(set(salts)) == len(salts), "a salt was used twice: it is not random"


def test_a_rerun_keeps_the_hashes_of_unchanged_passwords_and_rehashes_changed_ones():
    _, first = rendered()
    changed = dict(PASSWORDS, **{"cam-2": "a-new-password-for-cam-2"})
    _, again = rendered(mosquitto_dynsec_previous_clients=first["clients"], mosquitto_passwords=changed)
    before = {client["username"]: client for client in first["clients"]}
    after = {client["username"]: client for client in again["clients"]}
    for name in ("cam-1", READER, *SAVERS):
        assert after[name] == before[name], f"{name}: re-hashed although its password did not change"
    assert after["cam-2"]["salt"] != before["cam-2"]["salt"]
    assert verifies(after["cam-2"], "a-new-password-for-cam-2")
    # Unchanged passwords, previous file: the very same file, so the broker is not restarted.
    values = {"mosquitto_devices": DEVICES, "mosquitto_passwords": PASSWORDS, "mosquitto_status_readers": [READER],
              "mosquitto_saver_password": SAVER_PASSWORD, "mosquitto_saver_instances": 2}
    text = render.render("mosquitto", "dynamic-security.json", values)
    assert render.render("mosquitto", "dynamic-security.json",
                         dict(values, mosquitto_dynsec_previous_clients=json.loads(text)["clients"])) == text


def test_other_iterations_are_rehashed():
    module = filters()
    old = module.mosquitto_dynsec_password("a-long-enough-password", "cam-1", iterations=101)
    entry = dict(old, username="cam-1")
    assert module.mosquitto_dynsec_password("a-long-enough-password", "cam-1", [entry], 101) == old
    new = module.mosquitto_dynsec_password("a-long-enough-password", "cam-1", [entry], 1000)
    assert new["iterations"] == 1000 and new["salt"] != old["salt"]


def vault_example() -> dict:
    return yaml.safe_load((ROOT / "inventory" / "group_vars" / "all" / "vault.yml.example").read_text())


def test_placeholders_short_and_shared_passwords_are_refused_without_showing_them():
    problems = filters().mosquitto_password_problems
    example = vault_example()
    passwords = dict(example["vault_facehub_device_passwords"], savers=example["vault_facehub_saver_password"])
    found = problems(passwords, list(passwords), 16)
    assert sorted(found) == sorted(f"{name}: still the example placeholder" for name in passwords)
    old_examples = {"jetson-01": "change-me-01", "jetson-02": "change-me-02", "saver": "change-me-saver"}
    assert len(problems(old_examples, list(old_examples), 8)) == 3
    cases = {
        "short": ("cam-1", {"cam-1": "0123456789"}, "cam-1: shorter than 16 characters"),
        "missing": ("cam-1", {}, "cam-1: no password"),
        "user name": ("a-device-named-like-this", {"a-device-named-like-this": "a-device-named-like-this"},
                      "a-device-named-like-this: the user name as password"),
        "listed placeholder": ("cam-1", {"cam-1": "our-fleet-default-pw"}, "cam-1: still the example placeholder"),
    }
    for case, (name, given, expected) in cases.items():
        assert problems(given, [name], 16, ["our-fleet-default-pw"]) == [expected], case
    shared = {"cam-1": "0123456789abcdef0123", "cam-2": "0123456789abcdef0123", "the savers": "fedcba98765432100123"}
    assert problems(shared, list(shared), 16, (), ["the savers"]) == [
        "cam-1, cam-2: one password for several accounts (a device would know another's)"]
    assert problems(PASSWORDS, DEVICES, 16) == []
    for line in problems({"cam-1": "change-me-please-now"}, ["cam-1"], 16):
        assert "change-me-please-now" not in line


def test_the_role_asserts_on_the_passwords_before_writing_anything():
    tasks = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    names = [task["name"] for task in tasks]
    check = names.index("Check the broker passwords (never shown)")
    assert check < names.index("Write the accounts and permissions (dynamic security plugin; PBKDF2-SHA512, random salts)")
    task = tasks[check]
    assert "mosquitto_password_problems" in task["vars"]["mosquitto_password_problems"]
    assert "no_log" not in task, "the assert shows no password, and no_log would hide its message"
    assert "mosquitto_password_problems | join" in task["ansible.builtin.assert"]["fail_msg"]


def test_the_broker_container_has_a_memory_limit():
    tasks = yaml.safe_load((ROLE / "tasks" / "container.yml").read_text())
    container = next(task["community.docker.docker_container"] for task in tasks
                     if "community.docker.docker_container" in task)
    assert container["memory"] == "{{ mosquitto_memory }}"
    assert re.fullmatch(r"[1-9][0-9]*[mg]", yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())["mosquitto_memory"])
    compose = yaml.safe_load((ROOT / "containers" / "compose.yaml").read_text())
    assert compose["services"]["mosquitto"]["mem_limit"]
    assert compose["services"]["saver"]["environment"]["FACEHUB_CLOUD_USERNAME"] == "{client_id}"


def test_the_inventory_makes_one_saver_account_per_saver_instance():
    cloud = yaml.safe_load((ROOT / "inventory" / "group_vars" / "cloud" / "main.yml").read_text())
    assert cloud["mosquitto_saver_instances"] == "{{ facehub_cloud_saver_instances }}"
    assert cloud["mosquitto_saver_share_group"] == "{{ facehub_cloud_share_group }}"
    assert cloud["mosquitto_saver_password"] == cloud["facehub_cloud_saver_password"]
    saver_defaults = yaml.safe_load((ROOT / "roles" / "facehub_cloud" / "defaults" / "main.yml").read_text())
    assert saver_defaults["facehub_cloud_saver_username"] == "{client_id}"
    # The accounts are named after the client ids the saver and the forwarder really use.
    from facehub.cloud import saver as saver_component
    from facehub.config import Config
    from facehub.mqtt import make_client
    from facehub.runtime import Runtime

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    config = Config(device_id="cam-1")
    assert saver_component.client_id(config, Runtime("saver-2")) == defaults["mosquitto_saver_client_id_prefix"] + "2"
    assert defaults["mosquitto_device_client_id_format"] % "cam-1" == device_client_id("cam-1")
    config.cloud.username = "{client_id}"
    client = make_client(dataclasses.replace(config.cloud, client_id="facehub-saver-2"), "ignored")
    assert client._username == b"facehub-saver-2"
