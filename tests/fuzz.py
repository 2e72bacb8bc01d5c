"""``make fuzz``: every property test (hypothesis) with a larger budget, and how many
inputs ran in all.

    python -m tests.fuzz [--examples N] [pytest arguments]

Runs ``pytest -m hypothesis`` with ``HYPOTHESIS_PROFILE=fuzz`` and ``FUZZ_EXAMPLES=N``
(default 1000): the parsers of FHIR JSON and event content, the webhook body, and
``/notify`` over HTTP against a running Synapse (tests/integration/test_webhook_fuzz.py).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

# hypothesis' statistics, per phase: "- 20 passing, 0 failing, and 0 invalid test cases".
CASES = re.compile(r"- (\d+) passing, (\d+) failing, and \d+ invalid test cases")
TEST = re.compile(r"^(\S+::\S+):$", re.M)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    args, pytest_args = parser.parse_known_args()
    env = {**os.environ, "HYPOTHESIS_PROFILE": "fuzz", "FUZZ_EXAMPLES": str(args.examples)}
    paths = [a for a in pytest_args if not a.startswith("-")] or ["tests"]
    options = [a for a in pytest_args if a.startswith("-")]
    command = [sys.executable, "-m", "pytest", *paths, "-m", "hypothesis", "-q"]
    command += ["-p", "no:cacheprovider", "--hypothesis-show-statistics", *options]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    sys.stdout.write(run.stdout)
    sys.stderr.write(run.stderr)
    counts = [tuple(map(int, m.groups())) for m in CASES.finditer(run.stdout)]
    inputs = sum(passing + failing for passing, failing in counts)
    failing = sum(f for _, f in counts)
    tests = len(TEST.findall(run.stdout))
    print(f"fuzz: {inputs} inputs in {tests} property tests, {failing} failing")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
