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

from demo.care_network import care_network
from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, register_user
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.communication_mapping import EVENT_ID_SYSTEM

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
        network = care_network(synapse.server_name)
        FhirSeeder(hapi.base_url).put_all(network)
        for resource in network:
            say(f"  {resource['resourceType']}/{resource['id']}")

        say(f"Starting Synapse (SQLite) with synapse_fhir_module at {synapse.base_url} ...")
        synapse.start()
        say(f"  up in {synapse.start_seconds:.1f} s")

        health = requests.get(synapse.url("/_synapse/client/fhir/health"), timeout=10).json()
        say("GET /_synapse/client/fhir/health ->")
        say("  " + json.dumps(health))

        say("The care team's space and a room in it, as the module's service user ...")
        service = service_session(register_user(synapse, "root", admin=True))
        space = create_bound_space(service, "CareTeam/demo-careteam")
        room = create_room_in_space(service, space)
        say(f"  space {space} bound to CareTeam/demo-careteam, room {room}")

        say("Members of the CareTeam join; someone outside it is refused ...")
        anna, bram, carla = (register_user(synapse, n) for n in ("anna", "bram", "carla"))
        service.invite(room, anna.user_id)
        anna.join(room)
        for member in (bram, carla):
            anna.invite(room, member.user_id)
            member.join(room)
            say(f"  {member.user_id} invited by the GP and joined")
        mallory = register_user(synapse, "mallory")
        try:
            anna.invite(room, mallory.user_id)
            say("  UNEXPECTED: an outsider was let in")
            return 1
        except MatrixError as refused:
            say(
                f"  inviting {mallory.user_id}: HTTP {refused.status} {refused.errcode}, "
                f"reason {refused.reason}"
            )
            say(f'    "{refused.body["error"]}"')

        say("A short conversation ...")
        sent: list[str] = []
        for user, text in (
            (anna, "Blood pressure is up again; can you check it tomorrow morning?"),
            (bram, "Will do, I'm there at 8:30."),
            (carla, "I'll make sure Dad is up by then."),
        ):
            event_id = user.send_text(room, text)
            sent.append(event_id)
            say(f"  {user.user_id} sent {event_id}")

        say("The Communications the module wrote to FHIR ...")
        written = wait_until(
            lambda: _communications(hapi.base_url, sent),
            timeout=60,
            what="every message written to FHIR",
        )
        for c in written:
            payload = c.get("payload", [{}])[0].get("contentString", "")
            say(
                f"  Communication/{c['id']}  sent {c['sent']}  from {c['sender']['reference']}"
                f"  partOf {c['partOf'][0]['reference']}"
            )
            say(f'    "{payload}"')
        say(
            "  (the module creating spaces and rooms from the CareTeam itself arrives with "
            "the next issue)"
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


def _communications(base_url: str, event_ids: list[str]) -> list[dict] | None:
    """The Communications of these events, in order, once FHIR has all of them."""
    found = []
    for event_id in event_ids:
        bundle = requests.get(
            f"{base_url}/Communication",
            params={"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"},
            headers={"Cache-Control": "no-cache"},
            timeout=10,
        ).json()
        if not bundle.get("entry"):
            return None
        found.append(bundle["entry"][0]["resource"])
    return found


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
