"""Where a Python process (Synapse with the module) spends its CPU, sampled with py-spy.

    with python_profile(synapse_pid, workdir / "synapse.txt") as profile:
        ...  # the load to look at
    print(profile.module_share, profile.hot_functions(10))

py-spy samples another process from outside (ptrace; root or CAP_SYS_PTRACE) without
changing it. ``--idle`` is off, so samples are CPU time, not time spent waiting. The
summary counts, per function, the share of samples whose stack contains it (inclusive),
and how much of everything lies under this module's own code.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MODULE_PATH = "synapse_fhir_module/"
RATE = 250  # samples per second


@dataclass
class Profile:
    path: Path
    rate: int = RATE
    samples: int = 0
    in_module: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    stacks: list[tuple[frozenset[str], int]] = field(default_factory=list)

    def part_samples(self, counts: Callable[[str], bool]) -> int:
        """Samples with at least one function ``counts`` accepts on their stack."""
        return sum(n for functions, n in self.stacks if any(counts(f) for f in functions))

    @property
    def module_share(self) -> float:
        """Share of the process's CPU samples under this module's functions."""
        return self.in_module / self.samples if self.samples else 0.0

    def cpu_ms(self, function: str) -> float:
        """CPU milliseconds the samples under ``function`` stand for."""
        return self.inclusive.get(function, 0) * 1000 / self.rate

    @property
    def total_cpu_ms(self) -> float:
        return self.samples * 1000 / self.rate

    def hot_functions(self, count: int, *, module_only: bool = False) -> list[tuple[str, float]]:
        if not self.samples:
            return []
        ranked = (
            (name, n)
            for name, n in self.inclusive.most_common()
            if not module_only or MODULE_PATH in name
        )
        return [(name, n / self.samples) for name, n in list(ranked)[:count]]


def py_spy() -> str | None:
    """py-spy next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def python_profile(pid: int, path: Path) -> Iterator[Profile]:
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    argv = [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", str(RATE)]
    argv += ["--output", str(path), "--nonblocking"]
    recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    profile = Profile(path)
    try:
        yield profile
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        _, errors = recorder.communicate(timeout=60)
    if not path.exists():
        raise RuntimeError(f"py-spy wrote no profile: {errors.decode(errors='replace')[-500:]}")
    _summarise(profile)


def _summarise(profile: Profile) -> None:
    """py-spy's raw format: one line per distinct stack, ``frame;frame;... count``, each
    frame ``function (file:line)``."""
    for line in profile.path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        functions = frozenset(_function(frame) for frame in stack.split(";"))
        profile.stacks.append((functions, count))
        profile.samples += count
        if any(MODULE_PATH in f for f in functions):
            profile.in_module += count
        profile.inclusive.update(dict.fromkeys(functions, count))


def _function(frame: str) -> str:
    """``send (synapse_fhir_module/x.py:12)`` → ``send (synapse_fhir_module/x.py)``: one
    entry per function, whatever line it was on."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    for marker in (MODULE_PATH, "synapse/", "twisted/", "treq/"):
        if marker in file:
            file = marker + file.split(marker, 1)[1]
            break
    else:
        file = file.rsplit("/", 1)[-1]
    return f"{name} ({file})"
