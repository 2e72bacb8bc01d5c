"""Facts about the machine and the software a benchmark run used, for its report."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

import requests

from devstack.postgres import PostgresNotInstalled, find_bindir

PACKAGES = ("matrix-synapse", "twisted", "treq", "fhir.resources", "psycopg2-binary")


def machine_facts(fhir_url: str | None) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "java": _first_line(["java", "-version"]),
        "hapi": _hapi_version(fhir_url) if fhir_url else None,
        "postgresql": _postgres_version(),
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _first_line(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    output = (done.stdout or done.stderr).strip()
    return output.splitlines()[0] if output else None


def _hapi_version(fhir_url: str) -> str | None:
    """HAPI's own version and FHIR version, from its CapabilityStatement."""
    try:
        statement = requests.get(f"{fhir_url}/metadata", timeout=30).json()
    except (requests.RequestException, ValueError):
        return None
    software = statement.get("software") or {}
    name = software.get("name") or "?"
    return f"{name} {software.get('version') or '?'} (FHIR {statement.get('fhirVersion', '?')})"


def _postgres_version() -> str | None:
    try:
        return _first_line([str(find_bindir() / "postgres"), "--version"])
    except PostgresNotInstalled:
        return None
