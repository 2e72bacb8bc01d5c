"""The package's layers, as each subpackage's docstring states them: what it may import of
the module. A new import across the layers fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "synapse_fhir_module"
BASE = {"config", "storage", "http_exchange", "service_user", "callback_safety"}
MAY_IMPORT: dict[str, set[str]] = {
    "config": set(),
    "storage": set(),
    "http_exchange": set(),
    "service_user": set(),
    "callback_safety": set(),
    "fhir": {"config", "http_exchange"},
    "mapping": {"config", "fhir"},
    "identity": {"config", "fhir", "storage", "http_exchange", "callback_safety"},
    "audit": {"fhir", "identity"} | BASE,
    "enforcement": {"config", "fhir", "identity", "audit", "storage", "callback_safety"},
    "sync": {
        "config",
        "fhir",
        "mapping",
        "identity",
        "audit",
        "enforcement",
        "storage",
        "service_user",
    },
    "recording": {"fhir", "mapping", "audit", "enforcement", "sync"} | BASE,
    "unread": {"config", "fhir", "mapping", "enforcement", "sync", "storage", "callback_safety"},
    "web": {"fhir", "mapping", "identity", "audit", "enforcement", "sync", "recording", "unread"}
    | BASE,
}


def _part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = node.module.split(".")
            if names[0] != PACKAGE.name:
                continue
            if len(names) > 1:
                parts.add(names[1])
            else:  # from synapse_fhir_module import x, y
                parts.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == PACKAGE.name and len(names) > 1:
                    parts.add(names[1])
    return parts


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if _part_of(p) not in {"module", "__init__"})


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_file_imports_only_the_layers_below_its_own(path: Path) -> None:
    part = _part_of(path)
    assert part in MAY_IMPORT, f"{part}: a new part of the package needs its place here"
    crossing = _imported_parts(path) - {part} - MAY_IMPORT[part]
    assert not crossing, f"{path.relative_to(PACKAGE)} imports {sorted(crossing)}"


def test_every_subpackage_says_what_it_owns_and_may_import() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, f"{init.parent.name}/__init__.py"


def test_only_the_base_files_lie_beside_the_entry_class() -> None:
    beside = {p.stem for p in PACKAGE.glob("*.py")}
    assert beside == BASE | {"__init__", "module"}
