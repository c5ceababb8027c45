#!/usr/bin/env python3
"""Turn the edge manifests rendered by the facehub_edge role into what podman 4.3 plays.

``podman kube play`` runs Pods, Deployments, ConfigMaps and PersistentVolumeClaims.
It has no Namespace, Service or NetworkPolicy (with ``--network host`` the pods reach
each other on 127.0.0.1), and podman 4.3 mishandles Secrets: a Secret document is stored
as YAML, which ``secretKeyRef`` then fails to parse as JSON. So Secrets are written out
as the JSON map of base64 values that ``secretKeyRef`` reads, to be added with
``podman secret create NAME FILE`` before the play. And with host networking podman
4.3 refuses ``containerPort`` entries (it takes them for port mappings), so they are
dropped, with probes that named a port given its number.

    podman_play.py MANIFESTS_DIR PLAY_YAML SECRETS_DIR

Prints one line per document: played, secret, or skipped and why.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import yaml

PLAYED = {"ConfigMap", "Deployment", "Pod", "PersistentVolumeClaim"}
SKIPPED = {
    "Namespace": "podman has no namespaces",
    "Service": "pods share the host network; clients use 127.0.0.1",
    "NetworkPolicy": "no policy engine in podman",
}


def host_network_ports(doc: dict) -> None:
    """Drop container ports (host networking), resolving named probe ports first."""
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
    for container in spec.get("containers", []):
        numbers = {port.get("name"): port["containerPort"] for port in container.pop("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            action = container.get(probe, {}).get("tcpSocket")
            if action and isinstance(action.get("port"), str):
                action["port"] = numbers[action["port"]]


def split(manifests: Path, play: Path, secrets: Path) -> int:
    secrets.mkdir(parents=True, exist_ok=True)
    documents = []
    for path in sorted(manifests.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind in PLAYED:
                if kind in ("Deployment", "Pod"):
                    host_network_ports(doc)
                documents.append(doc)
                print(f"played  {kind}/{name}")
            elif kind == "Secret":
                data = dict(doc.get("data") or {})
                for key, value in (doc.get("stringData") or {}).items():
                    data[key] = base64.b64encode(value.encode()).decode()
                (secrets / name).write_text(json.dumps(data))
                (secrets / name).chmod(0o600)
                print(f"secret  {kind}/{name}")
            else:
                print(f"skipped {kind}/{name}: {SKIPPED.get(kind, 'not supported by podman kube play')}")
    # ConfigMaps and claims first so the Deployments find them.
    documents.sort(key=lambda doc: doc["kind"] in ("Deployment", "Pod"))
    play.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(split(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
