#!/usr/bin/env python3
"""Turn the manifests rendered by the roles into what podman 4.3 plays.

``podman kube play`` runs Pods, Deployments, ConfigMaps and PersistentVolumeClaims.
It has no Namespace, Service or NetworkPolicy (with ``--network host`` the pods reach
each other on 127.0.0.1), and no HorizontalPodAutoscaler or PodDisruptionBudget (no
metrics pipeline, no evictions). podman 4.3 mishandles Secrets: a Secret document is
stored as YAML, which ``secretKeyRef`` then fails to parse as JSON. So Secrets are
written out as the JSON map of base64 values that ``secretKeyRef`` reads, to be added
with ``podman secret create NAME FILE`` before the play. And with host networking podman
4.3 refuses ``containerPort`` entries (it takes them for port mappings), so they are
dropped, with probes that named a port given its number.

A DaemonSet needs a node, which podman does not have; podman 4.3 does not play the kind,
nor resolve the ``spec.nodeName`` field reference, nor expand ``$(VAR)`` references in
environment values, and it crashes on ``secret`` volumes. With ``--node NAME`` each
DaemonSet becomes the Pod the kubelet of that (simulated) node would run: named
``<daemonset>-<node>``, ``spec.nodeName`` filled in and its field references resolved,
``$(VAR)`` expanded from the variables defined before it (as Kubernetes does), and each
secret volume a host folder holding one file per key (SECRETS_DIR/<secret>.files, with the
volume's mode and the pod's fsGroup as group). Without ``--node`` a DaemonSet is skipped.

    podman_play.py MANIFESTS_DIR PLAY_YAML SECRETS_DIR [--node NAME] [--set CONFIGMAP:KEY=VALUE ...]
                   [--image OLD=NEW ...]

``--set`` changes a ConfigMap value and ``--image`` a container's image, for manifests
written by hand that name the real broker, bucket and registry rather than the test's own.
Prints one line per document: played, secret, or skipped and why.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from pathlib import Path

import yaml

PLAYED = {"ConfigMap", "Deployment", "Pod", "PersistentVolumeClaim"}
SKIPPED = {
    "Namespace": "podman has no namespaces",
    "Service": "pods share the host network; clients use 127.0.0.1",
    "NetworkPolicy": "no policy engine in podman",
    "HorizontalPodAutoscaler": "podman has no autoscaler (nor metrics API): the Deployment's replicas run",
    "PodDisruptionBudget": "podman has no evictions to budget",
    "DaemonSet": "podman has no nodes: give --node to play it as one node's pod",
}
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "DaemonSet") else doc["spec"]


def host_network_ports(doc: dict) -> None:
    """Drop container ports (host networking), resolving named probe ports first."""
    for container in pod_spec(doc).get("containers", []):
        numbers = {port.get("name"): port["containerPort"] for port in container.pop("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            action = container.get(probe, {}).get("tcpSocket")
            if action and isinstance(action.get("port"), str):
                action["port"] = numbers[action["port"]]


def secret_data(doc: dict) -> dict[str, str]:
    """A Secret's keys and base64 values, ``stringData`` included."""
    data = dict(doc.get("data") or {})
    for key, value in (doc.get("stringData") or {}).items():
        data[key] = base64.b64encode(value.encode()).decode()
    return data


def node_env(container: dict, node: str) -> None:
    """Resolve ``spec.nodeName`` and expand ``$(VAR)`` from the variables defined before, as the kubelet does."""
    defined: dict[str, str] = {}
    for item in container.get("env", []):
        field = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if field == "spec.nodeName":
            item.pop("valueFrom")
            item["value"] = node
        if "value" in item:
            item["value"] = REFERENCE.sub(lambda m: defined.get(m[1], m[0]), item["value"])
            defined[item["name"]] = item["value"]


def secret_volumes_as_folders(spec: dict, secrets: dict[str, dict[str, str]], folder: Path) -> None:
    """Each secret volume becomes a host folder with one file per key (what the kubelet mounts)."""
    group = spec.get("securityContext", {}).get("fsGroup", 0)
    for volume in spec.get("volumes", []):
        source = volume.pop("secret", None)
        if source is None:
            continue
        files = folder / f"{source['secretName']}.files"
        files.mkdir(mode=0o750, exist_ok=True)
        os.chown(files, 0, group)
        for key, value in secrets[source["secretName"]].items():
            path = files / key
            path.write_bytes(base64.b64decode(value))
            os.chown(path, 0, group)
            path.chmod(source.get("defaultMode", 0o644))
        volume["hostPath"] = {"path": str(files), "type": "Directory"}


def daemonset_pod(doc: dict, node: str, secrets: dict[str, dict[str, str]], folder: Path) -> dict:
    """The Pod the DaemonSet's controller would place on ``node``."""
    template = doc["spec"]["template"]
    spec = dict(template["spec"], nodeName=node)
    spec.pop("nodeSelector", None)  # this node is the one chosen
    for container in spec["containers"]:
        node_env(container, node)
    secret_volumes_as_folders(spec, secrets, folder)
    metadata = {"name": f"{doc['metadata']['name']}-{node}", "labels": template["metadata"].get("labels", {}),
                "annotations": template["metadata"].get("annotations", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def replace_images(doc: dict, images: dict[str, str]) -> None:
    for container in pod_spec(doc).get("containers", []):
        container["image"] = images.get(container["image"], container["image"])


def split(manifests: Path, play: Path, secrets: Path, node: str | None = None,
          settings: list[str] | None = None, images: dict[str, str] | None = None) -> int:
    secrets.mkdir(parents=True, exist_ok=True)
    secrets.chmod(0o755)  # the pods' users reach their secret folders through it
    loaded = [doc for path in sorted(manifests.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    secret_values = {doc["metadata"]["name"]: secret_data(doc) for doc in loaded if doc["kind"] == "Secret"}
    documents = []
    for doc in loaded:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "DaemonSet" and node:
            doc = daemonset_pod(doc, node, secret_values, secrets)
            kind = "Pod"
            print(f"played  DaemonSet/{name} as Pod/{doc['metadata']['name']} on node {node}")
        elif kind in PLAYED:
            print(f"played  {kind}/{name}")
        elif kind == "Secret":
            (secrets / name).write_text(json.dumps(secret_values[name]))
            (secrets / name).chmod(0o600)
            print(f"secret  {kind}/{name}")
            continue
        else:
            print(f"skipped {kind}/{name}: {SKIPPED.get(kind, 'not supported by podman kube play')}")
            continue
        if kind in ("Deployment", "Pod"):
            host_network_ports(doc)
            replace_images(doc, images or {})
        documents.append(doc)
    for setting in settings or []:
        target, _, value = setting.partition("=")
        configmap, _, key = target.partition(":")
        found = [doc for doc in documents if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == configmap]
        if not found:
            sys.exit(f"--set {setting}: no ConfigMap {configmap}")
        found[0]["data"][key] = value
    # ConfigMaps and claims first so the Deployments find them.
    documents.sort(key=lambda doc: doc["kind"] in ("Deployment", "Pod"))
    play.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", type=Path)
    parser.add_argument("play", type=Path)
    parser.add_argument("secrets", type=Path)
    parser.add_argument("--node", help="play each DaemonSet as its pod on this node")
    parser.add_argument("--set", action="append", default=[], metavar="CONFIGMAP:KEY=VALUE")
    parser.add_argument("--image", action="append", default=[], metavar="OLD=NEW")
    args = parser.parse_args(argv)
    images = dict(item.split("=", 1) for item in args.image)
    return split(args.manifests, args.play, args.secrets, args.node, args.set, images)


if __name__ == "__main__":
    sys.exit(main())
