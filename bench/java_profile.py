"""Where a JVM (HAPI) spends its time, from a Java Flight Recorder recording.

    with java_profile(hapi_pid, workdir / "batched.jfr") as recording:
        ...  # the load to look at
    print(recording.hot_frames(10))

JFR ships with the JDK (``jcmd``, ``jfr``); its sampler costs HAPI a few percent. The
summary counts, for each method, the share of HAPI's execution samples whose stack
contains it (inclusive time), for the methods of HAPI, Hibernate and H2 only, so the
answer reads as "what HAPI does", not as framework plumbing.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Methods worth naming (the rest is Spring, Tomcat and JDK plumbing around them).
DOTTED_PACKAGES = ("ca.uhn.fhir.", "org.hibernate.", "org.h2.")
STACK_DEPTH = 256


@dataclass
class Recording:
    path: Path
    samples: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)

    def hot_frames(self, count: int) -> list[tuple[str, float]]:
        """(method, share of samples) for the ``count`` methods most often on the stack."""
        if not self.samples:
            return []
        return [(m, n / self.samples) for m, n in self.inclusive.most_common(count)]


def available() -> bool:
    return shutil.which("jcmd") is not None and shutil.which("jfr") is not None


@contextlib.contextmanager
def java_profile(pid: int, path: Path) -> Iterator[Recording]:
    name = f"bench-{path.stem}"
    _jcmd(pid, "JFR.start", f"name={name}", "settings=profile", f"filename={path}")
    recording = Recording(path)
    try:
        yield recording
    finally:
        _jcmd(pid, "JFR.stop", f"name={name}")
    _summarise(recording)


def _jcmd(pid: int, *command: str) -> None:
    subprocess.run(["jcmd", str(pid), *command], check=True, capture_output=True, timeout=60)


def _summarise(recording: Recording) -> None:
    """Read ``jfr print``'s text form line by line (its JSON form is ~50x larger)."""
    argv = ["jfr", "print", "--events", "jdk.ExecutionSample", "--stack-depth", str(STACK_DEPTH)]
    with subprocess.Popen([*argv, str(recording.path)], stdout=subprocess.PIPE, text=True) as jfr:
        assert jfr.stdout is not None
        counted = False  # this sample is on one of HAPI's request threads
        methods: set[str] = set()
        for line in jfr.stdout:
            line = line.strip()
            if line.startswith("sampledThread = "):
                # HAPI's request threads: the work the benchmark's requests cause.
                counted = line.startswith('sampledThread = "http-nio')
            elif line == "}":  # the end of one sample
                if counted:
                    recording.samples += 1
                    recording.inclusive.update(methods)
                counted, methods = False, set()
            elif counted and "(" in line and line.startswith(DOTTED_PACKAGES):
                methods.add(line.split("(", 1)[0])
    if jfr.returncode:
        raise RuntimeError(f"jfr print failed with exit code {jfr.returncode}")
