"""The systemd units (containers/systemd) and the edge role's systemd runtime, checked for real.

``systemd-analyze verify`` loads each unit the way systemd does, in a throwaway root that
holds this machine's own units and a stub ``/opt/facehub/bin/facehub`` (the path the role
installs to), and must print nothing about it; ``systemd-analyze security --offline`` rates
its sandbox. The files the role writes next to the unit (the FACEHUB_* environment file, the
local broker's configuration) are rendered from the K3s templates, so they are compared with
the ConfigMap, read back by ``sh`` and by ``facehub config check``, the broker configuration is
run by Debian's mosquitto, and Ansible itself renders them once to prove render.py's rendering
is Ansible's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from facehub.config import SupervisorConfig
from facehub.dev.servers import MOSQUITTO, free_port
from facehub.process.supervisor import EXIT_UNSAFE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "containers" / "ci"))

import render  # noqa: E402

UNITS = {"edge": ROOT / "containers/systemd/facehub-edge.service",
         "cloud": ROOT / "containers/systemd/facehub-cloud.service"}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSTEM_UNITS = next((Path(p) for p in ("/usr/lib/systemd/system", "/lib/systemd/system")
                     if Path(p, "multi-user.target").exists()), None)
LINT_BIN = Path(os.environ.get("FACEHUB_LINT_VENV", "/tmp/lintvenv")) / "bin"
PASSWORD = "pa ss\"wo$rd`\\'x"  # every character sh and systemd's EnvironmentFile= treat specially
# What the role's systemd runtime changes in the K3s settings, and why: the unit's own folders
# and the broker on loopback.
SYSTEMD_SETTINGS = {"FACEHUB_LOCAL_HOST": "127.0.0.1",
                    "FACEHUB_FORWARDER_SPOOL_PATH": "/var/lib/facehub/spool.db",
                    "FACEHUB_SUPERVISOR_STATE_DIR": "/run/facehub"}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, by key, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory) -> Path:
    """A root with the system's units, ours in /etc/systemd/system and a stub facehub."""
    if not SYSTEMD_ANALYZE or not SYSTEM_UNITS:
        pytest.skip("systemd-analyze or the system's units are missing")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for path in UNITS.values():
        shutil.copy(path, root / "etc/systemd/system" / path.name)
    stub = root / "opt/facehub/bin/facehub"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_verifies_without_a_word(role, unit_root):
    name = UNITS[role].name
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", f"--root={unit_root}", name],
                            capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    print(f"systemd-analyze verify {name}: exit {result.returncode}, output {output or '(none)'}")
    about_ours = [line for line in output.splitlines() if "facehub" in line]
    assert result.returncode == 0 and not about_ours, output


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_is_sandboxed(role, unit_root):
    """The overall exposure systemd-analyze security gives the unit is at most 2.0 of 10."""
    name = UNITS[role].name
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", f"--root={unit_root}",
                             "--threshold=20", name], capture_output=True, text=True, timeout=120)
    if "offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250")
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    print(overall[-1] if overall else result.stdout[-500:])
    assert result.returncode == 0 and overall, result.stdout[-3000:] + result.stderr[-1000:]


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_runs_the_supervisor_as_systemd_expects(role):
    unit = unit_settings(UNITS[role])
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"/opt/facehub/bin/facehub run {role}", "foreground, never --daemon"
    assert one["EnvironmentFile"] == f"-/etc/facehub/{role}.env"
    assert one["WatchdogSec"] == "30" and one["Restart"] == "on-failure"
    # SIGTERM to the supervisor alone, and time enough for its own orderly stop (stop_all:
    # every child gets stop_timeout, SIGKILL, then as long again plus 5 s at most).
    assert one["KillMode"] == "mixed"
    assert int(one["TimeoutStopSec"]) > 2 * SupervisorConfig().stop_timeout + 5
    assert set(one["RestartPreventExitStatus"].split()) == {"2", str(EXIT_UNSAFE)}
    # The supervisor's state folder is the RuntimeDirectory, private (it refuses others' folders),
    # one per role: systemd removes it when the unit stops.
    runtime_dir = "facehub" if role == "edge" else f"facehub-{role}"
    assert one["User"] == "facehub" and one["RuntimeDirectory"] == runtime_dir
    assert one["RuntimeDirectoryMode"] == "0700" and one["StateDirectory"] == "facehub"
    assert f"FACEHUB_SUPERVISOR_STATE_DIR=%t/{runtime_dir}" in unit["Environment"]
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "ProtectKernelTunables",
                "ProtectControlGroups", "LockPersonality", "SystemCallArchitectures", "RestrictAddressFamilies"):
        assert key in one, f"{key} is not set"
    assert one["ProtectSystem"] == "strict"
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    if role == "edge":
        assert "FACEHUB_FORWARDER_SPOOL_PATH=%S/facehub/spool.db" in unit["Environment"], "the spool persists"
        assert one["SupplementaryGroups"] == "video" and one["PrivateDevices"] == "no"
        assert "char-video4linux rw" in unit["DeviceAllow"]
        for key in ("Wants", "After"):
            assert {"mosquitto.service", "network-online.target"} <= set(one[key].split())
    else:
        assert one["PrivateDevices"] == "yes"


def test_the_role_installs_the_same_unit():
    assert (ROOT / "roles/facehub_edge/files/facehub-edge.service").read_text() == UNITS["edge"].read_text()


# -- the files the role writes beside the unit -----------------------------------------------
def k3s_documents(values: dict) -> list[dict]:
    text = "\n".join(render.render("facehub_edge", name, values)
                     for name in ("facehub-10-config.yaml", "facehub-20-mosquitto.yaml"))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def configmap(values: dict, name: str) -> dict:
    return next(doc for doc in k3s_documents(values) if doc["metadata"]["name"] == name)["data"]


def read_env_file(path: Path) -> dict[str, str]:
    """The variables ``sh`` reads from the file (the quoting systemd's EnvironmentFile= reads too)."""
    result = subprocess.run(["sh", "-c", 'set -a; . "$1"; env -0', "sh", str(path)], capture_output=True,
                            env={"PATH": os.environ["PATH"]}, check=True)
    pairs = (item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    return {key: value for key, value in pairs if key.startswith("FACEHUB_")}


@pytest.mark.parametrize("variant", [{}, {"facehub_edge_detector_model_path": "/srv/models/yunet.onnx",
                                         "facehub_edge_metrics_port": 0,
                                         "facehub_edge_extra_env": {"FACEHUB_DETECTOR_LOOP": True}}],
                         ids=["defaults", "model-path-no-metrics"])
def test_env_file_is_the_configmap_and_secret(variant, tmp_path):
    values = {"facehub_edge_cloud_password": PASSWORD, **variant}
    path = tmp_path / "edge.env"
    path.write_text(render.render("facehub_edge", "systemd/edge.env", values))
    env = read_env_file(path)
    expected = {**configmap(values, "facehub-edge-config"), **SYSTEMD_SETTINGS,
                "FACEHUB_CLOUD_PASSWORD": PASSWORD}
    if render.role_defaults("facehub_edge")["facehub_edge_metrics_port"] and "facehub_edge_metrics_port" not in variant:
        expected["FACEHUB_METRICS_HOST"] = "127.0.0.1"
    assert env == expected


def test_env_file_is_a_valid_facehub_configuration(tmp_path):
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    path = tmp_path / "edge.env"
    path.write_text(render.render("facehub_edge", "systemd/edge.env", {"facehub_edge_cloud_password": PASSWORD,
                                                                       "facehub_edge_cloud_ca_dir": str(tmp_path)}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("FACEHUB_")}
    result = subprocess.run([sys.executable, "-m", "facehub.cli", "config", "check"], capture_output=True, text=True,
                            env={**env, **read_env_file(path)}, timeout=60)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["local"]["host"] == "127.0.0.1" and config["supervisor"]["state_dir"] == "/run/facehub"
    assert config["forwarder"]["spool_path"] == "/var/lib/facehub/spool.db"
    assert config["metrics"] == {"port": 9464, "host": "127.0.0.1"}
    assert PASSWORD not in result.stdout, "config check masks the password"


def test_broker_configuration_is_the_k3s_one_on_loopback():
    k3s = configmap({}, "facehub-mosquitto-config")["mosquitto.conf"]
    ours = render.render("facehub_edge", "systemd/mosquitto.conf")
    settings = lambda text: [line for line in text.splitlines() if line.strip() and not line.startswith("#")]  # noqa: E731
    expected = [("persistence_location /var/lib/mosquitto/" if line.startswith("persistence_location ")
                 else "listener 1883 127.0.0.1" if line.startswith("listener ") else line)
                for line in settings(k3s)]
    assert settings(ours) == expected


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")
def test_debian_mosquitto_runs_the_broker_configuration(tmp_path):
    """Debian's mosquitto accepts the file and listens on loopback only (port and data folder moved)."""
    port = free_port("127.0.0.1")
    conf = render.render("facehub_edge", "systemd/mosquitto.conf", {"facehub_edge_mqtt_port": port})
    conf = conf.replace("persistence_location /var/lib/mosquitto/", f"persistence_location {tmp_path}/")
    if os.geteuid() == 0:
        conf += "user root\n"  # else mosquitto drops to its own user, who cannot write tmp_path
    (tmp_path / "mosquitto.conf").write_text(conf)
    with open(tmp_path / "mosquitto.log", "wb") as log:
        broker = subprocess.Popen([MOSQUITTO, "-c", str(tmp_path / "mosquitto.conf")], stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert broker.poll() is None, (tmp_path / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto never listened"
                time.sleep(0.1)
        listening = {line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")}
        assert listening == {f"0100007F:{port:04X}"}, f"listens on {listening}, not only 127.0.0.1"
        assert not any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                       for line in Path("/proc/net/tcp6").read_text().splitlines()[1:])
    finally:
        broker.terminate()
        broker.wait(10)


def test_ansible_renders_the_systemd_files_as_render_py_does(tmp_path):
    """The templates lean on Jinja includes and from_yaml_all: Ansible's own rendering must agree."""
    playbook_bin = LINT_BIN / "ansible-playbook"
    if not playbook_bin.exists():
        pytest.skip("ansible-playbook is not installed (containers/ci/install-deps.sh installs it)")
    role = tmp_path / "roles" / "rendered"
    (role / "tasks").mkdir(parents=True)
    for folder in ("templates", "defaults"):
        (role / folder).symlink_to(ROOT / "roles/facehub_edge" / folder)
    names = ["edge.env", "mosquitto.conf", "facehub-edge.conf"]
    (role / "tasks/main.yml").write_text(yaml.safe_dump([{
        "name": "Render", "ansible.builtin.template": {"src": "systemd/{{ item }}.j2",
                                                       "dest": f"{tmp_path}/{{{{ item }}}}", "mode": "0600"},
        "loop": names}]))
    (tmp_path / "play.yml").write_text(yaml.safe_dump([{
        "hosts": "localhost", "connection": "local", "gather_facts": False, "roles": ["rendered"]}]))
    values = {"facehub_edge_cloud_password": PASSWORD, "facehub_edge_detector_model_path": "/srv/yunet.onnx",
              "facehub_edge_systemd_device_allow": ["/dev/nvhost-ctrl rw"],
              "ansible_python_interpreter": str(LINT_BIN / "python")}
    (tmp_path / "values.yml").write_text(yaml.safe_dump(values))
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    result = subprocess.run([str(playbook_bin), "-i", "localhost,", "-e", f"@{tmp_path / 'values.yml'}",
                             str(tmp_path / "play.yml")], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "ANSIBLE_CONFIG": str(tmp_path / "ansible.cfg"), "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for name in names:
        # the first line is the ansible_managed header, which only Ansible fills in
        ansible = (tmp_path / name).read_text().split("\n", 1)[1]
        assert ansible == render.render("facehub_edge", f"systemd/{name}", values).split("\n", 1)[1], name
