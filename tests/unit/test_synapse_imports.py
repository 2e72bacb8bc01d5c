"""The module reaches Synapse through its module API only: an internal it imports can move
or change in any release (other modules' changelogs are lists of such breakages)."""

from __future__ import annotations

import ast
from pathlib import Path

import synapse_fhir_module

# What Synapse documents for modules: ModuleApi and its errors, the spam-checker's
# registration answers, the errors module ModuleApi raises (the same classes as
# synapse.module_api.errors, which the module uses), and where the `@cached` functions
# that `register_cached_function` takes come from.
ALLOWED = frozenset(
    {
        "synapse.module_api",
        "synapse.module_api.errors",
        "synapse.api.errors",
        "synapse.spam_checker_api",
        "synapse.util.caches.descriptors",
    }
)


def synapse_imports() -> dict[str, set[str]]:
    """Every ``synapse`` module imported anywhere in the package (also inside functions)."""
    root = Path(synapse_fhir_module.__file__).parent
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name == "synapse" or name.startswith("synapse."):
                    found.setdefault(name, set()).add(str(path.relative_to(root)))
    return found


def test_the_module_imports_only_what_synapse_documents_for_modules() -> None:
    imported = synapse_imports()
    assert imported, "the scan found no synapse import at all: it is not looking"
    outside = {name: files for name, files in imported.items() if name not in ALLOWED}
    assert outside == {}, f"Synapse internals imported: {outside}"
