"""The edge fleet on one K3s cluster: the example inventory, and the role's DaemonSet layout run
for real by Ansible on local hosts (the manifests and the Secret on the server only)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "containers" / "ci"))

import podman_play  # noqa: E402
import render  # noqa: E402

LINT_BIN = Path(os.environ.get("FACEHUB_LINT_VENV", "/tmp/lintvenv")) / "bin"
CAMERAS = [f"camera-{n:02d}" for n in range(1, 41)]


def ansible(tool: str, *args: str, cwd: Path = ROOT, timeout: float = 240) -> str:
    binary = LINT_BIN / tool
    if not binary.exists():
        pytest.skip(f"{tool} is not installed (containers/ci/install-deps.sh installs it)")
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run([str(binary), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result.stdout


def test_fleet_inventory_lists_forty_cameras():
    inventory = json.loads(ansible("ansible-inventory", "-i", "inventory/fleet.yml", "--list"))
    assert inventory["edge"]["hosts"] == CAMERAS
    assert inventory["cloud"]["hosts"] == ["cloud-01"]
    camera = inventory["_meta"]["hostvars"]["camera-07"]
    assert camera["facehub_edge_k3s_layout"] == "daemonset"
    assert camera["facehub_edge_fleet_server"] == "camera-01"


def test_fleet_inventory_derives_ids_and_passwords(tmp_path):
    """Device ids from the host names, passwords from the vault's per-device map, one cloud account each."""
    vault = {"vault_facehub_device_passwords": {name: f"password-of-{name}" for name in CAMERAS}}
    (tmp_path / "vault.yml").write_text(yaml.safe_dump(vault))
    shown = ansible("ansible", "-i", "inventory/fleet.yml", "camera-07,cloud-01", "-e", f"@{tmp_path / 'vault.yml'}",
                    "-m", "ansible.builtin.debug",
                    "-a", "msg={{ [facehub_edge_device_id | default(''), facehub_edge_cloud_password | default(''),"
                          " mosquitto_devices | default([]) | length] }}")
    results = {chunk.split(" | ")[0]: yaml.safe_load(chunk.split("=>", 1)[1])["msg"]
               for chunk in re.split(r"\n(?=\S)", shown.strip())}
    assert results == {"camera-07": ["camera-07", "password-of-camera-07", 0],
                       "cloud-01": ["", "", 40]}  # the cloud: an account for each of the 40 cameras


@pytest.mark.skipif(os.geteuid() != 0, reason="the role gives the nodes' folders to the containers' users")
def test_fleet_role_writes_one_secret_on_the_server(tmp_path):
    """Three local "nodes": the server alone gets the manifests and a Secret with all three passwords;
    every node gets its spool and broker folders; a second run changes nothing."""
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    nodes = ["node-a", "node-b", "node-c"]
    hosts = {node: {"facehub_edge_device_id": node, "facehub_edge_cloud_password": f"password-of-{node}",
                    "facehub_edge_fleet_host_dir": str(tmp_path / node / "data"),
                    "facehub_edge_manifests_dir": str(tmp_path / node / "manifests")} for node in nodes}
    inventory = {"all": {"vars": {"ansible_connection": "local", "ansible_python_interpreter": str(LINT_BIN / "python"),
                                  "facehub_edge_k3s_layout": "daemonset", "facehub_edge_fleet_server": "node-b",
                                  "facehub_edge_wait": False, "facehub_edge_yunet_fetch": False,
                                  "facehub_edge_cloud_ca_file": str(ca)},
                         "children": {"edge": {"hosts": hosts}}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    play = ["ansible-playbook", "-i", str(tmp_path / "inventory.yml"), "ansible/edge.yml", "--tags", "facehub_edge"]
    first = ansible(*play)
    assert "changed=" in first
    assert sorted(p.name for p in (tmp_path / "node-b" / "manifests").iterdir()) == [
        "facehub-00-namespace.yaml", "facehub-05-fleet-secret.yaml", "facehub-10-config.yaml",
        "facehub-30-edge-fleet.yaml"]
    assert not (tmp_path / "node-a" / "manifests").exists() and not (tmp_path / "node-c" / "manifests").exists()
    secret = next(yaml.safe_load_all((tmp_path / "node-b/manifests/facehub-05-fleet-secret.yaml").read_text()))
    assert {node: base64.b64decode(value).decode() for node, value in secret["data"].items()} == \
        {node: f"password-of-{node}" for node in nodes}
    for node in nodes:
        spool, broker = (tmp_path / node / "data" / "spool").stat(), (tmp_path / node / "data" / "mosquitto").stat()
        assert (spool.st_uid, spool.st_mode & 0o777, broker.st_uid, broker.st_mode & 0o777) == (10001, 0o700, 1883, 0o700)
    second = ansible(*play)
    assert all(" changed=0 " in line for line in second.splitlines() if line.startswith("node-")), second[-1500:]


@pytest.mark.skipif(os.geteuid() != 0, reason="the secret files are given to the pod's fsGroup")
def test_podman_play_makes_the_pod_one_node_would_run(tmp_path):
    """test-containers plays the DaemonSet as one node's pod: what the kubelet would resolve, resolved."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for path in (ROOT / "containers" / "k8s-fleet").glob("*.yaml"):
        (manifests / path.name).write_text(path.read_text())
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (manifests / "facehub-05-fleet-secret.yaml").write_text(render.render(
        "facehub_edge", "facehub-05-fleet-secret.yaml",
        {"facehub_edge_cloud_ca_file": str(ca),
         "facehub_edge_fleet_passwords": {"camera-01": "password-one", "camera-02": "password-two"}}))
    podman_play.split(manifests, tmp_path / "play.yaml", tmp_path / "secrets", node="camera-02")
    pod = next(doc for doc in yaml.safe_load_all((tmp_path / "play.yaml").read_text()) if doc["kind"] == "Pod")
    assert pod["metadata"]["name"] == "facehub-edge-camera-02" and pod["spec"]["nodeName"] == "camera-02"
    assert "nodeSelector" not in pod["spec"]
    env = {item["name"]: item["value"] for item in pod["spec"]["containers"][0]["env"]}
    assert env == {"FACEHUB_DEVICE_ID": "camera-02", "FACEHUB_CLOUD_USERNAME": "camera-02",
                   "FACEHUB_CLOUD_PASSWORD_FILE": "/etc/facehub/passwords/camera-02"}
    folder = next(v["hostPath"]["path"] for v in pod["spec"]["volumes"] if v["name"] == "cloud-passwords")
    password = Path(folder) / "camera-02"
    assert password.read_text() == "password-two"
    assert (password.stat().st_gid, password.stat().st_mode & 0o777) == (10001, 0o440)
