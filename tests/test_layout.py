"""The package's layout is its architecture: these tests keep the boundaries from eroding."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "facehub"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def imports_of(folder: str) -> dict[str, set[str]]:
    return {str(path.relative_to(PACKAGE)): imported_modules(path) for path in (PACKAGE / folder).rglob("*.py")}


def test_process_package_knows_nothing_about_faces():
    """The supervisor, health, daemon and sd_notify run any component: no edge/cloud imports."""
    offenders = {path: sorted(m for m in modules if m.startswith(("facehub.edge", "facehub.cloud",
                                                                  "facehub.roles", "facehub.dev")))
                 for path, modules in imports_of("process").items()}
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_edge_and_cloud_do_not_import_each_other():
    edge = {p: sorted(m for m in mods if m.startswith("facehub.cloud")) for p, mods in imports_of("edge").items()}
    cloud = {p: sorted(m for m in mods if m.startswith("facehub.edge")) for p, mods in imports_of("cloud").items()}
    assert {p: m for p, m in {**edge, **cloud}.items() if m} == {}


def test_product_does_not_import_developer_tools():
    """A plain install has no bench extras: only the CLI may reach into facehub.dev, lazily."""
    offenders = {}
    for folder in ("edge", "cloud", "process"):
        for path, modules in imports_of(folder).items():
            bad = sorted(m for m in modules if m.startswith("facehub.dev"))
            if bad:
                offenders[path] = bad
    assert offenders == {}
