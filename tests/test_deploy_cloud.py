"""The cloud-side Kubernetes manifests (containers/k8s-cloud/): valid, and shaped as docs/scaling.md says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_deploy_lint import K8S_VERSIONS, ROOT, run, tool

CLOUD_MANIFESTS = sorted((ROOT / "containers" / "k8s-cloud").glob("*.yaml"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_cloud_manifests_validate_strictly(version):
    assert CLOUD_MANIFESTS
    run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, "--quiet",
         *[str(p) for p in CLOUD_MANIFESTS]])


def _documents() -> list[dict]:
    return [doc for path in CLOUD_MANIFESTS for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def test_savers_scale_on_a_queue_metric_with_one_saver_per_pod():
    docs = _documents()
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "HorizontalPodAutoscaler", "Service", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert "Secret" not in kinds  # referenced, created out of band
    hpa = next(doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert {m["type"] for m in hpa["spec"]["metrics"]} <= {"Pods", "External"}
    config = next(doc for doc in docs if doc["kind"] == "ConfigMap")["data"]
    assert config["FACEHUB_SAVER_INSTANCES"] == "1" and config["FACEHUB_SAVER_URL"].startswith("s3://")
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    # every pod its own MQTT client id, else the broker would disconnect one saver for the next
    assert env["FACEHUB_CLOUD_CLIENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
