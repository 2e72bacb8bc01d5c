"""The OZO implementation guide's StructureDefinitions, read at test time, and a check of a
resource against what their differentials say.

The guide is GPL-3: its files are never copied into this project. They are read from
``../shared/ozo/profiles`` beside the repository (CI has ``../shared``); when the folder is
missing the test fails and says so — it never passes or skips silently.

``unmet`` applies a differential the way a validator would for the parts the module fills
in: each element's ``min``/``max`` (per occurrence of its parent), the types a choice
element (``content[x]``) may take, and the resource types a Reference may name (its
``targetProfile``s, resolved to their base types through the guide's own definitions). It
is written from the definitions, independently of the module's ``mapping.profile``,
so the two check each other.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
OZO_PROFILES = REPO.parent / "shared" / "ozo" / "profiles"

COMMUNICATION = "ozo-communication"
COMMUNICATION_REQUEST = "ozo-communicationrequest"


def definition(name: str) -> dict[str, Any]:
    """The StructureDefinition ``StructureDefinition-<name>.json`` of the guide."""
    return _definitions()[name]


def guide_resources() -> list[dict[str, Any]]:
    """Every conformance resource of the folder (StructureDefinitions and ValueSets), to load
    into a FHIR server that validates against them."""
    _definitions()  # (fails clearly when the folder is missing)
    return [json.loads(path.read_text()) for path in sorted(OZO_PROFILES.glob("*.json"))]


def by_url(url: str) -> dict[str, Any]:
    for found in _definitions().values():
        if found.get("url") == url:
            return found
    raise AssertionError(f"{url} is not among the OZO definitions in {OZO_PROFILES}")


def element(sd: dict[str, Any], element_id: str) -> dict[str, Any]:
    """One element of the differential, by id (``Communication.partOf.type``)."""
    for found in sd["differential"]["element"]:
        if found["id"] == element_id:
            return dict(found)
    raise AssertionError(f"{sd['url']} has no differential element {element_id}")


def unmet(resource: dict[str, Any], sd: dict[str, Any]) -> list[str]:
    """What ``resource`` lacks of the profile ``sd`` (empty: nothing)."""
    problems = []
    if resource.get("resourceType") != sd["type"]:
        return [f"a {resource.get('resourceType')}, not a {sd['type']}"]
    if sd["url"] not in (resource.get("meta") or {}).get("profile", []):
        problems.append(f"meta.profile does not declare {sd['url']}")
    for rule in sd["differential"]["element"]:
        if "sliceName" in rule:
            # Slices this guide defines are all optional; a required one would need a
            # discriminator here, so fail rather than pass without checking it.
            if rule.get("min", 0) > 0:
                raise AssertionError(f"{rule['id']}: a required slice this helper cannot check")
            continue
        steps = rule["path"].split(".")[1:]
        if not steps:
            continue
        for parent_path, parent in _nodes(resource, sd["type"], steps[:-1]):
            problems += _element_problems(rule, f"{parent_path}.{steps[-1]}", parent, steps[-1])
    return problems


def _element_problems(rule: dict[str, Any], where: str, parent: Any, name: str) -> list[str]:
    problems = []
    values = _children(parent, name)
    count = len(values)
    if count < rule.get("min", 0):
        problems.append(f"{where}: {count} found, at least {rule['min']} required")
    if rule.get("max", "*") != "*" and count > int(rule["max"]):
        problems.append(f"{where}: {count} found, at most {rule['max']} allowed")
    types = rule.get("type") or []
    for key, value in values:
        if name.endswith("[x]"):
            allowed = {name[:-3] + t["code"][0].upper() + t["code"][1:] for t in types}
            if key not in allowed:
                problems.append(f"{where}: {key} is not one of {sorted(allowed)}")
        for kind in types:
            if kind["code"] == "Reference" and kind.get("targetProfile"):
                problems += _reference_problems(where, value, kind["targetProfile"])
    return problems


def _reference_problems(where: str, value: Any, target_profiles: list[str]) -> list[str]:
    allowed = {by_url(url)["type"] for url in target_profiles}
    if not isinstance(value, dict):
        return [f"{where}: not a Reference"]
    reference = value.get("reference")
    named = reference.split("/")[0] if isinstance(reference, str) and "/" in reference else None
    kind = named if value.get("type") is None else value["type"]
    problems = []
    if not isinstance(kind, str) or kind not in allowed:
        problems.append(f"{where}: names a {kind}, not one of {sorted(allowed)}")
    if named is not None and kind != named:
        problems.append(f"{where}: reference and type name different resource types")
    return problems


def _nodes(resource: Any, root: str, steps: list[str]) -> list[tuple[str, Any]]:
    """Every (path, value) reached from the resource by ``steps`` (lists flattened)."""
    nodes: list[tuple[str, Any]] = [(root, resource)]
    for step in steps:
        nodes = [
            (f"{path}.{step}", value) for path, node in nodes for _, value in _children(node, step)
        ]
    return nodes


def _children(node: Any, name: str) -> list[tuple[str, Any]]:
    """(key, value) of every occurrence of element ``name`` in ``node``."""
    if not isinstance(node, dict):
        return []
    if name.endswith("[x]"):
        prefix = name[:-3]
        keys = [
            k
            for k in node
            if isinstance(k, str) and k.startswith(prefix) and k[len(prefix) :][:1].isupper()
        ]
    else:
        keys = [name] if name in node else []
    found = []
    for key in keys:
        value = node[key]
        # (A JSON null is no value: FHIR's parsers read it as absent.)
        found += [(key, item) for item in _listed(value) if item is not None]
    return found


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


@cache
def _definitions() -> dict[str, dict[str, Any]]:
    if not OZO_PROFILES.is_dir():
        pytest.fail(
            f"The OZO StructureDefinitions are not at {OZO_PROFILES}. These tests read the "
            "guide's profiles at run time from ../shared/ozo beside the repository (CI has "
            "it; the files are GPL-3 and never copied into the project): provide that "
            "folder to run them.",
            pytrace=False,
        )
    found = {}
    for path in sorted(OZO_PROFILES.glob("StructureDefinition-*.json")):
        sd = json.loads(path.read_text())
        found[path.stem.removeprefix("StructureDefinition-")] = sd
    if COMMUNICATION not in found or COMMUNICATION_REQUEST not in found:
        pytest.fail(f"{OZO_PROFILES} lacks the OZOCommunication(Request) definitions")
    return found
