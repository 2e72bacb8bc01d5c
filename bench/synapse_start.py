"""How long a real Synapse with the module takes to start: as a subprocess (what the
test harness does) vs in-process (what a pytest-twisted harness would do).

    python -m bench.synapse_start [--runs N]

Both arms use the same config, SQLite database (already created, so schema set-up is
not counted) and FHIR base URL, in the same run. The subprocess figure is Popen →
``/health`` 200, interpreter start and imports included; the in-process figure is
config load → ``/health`` 200, with the imports (paid once per test session) reported
separately.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from devstack.synapse import SynapseServer, module_config

FHIR = "http://127.0.0.1:9/fhir"  # unreachable on purpose: start-up must not wait for FHIR


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-synapse-start-"))
    try:
        server = SynapseServer(workdir, module_config(FHIR))
        server.start()  # creates the database; not counted
        server.stop()

        subprocess_runs = []
        for _ in range(args.runs):
            server.start()
            assert server.start_seconds is not None
            subprocess_runs.append(server.start_seconds)
            server.stop()

        in_process_runs, import_runs = [], []
        for _ in range(args.runs):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench._inprocess_synapse",
                    str(server.config_path),
                    server.url("/health"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise SystemExit(f"in-process start failed:\n{out.stderr[-3000:]}")
            if out.returncode != 0:
                raise SystemExit(f"in-process start failed:\n{out.stderr[-3000:]}")
            sample = json.loads(out.stdout.strip().splitlines()[-1])
            in_process_runs.append(sample["start_seconds"])
            import_runs.append(sample["import_seconds"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    report = {
        "runs": args.runs,
        "subprocess_start_seconds": summary(subprocess_runs),
        "in_process_start_seconds": summary(in_process_runs),
        "in_process_import_seconds": summary(import_runs),
        "ratio_subprocess_over_in_process": round(
            statistics.median(subprocess_runs) / statistics.median(in_process_runs), 2
        ),
    }
    print(json.dumps(report, indent=2))


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


if __name__ == "__main__":
    main()
