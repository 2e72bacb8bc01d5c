"""The repository's Docker files as Docker reads them (no engine): the build context
.dockerignore leaves, and a Dockerfile's stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def build_context() -> set[str]:
    """The paths `docker build` sends for the repository root, as .dockerignore leaves them
    (the Docker SDK's own matcher)."""
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    return set(exclude_paths(str(REPO), patterns))


def stage(dockerfile: Path, name: str) -> list[dict[str, Any]]:
    """The instructions of one build stage (``FROM ... AS name`` up to the next FROM)."""
    instructions = DockerfileParser(path=str(dockerfile)).structure
    start = next(
        i
        for i, x in enumerate(instructions)
        if x["instruction"] == "FROM" and x["value"].lower().endswith(f" as {name}")
    )
    end = next(
        (
            i
            for i in range(start + 1, len(instructions))
            if instructions[i]["instruction"] == "FROM"
        ),
        len(instructions),
    )
    return instructions[start + 1 : end]


def final_stage(dockerfile: Path) -> list[dict[str, Any]]:
    """The instructions of the last stage (the image)."""
    instructions = DockerfileParser(path=str(dockerfile)).structure
    froms = [i for i, x in enumerate(instructions) if x["instruction"] == "FROM"]
    return instructions[froms[-1] + 1 :]
