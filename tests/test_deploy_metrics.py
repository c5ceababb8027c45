"""Metrics in the deployment: the Grafana dashboard, the edge pod's scrape settings, the examples.

The dashboard's queries may only name metrics FaceHub exports. Those are not listed anywhere
by hand: every counter, gauge and histogram the product's components record (the literal
keys of ``runtime.count/gauge/observe`` in facehub/) is recorded into a real stats file and
collected by the supervisor's own collector (facehub/process/metrics.py), so the names
checked are the sample names a scrape returns.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from facehub.process.metrics import StatsCollector
from facehub.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "containers/grafana/facehub.json"
K8S = ROOT / "containers/k8s"
LINT_BIN = Path(os.environ.get("FACEHUB_LINT_VENV", "/tmp/lintvenv")) / "bin"
METRIC = re.compile(r"\bfacehub_[A-Za-z0-9_]+")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def literals(node: ast.expr) -> set[str]:
    """The strings a key expression can be: a literal, or either literal of ``a if c else b``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return literals(node.body) | literals(node.orelse)
    return set()


def recorded_keys() -> dict[str, set[str]]:
    """The literal keys the product's components count, gauge and observe (not the dev tools)."""
    keys: dict[str, set[str]] = {"count": set(), "gauge": set(), "observe": set()}
    for path in (ROOT / "facehub").rglob("*.py"):
        if "dev" in path.relative_to(ROOT / "facehub").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in keys
                    and node.args and "runtime" in ast.unparse(node.func.value)):
                keys[node.func.attr] |= literals(node.args[0])
    return keys


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """Sample names a scrape of /metrics returns, and the counters seconds_since_last is labelled with."""
    keys = recorded_keys()
    assert {"faces_published", "forwarded", "stored"} <= keys["count"], keys
    state = tmp_path_factory.mktemp("state")
    runtime = Runtime("component", state_dir=state)
    for key in keys["count"]:
        runtime.count(key)
    for key in keys["gauge"]:
        runtime.gauge(key, 1)
    for key in keys["observe"]:
        runtime.observe(key, 5.0)
    runtime.flush()
    collector = StatsCollector(str(state), lambda: {"component": {"state": "RUNNING", "restarts": 0}})
    names = {sample.name for family in collector.collect() for sample in family.samples}
    return {"names": names, "counters": keys["count"]}


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        queries.append(query.get("query", "") if isinstance(query, dict) else "")
    return [query for query in queries if query]


def test_dashboard_is_valid_json_with_panels():
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["panels"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", "every panel reads the chosen data source"


def test_dashboard_uses_only_exported_metrics(exported):
    used = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    assert used, "no facehub_* metric in the dashboard"
    unknown = used - exported["names"]
    assert not unknown, f"the dashboard queries metrics FaceHub does not export: {sorted(unknown)}"
    for query in dashboard_queries():
        for counters in re.findall(r'counter=~?"([^"]+)"', query):
            assert set(counters.split("|")) <= exported["counters"], f"unknown counter in {query}"


def test_dashboard_shows_the_pipeline():
    queries = "\n".join(dashboard_queries())
    for needed in ("rate(facehub_faces_published_total", "rate(facehub_forwarded_total", "rate(facehub_stored_total",
                   "facehub_spool_depth", "facehub_child_up", "facehub_child_restarts_total",
                   "facehub_seconds_since_last",
                   "histogram_quantile(0.95, sum by (le, instance) (rate(facehub_publish_latency_seconds_bucket"):
        assert needed in queries, f"no panel uses {needed}"


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def edge_pod() -> tuple[dict, dict, dict]:
    """(pod template, facehub container, FACEHUB_* settings) of the committed edge manifests."""
    deployment = next(doc for doc in load(K8S / "facehub-30-edge.yaml") if doc["kind"] == "Deployment")
    config = next(doc for doc in load(K8S / "facehub-10-config.yaml")
                  if doc["metadata"]["name"] == "facehub-edge-config")["data"]
    template = deployment["spec"]["template"]
    return template, template["spec"]["containers"][0], config


def test_edge_pod_is_scraped_on_its_metrics_port():
    template, container, config = edge_pod()
    port = int(config["FACEHUB_METRICS_PORT"])
    assert "FACEHUB_METRICS_HOST" not in config, "in a pod /metrics listens on every interface (the default)"
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def test_servicemonitor_example_scrapes_the_edge_pod():
    path = K8S / "examples/servicemonitor.yaml"
    documents = {doc["kind"]: doc for doc in load(path)}
    assert set(documents) == {"Service", "ServiceMonitor"}
    service, monitor = documents["Service"], documents["ServiceMonitor"]
    template, container, config = edge_pod()
    # the Service selects the edge pod and names its metrics port
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics" and port["port"] == int(config["FACEHUB_METRICS_PORT"])
    # the ServiceMonitor (monitoring.coreos.com/v1; its CRD schema is not in kubernetes-validate) selects it
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    assert service["metadata"]["namespace"] == monitor["metadata"]["namespace"] == "facehub"
    validate = LINT_BIN / "kubernetes-validate"
    if validate.exists():
        result = subprocess.run([str(validate), "--strict", str(path)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "passed for resource service/facehub-edge-metrics" in result.stdout, \
            result.stdout + result.stderr


def test_examples_are_not_applied_with_the_manifests():
    """`kubectl apply -f containers/k8s/` does not recurse: the examples stay out unless asked for."""
    assert not list(K8S.glob("*servicemonitor*"))
    assert (K8S / "examples/servicemonitor.yaml").exists()


def test_cloud_metrics_stay_off_the_internet_by_default():
    compose = yaml.safe_load((ROOT / "containers/compose.yaml").read_text())
    saver = compose["services"]["saver"]
    assert saver["environment"]["FACEHUB_METRICS_PORT"] == "9464"
    assert saver["ports"] == ["${FACEHUB_METRICS_BIND:-127.0.0.1}:${FACEHUB_METRICS_PORT:-9464}:9464"]
    defaults = yaml.safe_load((ROOT / "roles/facehub_cloud/defaults/main.yml").read_text())
    assert defaults["facehub_cloud_metrics_port"] == 9464 and defaults["facehub_cloud_metrics_bind"] == "127.0.0.1"
