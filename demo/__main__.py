"""FHIR drives Matrix, end to end: HAPI (H2 in memory) whose shim notifies Synapse (SQLite)
with the module. A care network written into FHIR becomes a space with its members invited;
a CommunicationRequest becomes a room; messages become Communications, and a Communication
from another system appears in the room.

    python -m demo [--keep-running]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from demo import care_network as net
from demo.care_network import Person
from demo.matrix_views import Inbox, messages, room_members, send_reply
from demo.stack import NOTIFY_PATH, DemoStack
from devstack.fhir_seed import FhirSeeder
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.waiting import NeverHappened, StopWaiting, wait_until
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM, ORIGIN_TAG
from synapse_fhir_module.mapping.relay_content import SOURCE_KEY

WORKDIR = Path(__file__).resolve().parent.parent / ".run" / "demo"
# Generous deadlines: the module usually needs well under a second.
APPLIED_WITHIN = 15.0
RECORDED_WITHIN = 30.0
OUTSIDE_MESSAGE = "Communication/demo-homecare-1"
STORY_LOG_LINES = ("Made a space", "Made a room", "Relayed", "inviting", "removing")


class DemoFailed(Exception):
    """The module did not do what the demo shows it doing."""


class Demo:
    def __init__(self, stack: DemoStack) -> None:
        self.stack = stack
        self.fhir = FhirSeeder(stack.hapi.base_url)
        self.users: dict[Person, MatrixUser] = {}
        self.inboxes: dict[Person, Inbox] = {}
        self.roles: dict[str, str] = {}  # Matrix user id or FHIR reference → role
        self.admin: MatrixUser | None = None

    # -- the story -------------------------------------------------------------------------

    def run(self) -> None:
        self.start_servers()
        self.register_accounts()
        space = self.seed_care_network()
        self.accept_invites(space, net.TEAM)
        self.refuse_outsider(space)
        room = self.open_thread(space)
        event_ids = self.converse(room)
        event_ids.append(self.relay_from_another_system(room))
        self.show_communications(event_ids)
        self.show_module_log()

    def start_servers(self) -> None:
        hapi, synapse = self.stack.hapi, self.stack.synapse
        section(f"Starting the HAPI FHIR dev server (H2 in memory) at {hapi.base_url}")
        hapi.start()
        rss_mib = hapi.process.rss_bytes() / 2**20
        say(f"up in {hapi.start_seconds:.1f} s, {rss_mib:.0f} MiB resident; its shim posts to")
        say(f"{synapse.url(NOTIFY_PATH)} after each commit")
        section(f"Starting Synapse (SQLite) with synapse_fhir_module at {synapse.base_url}")
        synapse.start()
        health = requests.get(synapse.url("/_synapse/client/fhir/health"), timeout=10).json()
        say(f"up in {synapse.start_seconds:.1f} s, sync on; health: {json.dumps(health)}")

    def register_accounts(self) -> None:
        section("Registering the people's Matrix accounts (before FHIR names them)")
        for person in net.EVERYONE:
            user = register_user(self.stack.synapse, person.localpart)
            self.users[person] = user
            self.inboxes[person] = Inbox(user)
            self.roles[user.user_id] = person.role
            self.roles[person.reference] = person.role
            say(f"{person.role:<15} {user.user_id}")
        self.roles[self.stack.synapse.user_id("fhir")] = "service user"
        # Someone to look at rooms through the admin API; not part of the story.
        self.admin = register_user(self.stack.synapse, "demo-admin", admin=True)

    def seed_care_network(self) -> str:
        section("Writing the care network into FHIR (one transaction)")
        resources = net.care_network(self.stack.synapse.server_name)
        self.fhir.put_all(resources)
        say(", ".join(f"{r['resourceType']}/{r['id']}" for r in resources))
        section("The module makes the team's space and invites its members")
        started = time.monotonic()
        space = self.wait_for_invite(net.GP, net.TEAM)
        elapsed = time.monotonic() - started
        say(f"space {space} (bound to {net.TEAM}) appeared for the GP after {elapsed:.2f} s")
        members = wait_until(
            lambda: self.members_if(space, net.TEAM_MEMBERS, ("invite", "join")),
            timeout=APPLIED_WITHIN,
            what="every member of the team invited to its space",
        )
        self.print_members(members)
        if self.user(net.OUTSIDER).user_id in members:
            raise DemoFailed("the outsider was invited to the space")
        say("the outsider was not invited")
        return space

    def accept_invites(self, room_id: str, reference: str) -> None:
        for person in net.TEAM_MEMBERS:
            if self.inboxes[person].invite_for(reference) is None:
                self.wait_for_invite(person, reference)
            self.user(person).join(room_id)
        say(f"all {len(net.TEAM_MEMBERS)} members accepted and joined {room_id}")

    def refuse_outsider(self, space: str) -> None:
        section("The outsider tries to join the space")
        try:
            self.user(net.OUTSIDER).join(space)
        except MatrixError as refused:
            say(f"refused: HTTP {refused.status} {refused.errcode}, reason {refused.reason}")
            say(f'"{refused.body.get("error")}"')
            if refused.reason is None:
                raise DemoFailed("refused, but not by the module") from refused
            return
        raise DemoFailed("the outsider joined the care team's space")

    def open_thread(self, space: str) -> str:
        section(f"The GP's system writes {net.THREAD} to the CareTeam")
        self.fhir.put(
            net.thread_request(
                "Blood pressure 150/95 this morning; please measure it daily this week."
            )
        )
        started = time.monotonic()
        room = self.wait_for_invite(net.GP, net.THREAD)
        elapsed = time.monotonic() - started
        hierarchy = self.user(net.GP).request(
            "GET", f"/_matrix/client/v1/rooms/{quote(space)}/hierarchy"
        )["rooms"]
        name = next((r.get("name") for r in hierarchy if r["room_id"] == room), None)
        say(f'room {room} "{name}" appeared in the space after {elapsed:.2f} s')
        self.accept_invites(room, net.THREAD)
        first = messages(self.user(net.GP), room)
        if not first:
            raise DemoFailed("the thread's room has no first message")
        sender = first[0]["sender"]
        say(f'first message, by the {self.roles[sender]} {sender}: "{first[0]["content"]["body"]}"')
        return room

    def converse(self, room: str) -> list[str]:
        section("The GP and the daughter talk in the room")
        gp, daughter = self.user(net.GP), self.user(net.DAUGHTER)
        first = gp.send_text(room, "Could someone measure it before breakfast tomorrow?")
        say(f"GP       {first}")
        reply = send_reply(daughter, room, first, "I'll do it at 8 and post the numbers here.")
        say(f"daughter {reply} (a reply to the GP)")
        return [first, reply]

    def relay_from_another_system(self, room: str) -> str:
        """The Communication appears in the room once; returns the GP's message after it."""
        section(f"The nurse's home-care app (another system) writes {OUTSIDE_MESSAGE}")
        self.fhir.put(
            net.outside_communication(
                OUTSIDE_MESSAGE.split("/")[1], net.NURSE, "Measured at 8:10: 142/88, pulse 72."
            )
        )
        relayed = wait_until(
            lambda: self.relayed_events(room),
            timeout=APPLIED_WITHIN,
            what=f"{OUTSIDE_MESSAGE} posted into the room",
        )[0]
        sender = relayed["sender"]
        say(
            f'in the room as {self.roles.get(sender, "?")} {sender}: "{relayed["content"]["body"]}"'
        )
        # The same notification again (as a retrying shim might send it): nothing new.
        self.notify_again(OUTSIDE_MESSAGE)
        thanks = self.user(net.GP).send_text(room, "Thanks, that is better already.")
        say(f"GP       {thanks}")
        wait_until(
            lambda: thanks in [e["event_id"] for e in messages(self.user(net.GP), room)],
            timeout=APPLIED_WITHIN,
            what="the GP's message visible",
        )
        count = len(self.relayed_events(room))
        say(f"after a duplicate notification and a later message: in the room {count} time(s)")
        if count != 1:
            raise DemoFailed(f"{OUTSIDE_MESSAGE} appears {count} times in the room")
        return thanks

    def show_communications(self, event_ids: list[str]) -> None:
        section(f"The Communications in FHIR for {net.THREAD}")
        found = wait_until(
            lambda: self.communications_if_recorded(event_ids),
            timeout=RECORDED_WITHIN,
            what="every Matrix message recorded as a Communication",
        )
        for c in sorted(found, key=lambda c: str(c.get("sent", ""))):
            self.print_communication(c)
        from_matrix = sum(1 for c in found if is_from_matrix(c))
        say(
            f"{len(found)} in all: {from_matrix} from Matrix, {len(found) - from_matrix} from the "
            "other system (relayed, not written back)"
        )
        if len(found) != len(event_ids) + 1:
            raise DemoFailed(f"expected {len(event_ids) + 1} Communications, found {len(found)}")

    def show_module_log(self) -> None:
        section("What the module logged about it (homeserver.log)")
        for line in module_log(self.stack.synapse.log_path, STORY_LOG_LINES):
            say(line)
        health = requests.get(
            self.stack.synapse.url("/_synapse/client/fhir/health"), timeout=10
        ).json()
        say(f"health: {json.dumps(health)}")

    # -- helpers ---------------------------------------------------------------------------

    def user(self, person: Person) -> MatrixUser:
        return self.users[person]

    def wait_for_invite(self, person: Person, reference: str) -> str:
        return wait_until(
            lambda: self.inboxes[person].invite_for(reference),
            timeout=APPLIED_WITHIN,
            what=f"the {person.role} invited to the room for {reference}",
        )

    def members_if(
        self, room_id: str, people: tuple[Person, ...], memberships: tuple[str, ...]
    ) -> dict[str, tuple[str, int | None]] | None:
        assert self.admin is not None
        members = room_members(self.admin, room_id)
        wanted = [self.user(p).user_id for p in people]
        ok = all(members.get(u, ("", 0))[0] in memberships for u in wanted)
        return members if ok else None

    def print_members(self, members: dict[str, tuple[str, int | None]]) -> None:
        for user_id, (membership, level) in sorted(members.items()):
            power = "room creator (above every level)" if level is None else f"power level {level}"
            say(f"{self.roles.get(user_id, '?'):<15} {user_id:<22} {membership:<7} {power}")

    def relayed_events(self, room: str) -> list[dict[str, Any]]:
        return [
            e
            for e in messages(self.user(net.GP), room)
            if e["content"].get(SOURCE_KEY) == OUTSIDE_MESSAGE
        ]

    def notify_again(self, reference: str) -> None:
        resource_type, resource_id = reference.split("/")
        response = requests.post(
            self.stack.synapse.url(NOTIFY_PATH),
            json={
                "resourceType": resource_type,
                "id": resource_id,
                "versionId": "1",
                "action": "update",
            },
            headers={"Authorization": f"Bearer {self.stack.webhook_secret}"},
            timeout=10,
        )
        response.raise_for_status()

    def communications_if_recorded(self, event_ids: list[str]) -> list[dict[str, Any]] | None:
        bundle = requests.get(
            f"{self.stack.hapi.base_url}/Communication",
            params={"part-of": net.THREAD, "_count": "100"},
            headers={"Cache-Control": "no-cache"},
            timeout=10,
        ).json()
        found = [e["resource"] for e in bundle.get("entry", [])]
        recorded = {event_id_of(c) for c in found}
        return found if all(e in recorded for e in event_ids) else None

    def print_communication(self, c: dict[str, Any]) -> None:
        sender = c.get("sender", {}).get("reference", "-")
        origin = f"from Matrix, event {event_id_of(c)}" if is_from_matrix(c) else "other system"
        say(f"{str(c.get('sent', ''))[11:19]}  Communication/{c['id']}  {origin}")
        say(f"    sender  {sender} ({self.roles.get(sender, '?')})")
        part_of = ", ".join(p.get("reference", "?") for p in c.get("partOf", []))
        answers = ", ".join(r.get("reference", "?") for r in c.get("inResponseTo", []))
        say(f"    partOf  {part_of}" + (f"   inResponseTo {answers}" if answers else ""))
        text = " ".join(p.get("contentString", "[attachment]") for p in c.get("payload", []))
        say(f'    payload "{text}"')


def event_id_of(communication: dict[str, Any]) -> str | None:
    for identifier in communication.get("identifier", []):
        if identifier.get("system") == EVENT_ID_SYSTEM:
            return str(identifier.get("value"))
    return None


def is_from_matrix(communication: dict[str, Any]) -> bool:
    tags = communication.get("meta", {}).get("tag", [])
    return any(
        t.get("system") == ORIGIN_TAG["system"] and t.get("code") == ORIGIN_TAG["code"]
        for t in tags
    )


def module_log(log_path: Path, wanted: tuple[str, ...] = ()) -> list[str]:
    """The module's log lines containing one of ``wanted``, and its warnings and errors."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [
        line.split(" - ", 1)[0][11:23] + "  " + line.rsplit(" - ", 1)[-1]
        for line in lines
        if " - synapse_fhir_module." in line
        and (any(w in line for w in wanted) or " - WARNING - " in line or " - ERROR - " in line)
    ]


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--keep-running", action="store_true", help="leave both servers up until Ctrl-C"
    )
    args = parser.parse_args()

    started = time.monotonic()
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True)
    stack = DemoStack(WORKDIR)
    try:
        Demo(stack).run()
        if args.keep_running:
            say("Both servers keep running; press Ctrl-C to stop them.")
            try:
                stack.synapse.process.process.wait()  # type: ignore[union-attr]
            except KeyboardInterrupt:
                pass
        status = 0
    except (DemoFailed, NeverHappened, StopWaiting, MatrixError, requests.RequestException) as e:
        print(f"\nDEMO FAILED: {e}", flush=True)
        for line in module_log(stack.synapse.log_path):
            say(line)
        status = 1
    finally:
        section("Stopping Synapse and HAPI")
        stack.stop()
        say(f"logs: {', '.join(str(p) for p in stack.log_paths)}")
        say(f"done in {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
