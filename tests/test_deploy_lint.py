"""Static checks of the deployment: playbooks, roles, YAML, manifests, Dockerfiles.

Each check runs the tool a user or CI would run. The tools live in their own venv
(containers/ci/install-deps.sh, pinned in requirements/lint.txt; $FACEHUB_LINT_VENV,
default /tmp/lintvenv) or on PATH; a check whose tool is missing is skipped, and
.ci/run installs them all so none is skipped there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "containers" / "ci"))

import render  # noqa: E402

LINT_BIN = Path(os.environ.get("FACEHUB_LINT_VENV", "/tmp/lintvenv")) / "bin"
PLAYBOOKS = sorted((ROOT / "ansible").glob("*.yml"))
MANIFESTS = sorted((ROOT / "containers" / "k8s").glob("*.yaml"))
FLEET_MANIFESTS = sorted((ROOT / "containers" / "k8s-fleet").glob("*.yaml"))
DOCKERFILES = sorted(p for p in (ROOT / "containers").rglob("*")
                     if p.is_file() and p.name.split(".")[0] in ("Dockerfile", "Containerfile"))
# The Kubernetes of the pinned K3s release, and the newest the validator knows.
K8S_VERSIONS = ("1.33.0", "1.37.0")


def tool(name: str) -> str:
    """The path of a lint tool, or skip the test when it is not installed."""
    candidate = LINT_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (containers/ci/install-deps.sh installs it)")
    return found


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), NO_COLOR="1",
               PATH=f"{LINT_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.name)
def test_playbook_syntax(playbook):
    run([tool("ansible-playbook"), "--syntax-check", str(playbook.relative_to(ROOT))])


def test_playbooks_present():
    assert {p.name for p in PLAYBOOKS} >= {"site.yml", "edge.yml", "cloud.yml"}


def test_ansible_lint_production_profile():
    result = run([tool("ansible-lint"), "--profile", "production", "--offline", "--nocolor"], timeout=280)
    assert "Failed" not in result.stdout


def test_yamllint():
    run([tool("yamllint"), "--strict", "."])


def test_committed_manifests_are_the_rendered_templates():
    """containers/k8s/ is the role's templates with its defaults: the two cannot drift."""
    assert [p.name for p in MANIFESTS] == sorted(render.K8S_TEMPLATES)
    for path in MANIFESTS:
        assert path.read_text() == render.k8s_manifest(path.name), \
            f"{path.name} is stale: run python containers/ci/render.py --k8s"


def test_committed_fleet_manifests_are_the_rendered_templates():
    """containers/k8s-fleet/ is the same templates with facehub_edge_k3s_layout: daemonset."""
    assert [p.name for p in FLEET_MANIFESTS] == sorted(render.K8S_FLEET_TEMPLATES)
    for path in FLEET_MANIFESTS:
        assert path.read_text() == render.k8s_manifest(path.name, fleet=True), \
            f"{path.name} is stale: run python containers/ci/render.py --k8s"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_committed_manifests_validate_strictly(version):
    run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, "--quiet",
         *[str(p) for p in MANIFESTS + FLEET_MANIFESTS]])


VARIANTS = {
    "device-plugin-camera": {"facehub_edge_camera_resource": "squat.ai/video"},
    "yunet-not-fetched": {"facehub_edge_yunet_fetch": False},
    "file-source": {"facehub_edge_camera_device": "", "facehub_edge_detector_source": "/srv/clip.mp4",
                    "facehub_edge_host_files": ["/srv/clip.mp4"], "facehub_edge_node_selector": {},
                    "facehub_edge_extra_env": {"FACEHUB_DETECTOR_LOOP": True}},
    "fleet": {"facehub_edge_k3s_layout": "daemonset",
              "facehub_edge_fleet_passwords": {"camera-01": "a-device-password", "camera-02": "another-one"}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_variants_validate_strictly(variant, tmp_path):
    """Other settings and the per-device Secret render to valid manifests too."""
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    values = {"facehub_edge_cloud_password": "a-device-password", "facehub_edge_cloud_ca_file": str(ca),
              **VARIANTS[variant]}
    paths = []
    for name in render.templates("facehub_edge"):
        path = tmp_path / name
        path.write_text(render.render("facehub_edge", name, values))
        paths.append(str(path))
    documents = [doc for path in paths for doc in yaml.safe_load_all(Path(path).read_text()) if doc]
    secret = next(doc for doc in documents if doc["metadata"]["name"] == "facehub-cloud-credentials")
    assert secret["data"]["password"] == "YS1kZXZpY2UtcGFzc3dvcmQ="
    fleet = next(doc for doc in documents if doc["metadata"]["name"] == "facehub-cloud-passwords")
    assert fleet["data"] == ({"camera-01": "YS1kZXZpY2UtcGFzc3dvcmQ=", "camera-02": "YW5vdGhlci1vbmU="}
                             if variant == "fleet" else {})
    run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_VERSIONS[-1], "--quiet", *paths])


def test_edge_pod_is_locked_down():
    """Probes call `facehub health` (readiness: `--delivery`); non-root, read-only root, limits, camera mounted."""
    edge = next(doc for doc in yaml.safe_load_all((ROOT / "containers/k8s/facehub-30-edge.yaml").read_text())
                if doc and doc["kind"] == "Deployment")
    pod = edge["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["facehub", "health"]
    assert container["readinessProbe"]["exec"]["command"] == ["facehub", "health", "--delivery"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert set(container["resources"]) == {"requests", "limits"}
    assert {"name": "camera", "mountPath": "/dev/video0"} in container["volumeMounts"]
    assert all("value" not in env for env in container["env"]), "secrets come from a Secret, not inline"


def test_fleet_pod_is_its_node():
    """The DaemonSet's pod: device id = node name, its own password file, broker beside it on loopback."""
    documents = [doc for path in FLEET_MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
    daemonset = next(doc for doc in documents if doc["kind"] == "DaemonSet")
    config = next(doc for doc in documents if doc["metadata"]["name"] == "facehub-edge-config")["data"]
    broker_conf = next(doc for doc in documents if doc["metadata"]["name"] == "facehub-mosquitto-config")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"facehub.io/camera": "true"}
    facehub, broker = pod["containers"]
    assert (facehub["name"], broker["name"]) == ("facehub", "mosquitto")
    env = [(item["name"], item.get("value") or item["valueFrom"]) for item in facehub["env"]]
    # Kubernetes expands $(VAR) only from variables defined before it: the device id comes first.
    assert env == [("FACEHUB_DEVICE_ID", {"fieldRef": {"fieldPath": "spec.nodeName"}}),
                   ("FACEHUB_CLOUD_USERNAME", "$(FACEHUB_DEVICE_ID)"),
                   ("FACEHUB_CLOUD_PASSWORD_FILE", "/etc/facehub/passwords/$(FACEHUB_DEVICE_ID)")]
    assert "FACEHUB_DEVICE_ID" not in config and "FACEHUB_CLOUD_USERNAME" not in config
    assert config["FACEHUB_LOCAL_HOST"] == "127.0.0.1"
    assert "listener 1883 127.0.0.1\n" in broker_conf["data"]["mosquitto.conf"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["cloud-passwords"]["secret"]["secretName"] == "facehub-cloud-passwords"
    assert volumes["spool"]["hostPath"] == {"path": "/var/lib/facehub/spool", "type": "Directory"}
    assert volumes["mosquitto-data"]["hostPath"] == {"path": "/var/lib/facehub/mosquitto", "type": "Directory"}
    assert {"name": "cloud-passwords", "mountPath": "/etc/facehub/passwords", "readOnly": True} \
        in facehub["volumeMounts"]
    assert facehub["readinessProbe"]["exec"]["command"] == ["facehub", "health", "--delivery"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (facehub["securityContext"]["runAsUser"], broker["securityContext"]["runAsUser"]) == (10001, 1883)
    assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in (facehub, broker))


def test_docker_health_checks_report_delivery():
    """Docker restarts no unhealthy container: its health check is for people, so it reports delivery."""
    compose = yaml.safe_load((ROOT / "containers/compose.yaml").read_text())
    assert compose["services"]["saver"]["healthcheck"]["test"] == ["CMD", "facehub", "health", "--delivery"]
    tasks = yaml.safe_load((ROOT / "roles/facehub_cloud/tasks/main.yml").read_text())
    savers = next(task for task in tasks if "community.docker.docker_container" in task)
    assert savers["community.docker.docker_container"]["healthcheck"]["test"] == \
        ["CMD", "facehub", "health", "--delivery"]


@pytest.mark.skipif(not DOCKERFILES, reason="no Dockerfile")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile):
    run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)])


def test_no_secrets_in_the_repository():
    """Nothing that looks like a private key or a filled-in vault is committed."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for name in tracked:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 1_000_000:
            continue
        text = path.read_text(errors="ignore")
        assert "PRIVATE KEY-----\nMI" not in text, f"{name} holds a private key"
        if path.name == "vault.yml":
            assert text.startswith("$ANSIBLE_VAULT"), f"{name} is not encrypted"
