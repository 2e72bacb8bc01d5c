"""Every Communication-recording benchmark of issue 4, on one HAPI started once.

    python -m bench.communication_recording [--smoke] [--only NAME ...]
        [--databases sqlite postgres]

Starts the HAPI dev server (the slow part: 15-60 s), pins it to one CPU and this
process (hence the benchmarks and their Synapses) to the other, and runs each benchmark
in a process of its own (one Twisted reactor per process) against that HAPI:

- communication_latency: message → Communication readable at 50 msg/s (p50/p99);
- communication_batching: batched vs one-by-one Communication writes;
- send_throughput: Synapse send throughput, module recording vs absent;
- send_fhir_stall: send p99 while FHIR stalls 10 s per request vs healthy.

Each prints its table and writes ``bench/results/<name>[-postgres]-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import Pinning
from devstack.hapi import HapiDevServer

BENCHES = ("communication_latency", "communication_batching", "send_throughput", "send_fhir_stall")
# The ones that run Synapse, once per --databases entry (the batching one does not).
SYNAPSE_BENCHES = ("communication_latency", "send_throughput", "send_fhir_stall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    parser.add_argument(
        "--databases",
        nargs="+",
        choices=("sqlite", "postgres"),
        default=["sqlite"],
        help="Synapse's database(s) for the benchmarks that run Synapse",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-recording-"))
    hapi = HapiDevServer(workdir)
    failed: list[str] = []
    try:
        hapi.start()
        pinning = Pinning.plan()
        pinning.pin_hapi(hapi.process.pid)
        pinning.pin_local(os.getpid())  # the benchmarks and their Synapses inherit it
        print(f"HAPI ready in {hapi.start_seconds:.0f} s; {pinning.describe()}", flush=True)
        runs = [
            (name, database)
            for name in args.only
            for database in (args.databases if name in SYNAPSE_BENCHES else ["sqlite"])
        ]
        for name, database in runs:
            started = time.monotonic()
            argv = [sys.executable, "-m", f"bench.{name}", "--fhir", hapi.base_url]
            argv += ["--hapi-pid", str(hapi.process.pid), "--database", database]
            argv += ["--smoke"] if args.smoke else []
            if subprocess.run(argv, check=False).returncode != 0:
                failed.append(f"{name} ({database})")
            print(f"({name}, {database}: {time.monotonic() - started:.0f} s)", flush=True)
    finally:
        hapi.stop()
    if failed:
        print(f"HAPI log kept: {hapi.process.log_path}")
        raise SystemExit(f"failed: {', '.join(failed)}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
