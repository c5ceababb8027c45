#!/usr/bin/env python3
"""Render a role's templates the way Ansible's template module does, without Ansible.

The tests validate what the templates produce (Kubernetes manifests, mosquitto
configuration), and ``containers/k8s/`` holds the edge manifests rendered with the
role defaults so that they can be read, validated and applied as plain YAML;
``containers/k8s-fleet/`` the same for a fleet on one cluster (the DaemonSet layout). Jinja2
runs with Ansible's settings (trim_blocks) and the few Ansible filters the templates
use; the role's own filter plugins are loaded too.

    python containers/ci/render.py facehub_edge OUT_DIR [-e key=value ...] [-t TEMPLATE ...]
    python containers/ci/render.py --k8s     # rewrite containers/k8s/ and k8s-fleet/ from the defaults
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import jinja2
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "roles"
K8S_DIR = ROOT / "containers" / "k8s"
# The edge manifests kept as plain YAML (the Secret and the CA are made per device).
K8S_TEMPLATES = ("facehub-00-namespace.yaml", "facehub-10-config.yaml",
                 "facehub-20-mosquitto.yaml", "facehub-30-edge.yaml")
K8S_HEADER = ("# Rendered from roles/facehub_edge/templates with the role defaults by\n"
              "# containers/ci/render.py --k8s; edit the templates, not this file.\n")
# The fleet's manifests: one DaemonSet for every camera node of a cluster (its passwords'
# Secret and the CA are made per fleet, like the device's Secret above).
K8S_FLEET_DIR = ROOT / "containers" / "k8s-fleet"
K8S_FLEET_TEMPLATES = ("facehub-00-namespace.yaml", "facehub-10-config.yaml", "facehub-30-edge-fleet.yaml")
K8S_FLEET_VALUES = {"facehub_edge_k3s_layout": "daemonset"}
K8S_FLEET_HEADER = ("# Rendered from roles/facehub_edge/templates with the role defaults and\n"
                    "# facehub_edge_k3s_layout: daemonset by containers/ci/render.py --k8s;\n"
                    "# edit the templates, not this file.\n")


def role_defaults(role: str) -> dict[str, Any]:
    path = ROLES / role / "defaults" / "main.yml"
    return yaml.safe_load(path.read_text()) or {}


def _filters(role: str) -> dict[str, Any]:
    filters: dict[str, Any] = {
        "to_json": lambda value: json.dumps(value),
        "b64encode": lambda value: base64.b64encode(str(value).encode()).decode(),
        "string": str,
        "from_yaml_all": lambda text: list(yaml.safe_load_all(text)),
        "bool": lambda value: value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on"),
    }
    for plugin in sorted((ROLES / role / "filter_plugins").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"{role}_{plugin.stem}", plugin)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        filters.update(module.FilterModule().filters())
    return filters


def _lookup(kind: str, path: str) -> str:
    if kind not in ("file", "ansible.builtin.file"):
        raise ValueError(f"unsupported lookup {kind!r}")
    return Path(path).read_text().rstrip("\n")


def environment(role: str) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROLES / role / "templates")),
                             trim_blocks=True, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    env.filters.update(_filters(role))
    env.globals["lookup"] = _lookup
    return env


def resolve(values: dict[str, Any], env: jinja2.Environment) -> dict[str, Any]:
    """Expand ``{{ var }}`` references between variables, as Ansible does lazily."""
    def expand(value: Any, depth: int = 0) -> Any:
        if isinstance(value, str) and "{{" in value and depth < 10:
            return expand(env.from_string(value).render(values), depth + 1)
        if isinstance(value, list):
            return [expand(item, depth) for item in value]
        if isinstance(value, dict):
            return {key: expand(item, depth) for key, item in value.items()}
        return value

    return {key: expand(value) for key, value in values.items()}


def render(role: str, template: str, overrides: dict[str, Any] | None = None) -> str:
    """The text of ``roles/<role>/templates/<template>.j2`` with defaults + overrides."""
    env = environment(role)
    values = resolve({**role_defaults(role), **(overrides or {})}, env)
    return env.get_template(f"{template}.j2").render(values)


def templates(role: str) -> list[str]:
    return sorted(p.name[:-3] for p in (ROLES / role / "templates").glob("*.j2"))


def k8s_manifest(name: str, fleet: bool = False) -> str:
    """A committed manifest's text: the rendered template under the header that says so."""
    overrides = K8S_FLEET_VALUES if fleet else {}
    body = render("facehub_edge", name, overrides).split("\n", 1)[1]  # drop the template's own header
    return (K8S_FLEET_HEADER if fleet else K8S_HEADER) + body


def write_k8s() -> list[Path]:
    written = []
    for target, names, fleet in ((K8S_DIR, K8S_TEMPLATES, False), (K8S_FLEET_DIR, K8S_FLEET_TEMPLATES, True)):
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            path = target / name
            path.write_text(k8s_manifest(name, fleet))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k8s", action="store_true", help="rewrite containers/k8s and k8s-fleet from the defaults")
    parser.add_argument("role", nargs="?")
    parser.add_argument("out_dir", nargs="?", type=Path)
    parser.add_argument("-e", "--extra", action="append", default=[],
                        help="key=value (value parsed as YAML)")
    parser.add_argument("-t", "--template", action="append", default=[])
    args = parser.parse_args(argv)
    if args.k8s:
        for path in write_k8s():
            print(path.relative_to(ROOT))
        return 0
    if not (args.role and args.out_dir):
        parser.error("ROLE and OUT_DIR are required without --k8s")
    overrides = {}
    for item in args.extra:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.template or templates(args.role):
        (args.out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (args.out_dir / name).write_text(render(args.role, name, overrides))
        print(args.out_dir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
