"""Start HAPI (H2 in memory) and Synapse (SQLite) with the module, seed a care network,
hold a short conversation, and show what the module reports.

    python -m demo [--keep-running]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import requests

from demo.care_network import as_transaction, care_network
from devstack.hapi import HapiDevServer
from devstack.matrix_client import register_user
from devstack.synapse import SynapseServer, module_config

WORKDIR = Path(__file__).resolve().parent.parent / ".run" / "demo"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--keep-running", action="store_true", help="leave both servers up until Ctrl-C"
    )
    args = parser.parse_args()

    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True)
    hapi = HapiDevServer(WORKDIR)
    synapse: SynapseServer | None = None
    try:
        say(f"Starting the HAPI FHIR dev server (H2 in memory) at {hapi.base_url} ...")
        hapi.start()
        rss_mib = hapi.process.rss_bytes() / 2**20
        say(f"  up in {hapi.start_seconds:.1f} s, {rss_mib:.0f} MiB resident")

        synapse = SynapseServer(WORKDIR / "synapse", module_config(hapi.base_url))
        say("Seeding an OZO-style care network in FHIR ...")
        seed = requests.post(
            hapi.base_url,
            json=as_transaction(care_network(synapse.server_name)),
            headers={"Content-Type": "application/fhir+json"},
            timeout=60,
        )
        seed.raise_for_status()
        for entry in seed.json()["entry"]:
            say(f"  {entry['response']['location'].rsplit('/_history', 1)[0]}")

        say(f"Starting Synapse (SQLite) with synapse_fhir_module at {synapse.base_url} ...")
        synapse.start()
        say(f"  up in {synapse.start_seconds:.1f} s")

        health = requests.get(synapse.url("/_synapse/client/fhir/health"), timeout=10).json()
        say("GET /_synapse/client/fhir/health ->")
        say("  " + json.dumps(health))

        say("A short conversation between the GP and the district nurse ...")
        anna = register_user(synapse, "anna")
        bram = register_user(synapse, "bram")
        room = anna.create_room(name="Home care team", invite=[bram.user_id])
        bram.join(room)
        for user, text in (
            (anna, "Blood pressure is up again; can you check it tomorrow morning?"),
            (bram, "Will do, I'm there at 8:30."),
        ):
            event_id = user.send_text(room, text)
            say(f"  {user.user_id} sent {event_id}")

        communications = requests.get(
            f"{hapi.base_url}/Communication", params={"_summary": "count"}, timeout=10
        ).json()["total"]
        say(f"Communications in FHIR: {communications}")
        say(
            "  (recording each message as a FHIR Communication, and care-team spaces and\n"
            "   rooms from the CareTeam, arrive with the next issues; this demo grows with them)"
        )

        if args.keep_running:
            say("Both servers keep running; press Ctrl-C to stop them.")
            try:
                synapse.process.process.wait()  # type: ignore[union-attr]
            except KeyboardInterrupt:
                pass
        return 0 if health["status"] == "ok" else 1
    finally:
        say("Stopping Synapse and HAPI ...")
        if synapse is not None:
            synapse.stop()
        hapi.stop()
        say(f"Logs are in {WORKDIR}")


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
