"""The recorder's drain against stand-ins: the outbox in SQLite (the same SQL Synapse runs),
a small FHIR server that answers what the recorder sends as HAPI does, and fixed answers
for rooms, teams and persons (tests/integration/test_ozo_recording.py runs the same against
Synapse and HAPI)."""

from __future__ import annotations

import copy
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import attr
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock

from synapse_fhir_module.config import CommunicationConfig, CommunicationProfile
from synapse_fhir_module.fhir.client import parse_resource, to_json
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM, ORIGIN_TAG, ROOM_ID_SYSTEM
from synapse_fhir_module.fhir.errors import FhirTransientError, error_for_status
from synapse_fhir_module.fhir.person_directory import PersonRecord
from synapse_fhir_module.fhir.team_directory import DirectoryUnavailable
from synapse_fhir_module.mapping.communication import thread_request
from synapse_fhir_module.recording import outbox_store, position_store
from synapse_fhir_module.recording.recent_writes import RecentWrites
from synapse_fhir_module.recording.recorder import DEAD_AFTER, STUCK_AFTER, CommunicationRecorder
from synapse_fhir_module.recording.stream_reader import StreamRead
from synapse_fhir_module.sync import store as sync_store

OZO, BASE = CommunicationProfile.OZO, CommunicationProfile.BASE
SERVICE = "@fhir:example.org"
ROOM, OTHER_ROOM = "!home:example.org", "!elsewhere:example.org"
TEAM, OTHER_TEAM = "CareTeam/team-1", "CareTeam/team-2"
PATIENT, OTHER_PATIENT = "Patient/p-1", "Patient/p-2"
PERSONS = {"@anna:example.org": "Practitioner/gp-1", "@carla:example.org": "RelatedPerson/d-1"}
ROOMS = {ROOM: (TEAM,), OTHER_ROOM: (OTHER_TEAM,)}
PATIENTS = {TEAM: PATIENT, OTHER_TEAM: OTHER_PATIENT}


@attr.s(frozen=True, auto_attribs=True)
class Event:
    event_id: str
    room_id: str
    sender: str
    content: dict[str, Any]
    type: str = "m.room.message"
    origin_server_ts: int = 1_779_000_000_000
    redacts: str | None = None


class Api:
    """The ModuleApi calls the recorder makes; background work runs when ``drain`` says."""

    public_baseurl = "http://127.0.0.1:1/"

    def __init__(self, db: sqlite3.Cursor) -> None:
        self._db = db
        self._background: list[Callable[[], Awaitable[None]]] = []
        self.state_sent: list[dict[str, Any]] = []

    async def register_device(
        self, user_id: str, device_id: str, display_name: str
    ) -> tuple[str, str, None, None]:
        return device_id, "token", None, None

    def get_qualified_user_id(self, localpart: str) -> str:
        return f"@{localpart}:example.org"

    async def get_userinfo_by_id(self, user_id: str) -> object:
        return object()  # (the service user exists)

    async def run_db_interaction(self, desc: str, func: Callable[..., Any], *args: Any) -> Any:
        return func(self._db, *args)

    def run_as_background_process(self, desc: str, func: Callable[[], Awaitable[None]]) -> None:
        self._background.append(func)

    async def drain(self) -> None:
        while self._background:
            await self._background.pop(0)()

    def is_mine(self, user_id: str) -> bool:
        return user_id.endswith(":example.org")

    async def get_room_state(self, room_id: str, types: Any) -> dict[Any, Any]:
        return {}

    async def create_and_send_event_into_room(self, event: dict[str, Any]) -> None:
        self.state_sent.append(event)


class Fhir:
    """Communications and CommunicationRequests, with HAPI's answers to what the recorder
    sends: a conditional create finds or makes, a reference that names nothing is refused."""

    def __init__(self) -> None:
        self.stored: dict[str, dict[str, Any]] = {}  # "Type/id" -> resource
        self._next = 0
        self.transactions = 0

    def put(self, resource: dict[str, Any]) -> str:
        self._next += 1
        resource = {**copy.deepcopy(resource), "id": resource.get("id") or f"r{self._next}"}
        resource["meta"] = {**resource.get("meta", {}), "versionId": "1"}
        reference = f"{resource['resourceType']}/{resource['id']}"
        self.stored[reference] = resource
        return reference

    def find(self, resource_type: str, system: str, value: str) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(r)
            for r in self.stored.values()
            if r["resourceType"] == resource_type
            and {"system": system, "value": value} in r.get("identifier", [])
        ]

    def communication(self, event_id: str) -> dict[str, Any] | None:
        found = self.find("Communication", EVENT_ID_SYSTEM, event_id)
        return found[0] if found else None

    async def search_json(self, resource_type: str, params: Mapping[str, str]) -> list[dict]:
        system, _, value = params["identifier"].partition("|")
        return self.find(resource_type, system, value)

    async def create_if_none_exist(self, resource: Any, condition: str) -> tuple[Any, bool]:
        system, _, value = condition.removeprefix("identifier=").partition("|")
        found = self.find(resource.get_resource_type(), system, value)
        if found:
            return parse_resource(found[0]), False
        reference = self.put(to_json(resource))
        return parse_resource(self.stored[reference]), True

    async def transaction_json(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """All or nothing, entries in order."""
        self.transactions += 1
        created = []
        before = dict(self.stored)
        try:
            for entry in bundle["entry"]:
                resource = copy.deepcopy(entry["resource"])
                for parent in resource.get("inResponseTo", []):
                    parent["reference"] = self._resolve(parent["reference"])
                if entry["request"]["method"] == "PUT":  # (a conditional update)
                    _, _, value = entry["request"]["url"].partition("|")
                    found = self.communication(value)
                    resource["id"] = found["id"] if found else None
                    created.append(self.put(resource))
                    continue
                _, _, value = entry["request"]["ifNoneExist"].partition("|")
                if not self.communication(value):
                    created.append(self.put(resource))
        except Exception:
            self.stored = before
            raise
        return {"entry": [{"response": {"location": f"{ref}/_history/1"}} for ref in created]}

    async def update_json(
        self, resource: Mapping[str, Any], *, if_match_version: str
    ) -> dict[str, Any]:
        reference = f"{resource['resourceType']}/{resource['id']}"
        stored = self.stored[reference]
        if stored["meta"]["versionId"] != if_match_version:
            raise error_for_status(409, "update", {"resourceType": "OperationOutcome"})
        version = str(int(if_match_version) + 1)
        updated = copy.deepcopy(dict(resource))
        updated["meta"] = {**updated.get("meta", {}), "versionId": version}
        self.stored[reference] = updated
        return copy.deepcopy(updated)

    def _resolve(self, reference: str) -> str:
        if reference.startswith("Communication?identifier="):
            value = reference.split("|", 1)[1]
            found = self.communication(value)
            if found is None:
                raise error_for_status(400, "transaction", {"resourceType": "OperationOutcome"})
            return f"Communication/{found['id']}"
        if reference not in self.stored:
            raise error_for_status(400, "transaction", {"resourceType": "OperationOutcome"})
        return reference


class Stream:
    """Synapse's event stream as the recorder reads it: its end, and what ``stored`` holds
    after a saved position (the events come through the callback otherwise)."""

    def __init__(self) -> None:
        self.stored: list[dict[str, Any]] = []

    async def now(self) -> str:
        return "s1"

    async def read(self, since: str, types: Any, *, ids_only: bool) -> StreamRead:
        return StreamRead("s2" if self.stored else since, list(self.stored), [])


class Bindings:
    def __init__(self, threads: Mapping[str, str] | None = None) -> None:
        self._threads = dict(threads or {})

    def remembered(self, room_id: str) -> tuple[str, ...] | None:
        return ROOMS[room_id]

    async def care_teams_of(self, room_id: str) -> tuple[str, ...]:
        return ROOMS[room_id]

    async def care_team_of(self, room_id: str) -> str | None:
        return ROOMS[room_id][0] if ROOMS[room_id] else None

    async def thread_of(self, room_id: str) -> str | None:
        return self._threads.get(room_id)

    async def recorded(self, room_id: str) -> None:
        return None


@attr.s(frozen=True, auto_attribs=True)
class Membership:
    subject: str | None


class Teams:
    async def membership(self, team_ref: str) -> Membership:
        return Membership(PATIENTS[team_ref])


class Persons:
    def __init__(self) -> None:
        self.persons = dict(PERSONS)

    def remembered(self, user_id: str) -> PersonRecord | None:
        return None

    async def lookup(self, user_id: str) -> PersonRecord:
        return PersonRecord(user_id, self.persons.get(user_id), True, 0.0)


@attr.s(auto_attribs=True)
class Stand:
    recorder: CommunicationRecorder
    api: Api
    fhir: Fhir
    persons: Persons
    db: sqlite3.Cursor

    async def send(self, *events: Event) -> None:
        """The events, as Synapse hands them over, then the drain (one batch)."""
        for event in events:
            self.recorder.on_new_event(event)  # type: ignore[arg-type]
        await self.api.drain()

    def dead(self) -> dict[str, str]:
        return {d.event_id: d.reason for d in outbox_store.dead_letters(self.db)}


@pytest.fixture
def db() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    yield connection.cursor()
    connection.close()


def stand_in(
    db: sqlite3.Cursor,
    profile: CommunicationProfile = OZO,
    fhir: Fhir | None = None,
    threads: Mapping[str, str] | None = None,
    exempt_users: Sequence[str] = (),
    teams: Teams | None = None,
    stream: Stream | None = None,
    batch_linger: float = 0.0,
    clock: IReactorTime = reactor,
) -> Stand:
    api, fhir, persons = Api(db), fhir or Fhir(), Persons()
    recorder = CommunicationRecorder(
        api,  # type: ignore[arg-type]
        CommunicationConfig(profile=profile, batch_linger=batch_linger),
        fhir,  # type: ignore[arg-type]
        Bindings(threads),  # type: ignore[arg-type]
        teams or Teams(),  # type: ignore[arg-type]
        persons,  # type: ignore[arg-type]
        service_user_id=SERVICE,
        exempt_users=exempt_users,
        recent_writes=RecentWrites(),
        reader=stream or Stream(),  # type: ignore[arg-type]
        clock=clock,
    )
    return Stand(recorder, api, fhir, persons, db)


def text(event_id: str, sender: str = "@anna:example.org", room: str = ROOM, **more: Any) -> Event:
    return Event(event_id, room, sender, {"msgtype": "m.text", "body": "BP 150/95", **more})


def redaction(event_id: str, redacts: str, room: str = ROOM) -> Event:
    return Event(event_id, room, "@anna:example.org", {}, "m.room.redaction", redacts=redacts)


def reply(event_id: str, parent: str, room: str = ROOM) -> Event:
    return text(event_id, room=room, **{"m.relates_to": {"m.in_reply_to": {"event_id": parent}}})


async def started(stand: Stand) -> Stand:
    await stand.recorder.start()
    await stand.recorder.step()  # (from the stream's end: the callbacks bring the rest)
    await stand.api.drain()
    return stand


# -- batch_linger: bursts share a FHIR exchange, a lone message does not wait ----------------


@pytest_twisted.ensureDeferred
async def test_a_lone_message_is_written_at_once_and_a_burst_shares_one_write(
    db: sqlite3.Cursor,
) -> None:
    clock = Clock()
    clock.advance(1000)
    stand = await started(stand_in(db, batch_linger=0.05, clock=clock))
    before = stand.fhir.transactions

    await stand.send(text("$lone"))
    assert stand.fhir.communication("$lone") is not None  # (no wait)

    # A burst: each message closer than the linger to the one before. The wait the first
    # of them started is not pushed back by the others: a flood delays none for longer.
    burst = [f"$burst-{n}" for n in range(5)]
    for event_id in burst:
        clock.advance(0.01)
        await stand.send(text(event_id))
    assert [stand.fhir.communication(e) for e in burst] == [None] * 5
    clock.advance(0.01)  # (0.05 after the first of the burst)
    await stand.api.drain()
    assert all(stand.fhir.communication(e) is not None for e in burst)
    assert stand.fhir.transactions - before == 2  # one for the lone message, one for the burst

    clock.advance(5)  # quiet again: no wait
    await stand.send(text("$later"))
    assert stand.fhir.communication("$later") is not None


# -- a sender without a person ------------------------------------------------------------


@pytest.mark.parametrize("profile", [OZO, BASE])
@pytest_twisted.ensureDeferred
async def test_a_message_whose_sender_has_no_person_yet_waits_as_a_dead_letter(
    db: sqlite3.Cursor, profile: CommunicationProfile
) -> None:
    stand = await started(stand_in(db, profile))
    await stand.send(text("$first"), text("$unnamed", sender="@newcomer:example.org"))
    assert stand.fhir.communication("$first") is not None
    assert stand.fhir.communication("$unnamed") is None
    assert stand.dead() == {"$unnamed": "the sender has no (single) FHIR person"}
    counts = await stand.recorder.counts()
    assert (counts.pending, counts.dead) == (0, 1)
    assert counts.not_written_profile == (0 if profile is OZO else None)

    # FHIR names the person; the operator retries: nothing was lost.
    stand.persons.persons["@newcomer:example.org"] = "Practitioner/new-1"
    assert outbox_store.requeue_dead(db, None, 0) == 1
    stand.recorder.table_changed()
    await stand.api.drain()
    written = stand.fhir.communication("$unnamed")
    assert written is not None
    assert written["sender"] == {"reference": "Practitioner/new-1", "type": "Practitioner"}
    assert stand.dead() == {}


@pytest_twisted.ensureDeferred
async def test_only_the_service_users_own_messages_are_left_unwritten_under_ozo(
    db: sqlite3.Cursor,
) -> None:
    stand = await started(stand_in(db))
    await stand.send(text("$maintenance", sender=SERVICE))
    assert stand.fhir.communication("$maintenance") is None
    counts = await stand.recorder.counts()
    assert (counts.pending, counts.dead, counts.not_written_profile) == (0, 0, 1)


# -- replies ------------------------------------------------------------------------------


def in_response_to(stand: Stand, event_id: str) -> list[dict[str, Any]] | None:
    written = stand.fhir.communication(event_id)
    assert written is not None, f"{event_id} not written"
    return written.get("inResponseTo")


@pytest.mark.parametrize("profile", [OZO, BASE])
@pytest_twisted.ensureDeferred
async def test_a_reply_names_its_parent_only_where_fhir_has_it_in_the_rooms_thread(
    db: sqlite3.Cursor, profile: CommunicationProfile
) -> None:
    stand = await started(stand_in(db, profile))
    await stand.send(text("$earlier"), text("$elsewhere", room=OTHER_ROOM))
    earlier = stand.fhir.communication("$earlier")
    assert earlier is not None
    await stand.send(
        text("$same-batch"),
        reply("$to-earlier", "$earlier"),  # recorded in this thread before
        reply("$to-same-batch", "$same-batch"),  # written just before it
        reply("$to-nothing", "$never-recorded"),  # FHIR could never resolve it
        reply("$to-another-room", "$elsewhere"),  # another patient's thread
        reply("$from-another-room", "$same-batch", room=OTHER_ROOM),  # (same batch)
    )
    assert stand.dead() == {}
    assert in_response_to(stand, "$to-earlier") == [
        {"reference": f"Communication/{earlier['id']}", "type": "Communication"}
    ]
    same_batch = stand.fhir.communication("$same-batch")
    assert same_batch is not None
    assert in_response_to(stand, "$to-same-batch") == [
        {"reference": f"Communication/{same_batch['id']}"}
    ]
    for unrelated in ("$to-nothing", "$to-another-room", "$from-another-room"):
        assert in_response_to(stand, unrelated) is None, unrelated


@pytest_twisted.ensureDeferred
async def test_a_reply_to_a_relay_names_its_source_only_in_the_room_it_was_posted_to(
    db: sqlite3.Cursor,
) -> None:
    stand = await started(stand_in(db))
    stand.fhir.put({"resourceType": "Communication", "id": "lab-1", "status": "completed"})
    sync_store.claim_relay(db, "Communication/lab-1", ROOM, SERVICE)
    sync_store.relayed_as(db, "Communication/lab-1", "$relayed")
    await stand.send(reply("$here", "$relayed"), reply("$there", "$relayed", room=OTHER_ROOM))
    assert in_response_to(stand, "$here") == [
        {"reference": "Communication/lab-1", "type": "Communication"}
    ]
    assert in_response_to(stand, "$there") is None


# -- a request under the room's id --------------------------------------------------------


def own_request(**changes: Any) -> dict[str, Any]:
    request = thread_request(ROOM, TEAM, PATIENT, requester="Practitioner/gp-1", profile=OZO)
    request.update(changes)
    return {key: value for key, value in request.items() if value is not None}


FORGED = {
    "without the origin tag": own_request(meta={"tag": []}),
    "for another team": own_request(recipient=[{"reference": OTHER_TEAM, "type": "CareTeam"}]),
    "for this team and another": own_request(
        recipient=[{"reference": TEAM, "type": "CareTeam"}, {"reference": OTHER_TEAM}]
    ),
    "about another patient": own_request(subject={"reference": OTHER_PATIENT}),
    "about nobody": own_request(subject=None),
}


@pytest.mark.parametrize("forged", FORGED.values(), ids=FORGED.keys())
@pytest_twisted.ensureDeferred
async def test_a_request_someone_else_wrote_under_the_rooms_id_is_never_the_rooms_thread(
    db: sqlite3.Cursor, forged: dict[str, Any]
) -> None:
    fhir = Fhir()
    thread = fhir.put(forged)
    stand = await started(stand_in(db, fhir=fhir))
    await stand.send(text("$first"))
    assert stand.fhir.communication("$first") is None
    (reason,) = stand.dead().values()
    assert reason.startswith(f"no thread for the room: {thread} carries the room's id, but ")
    assert stand.api.state_sent == []  # the room is not bound to it


@pytest_twisted.ensureDeferred
async def test_a_request_the_module_opened_for_the_room_is_its_thread(db: sqlite3.Cursor) -> None:
    fhir = Fhir()
    thread = fhir.put(own_request())
    stand = await started(stand_in(db, fhir=fhir))
    await stand.send(text("$first"))
    written = stand.fhir.communication("$first")
    assert written is not None and written["partOf"][0]["reference"] == thread
    assert [e["content"] for e in stand.api.state_sent] == [{"reference": thread}]


@pytest.mark.parametrize("profile", [OZO, BASE])
@pytest_twisted.ensureDeferred
async def test_a_recorded_message_stays_withdrawable_when_its_thread_no_longer_passes(
    db: sqlite3.Cursor, profile: CommunicationProfile
) -> None:
    """The thread the module opened is found again after a restart by the room's id; a
    change since (someone added a recipient, the team's patient was corrected) must not make
    the room's redactions skip its own messages."""
    fhir = Fhir()
    stand = await started(stand_in(db, profile, fhir=fhir))
    await stand.send(text("$first"))
    (request,) = fhir.find("CommunicationRequest", ROOM_ID_SYSTEM, ROOM)
    thread = f"CommunicationRequest/{request['id']}"
    fhir.stored[thread]["recipient"].append({"reference": OTHER_TEAM, "type": "CareTeam"})
    restarted = await started(stand_in(db, profile, fhir=fhir))  # (no thread in memory)
    await restarted.send(redaction("$undo", "$first"))
    withdrawn = fhir.communication("$first")
    assert withdrawn is not None and withdrawn["status"] == "entered-in-error"
    assert restarted.dead() == {}


@pytest_twisted.ensureDeferred
async def test_a_redaction_in_one_room_never_withdraws_another_rooms_message(
    db: sqlite3.Cursor,
) -> None:
    stand = await started(stand_in(db))
    await stand.send(text("$theirs", room=OTHER_ROOM), text("$ours"))
    restarted = await started(stand_in(db, fhir=stand.fhir))
    await restarted.send(redaction("$undo", "$theirs"))  # (sent in ROOM)
    theirs = stand.fhir.communication("$theirs")
    assert theirs is not None and theirs["status"] == "completed"
    assert restarted.dead() == {}


@pytest_twisted.ensureDeferred
async def test_a_redaction_waits_when_the_rooms_thread_is_gone(db: sqlite3.Cursor) -> None:
    """FHIR holds the message but no request under the room's id any more: never left as
    it was unnoticed — a dead letter, retried once the thread is back."""
    fhir = Fhir()
    stand = await started(stand_in(db, fhir=fhir))
    await stand.send(text("$first"))
    (request,) = fhir.find("CommunicationRequest", ROOM_ID_SYSTEM, ROOM)
    del fhir.stored[f"CommunicationRequest/{request['id']}"]
    restarted = await started(stand_in(db, fhir=fhir))
    await restarted.send(redaction("$undo", "$first"))
    assert restarted.dead() == {
        "$undo": "no thread found for the room (its request is gone from FHIR?)"
    }
    first = fhir.communication("$first")
    assert first is not None and first["status"] == "completed"


@pytest_twisted.ensureDeferred
async def test_an_exempt_account_without_a_person_is_counted_not_kept(
    db: sqlite3.Cursor,
) -> None:
    """An audit bot the operator exempted has no person by design: under OZO its messages
    are not written (counted), rather than piling up as dead letters no retry will write."""
    stand = stand_in(db, exempt_users=["@audit:example.org"])
    await started(stand)
    await stand.send(text("$audit", sender="@audit:example.org"), text("$first"))
    assert stand.fhir.communication("$audit") is None
    assert stand.fhir.communication("$first") is not None
    counts = await stand.recorder.counts()
    assert (counts.pending, counts.dead, counts.not_written_profile) == (0, 0, 1)


@pytest_twisted.ensureDeferred
async def test_a_room_without_a_request_gets_its_own(db: sqlite3.Cursor) -> None:
    stand = await started(stand_in(db))
    await stand.send(text("$first"))
    written = stand.fhir.communication("$first")
    assert written is not None
    (request,) = stand.fhir.find("CommunicationRequest", ROOM_ID_SYSTEM, ROOM)
    assert written["partOf"][0]["reference"] == f"CommunicationRequest/{request['id']}"
    assert ORIGIN_TAG in request["meta"]["tag"]


@pytest_twisted.ensureDeferred
async def test_a_reply_to_a_message_fhir_will_refuse_in_the_same_batch_is_still_written(
    db: sqlite3.Cursor,
) -> None:
    """Any member can send a message the writer refuses (an empty body): a reply to it in
    the same batch must not name it, or the reply dies with it."""
    stand = await started(stand_in(db))
    await stand.send(text("$empty", body=""), reply("$answer", "$empty"))
    assert set(stand.dead()) == {"$empty"}
    assert in_response_to(stand, "$answer") is None


# -- one message's permanent failure never holds back the others ---------------------------


class RefusingTeams(Teams):
    """FHIR answers 4xx for one team (e.g. a search it cannot run): for good."""

    async def membership(self, team_ref: str) -> Membership:
        if team_ref == OTHER_TEAM:
            refused = error_for_status(400, "search", {"resourceType": "OperationOutcome"})
            raise DirectoryUnavailable(f"{team_ref}: {refused}") from refused
        return await super().membership(team_ref)


@pytest_twisted.ensureDeferred
async def test_a_lookup_fhir_refuses_for_one_message_dead_letters_that_one_only(
    db: sqlite3.Cursor,
) -> None:
    stand = await started(stand_in(db, BASE, teams=RefusingTeams()))
    await stand.send(text("$a"), text("$b", room=OTHER_ROOM), text("$c"))
    assert stand.fhir.communication("$a") is not None
    assert stand.fhir.communication("$c") is not None
    assert stand.fhir.communication("$b") is None
    assert list(stand.dead()) == ["$b"]
    assert stand.dead()["$b"].startswith("FHIR refused a lookup it needs: ")
    assert (await stand.recorder.counts()).pending == 0


class FlakyFhir(Fhir):
    """Unreachable while ``down``."""

    down = False

    async def transaction_json(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        if self.down:
            raise FhirTransientError("transaction: FHIR server unreachable (refused)")
        return await super().transaction_json(bundle)


@pytest_twisted.ensureDeferred
async def test_while_fhir_is_unreachable_messages_wait_in_memory_not_in_the_table(
    db: sqlite3.Cursor,
) -> None:
    fhir, clock = FlakyFhir(), Clock()
    stand = await started(stand_in(db, BASE, fhir=fhir, clock=clock))
    fhir.down = True
    await stand.send(text("$a"), text("$b"))
    assert (await stand.recorder.counts()).pending == 2
    assert outbox_store.counts(db) == (0, 0)  # (nothing written on the send path)
    fhir.down = False
    # The drain tries again once its wait is over, without waiting for a checkpoint.
    clock.advance(1.0)  # (the first wait: at most 1 s)
    await stand.api.drain()
    assert stand.fhir.communication("$a") is not None
    assert stand.fhir.communication("$b") is not None
    assert (await stand.recorder.counts()).pending == 0


@pytest_twisted.ensureDeferred
async def test_a_message_redacted_before_it_was_read_back_is_written_withdrawn(
    db: sqlite3.Cursor,
) -> None:
    """Read from Synapse's stream after a restart, a redacted message comes without its
    content: it is written withdrawn, and nothing of what it said."""
    position_store.create_schema(db)
    position_store.save_position(db, "s1", 0)  # (saved before the crash)
    stream = Stream()
    redaction_event = {"sender": "@carla:example.org", "origin_server_ts": 1_779_000_000_500}
    stream.stored = [
        {
            "event_id": "$gone",
            "room_id": ROOM,
            "type": "m.room.message",
            "sender": "@anna:example.org",
            "origin_server_ts": 1_779_000_000_000,
            "content": {},
            "unsigned": {"redacted_because": redaction_event},
        },
        {**vars(text("$kept")), "unsigned": {"age": 10}},
    ]
    stand = await started(stand_in(db, BASE, stream=stream))
    written = stand.fhir.communication("$gone")
    assert written is not None and written["status"] == "entered-in-error"
    assert "payload" not in written
    assert written["note"][0]["authorReference"]["reference"] == "RelatedPerson/d-1"
    assert stand.fhir.communication("$kept")["payload"] == [{"contentString": "BP 150/95"}]
    assert position_store.load(db).stream_token == "s1"  # (saved on the next step)
    await stand.recorder.step()
    assert position_store.load(db).stream_token == "s2"


@pytest_twisted.ensureDeferred
async def test_a_message_fhir_has_is_never_withdrawn_by_reading_it_back_redacted(
    db: sqlite3.Cursor,
) -> None:
    """Someone else's redaction does not withdraw a recorded message (redactions: sender),
    also when the message is read back after a restart without its content."""
    stream = Stream()
    stand = await started(stand_in(db, BASE, stream=stream))
    await stand.send(text("$had"))
    before = copy.deepcopy(stand.fhir.communication("$had"))
    assert before is not None and before["status"] == "completed"

    position_store.save_position(db, "s1", 0)  # (as if the position had not moved)
    redaction_event = {"sender": "@carla:example.org", "origin_server_ts": 1_779_000_000_500}
    stream.stored = [
        {
            **vars(text("$had")),
            "content": {},
            "unsigned": {"redacted_because": redaction_event},
        },
        {**vars(redaction("$r", "$had")), "sender": "@carla:example.org"},
    ]
    restarted = await started(stand_in(db, BASE, fhir=stand.fhir, stream=stream))
    assert restarted.fhir.communication("$had") == before


class StuckFhir(Fhir):
    """Answers (unless not ``answering``), but every transaction holding ``$stuck`` times
    out (a 5xx, for good)."""

    answering = True

    async def capabilities(self, timeout: float) -> dict[str, Any]:
        if not self.answering:
            raise FhirTransientError("metadata: FHIR server unreachable (refused)")
        return {"resourceType": "CapabilityStatement"}

    async def transaction_json(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        for entry in bundle["entry"]:
            if entry["resource"]["identifier"][0]["value"] == "$stuck":
                raise FhirTransientError("transaction failed with HTTP 504", status=504)
        return await super().transaction_json(bundle)


@pytest_twisted.ensureDeferred
async def test_one_message_fhir_keeps_failing_on_waits_alone_and_the_rest_goes_on(
    db: sqlite3.Cursor,
) -> None:
    stand = await started(stand_in(db, BASE, fhir=StuckFhir()))
    others = [text(f"$m{n}", room=OTHER_ROOM if n % 2 else ROOM) for n in range(8)]
    await stand.send(others[0], text("$stuck"), *others[1:])
    for _ in range(40):  # (each a periodic wake-up, without waiting out the backoff)
        stand.recorder._backoff_until = 0.0
        stand.recorder.wake()
        await stand.api.drain()
    # $stuck waits in the table, and so do its room's later messages (a room's order);
    # the other room's are written.
    assert stand.fhir.communication("$m0") is not None
    assert all(stand.fhir.communication(e.event_id) for e in others if e.room_id == OTHER_ROOM)
    waiting = {row.event_id for row in outbox_store.due_rows(db, 2**62, 100)}
    assert "$stuck" in waiting
    assert waiting == {"$stuck"} | {e.event_id for e in others[1:] if e.room_id == ROOM}
    assert stand.fhir.communication("$stuck") is None

    def retry_all_now() -> None:
        db.execute("UPDATE synapse_fhir_outbox SET next_attempt_ms = 0")  # (no waiting)

    # Failures while FHIR does not even answer do not count: it waits, however long.
    stand.fhir.answering = False  # type: ignore[attr-defined]
    for _ in range(DEAD_AFTER + 5):
        retry_all_now()
        await stand.recorder._read_table()
        stand.recorder.wake()
        await stand.api.drain()
    assert stand.dead() == {}
    # It keeps failing while FHIR answers: a dead letter after DEAD_AFTER such failures
    # (the outage's did not count), with the reason; its room's later messages go on.
    stand.fhir.answering = True  # type: ignore[attr-defined]
    for _ in range(DEAD_AFTER - 2):
        retry_all_now()
        await stand.recorder._read_table()
        stand.recorder.wake()
        await stand.api.drain()
    assert stand.dead() == {}
    for _ in range(5):
        retry_all_now()
        await stand.recorder._read_table()
        stand.recorder.wake()
        await stand.api.drain()
    assert stand.dead() == {"$stuck": stand.dead()["$stuck"]}
    assert stand.dead()["$stuck"].startswith("kept failing while FHIR answered")
    assert all(stand.fhir.communication(e.event_id) for e in others)
    assert stand.fhir.communication("$stuck") is None


@pytest_twisted.ensureDeferred
async def test_a_restart_does_not_start_the_count_of_failures_while_fhir_answers_again(
    db: sqlite3.Cursor,
) -> None:
    """The count is kept in the outbox row (schema version 2): a message FHIR keeps
    failing on becomes a dead letter after DEAD_AFTER failures in all, restarts or not."""
    stuck = StuckFhir()
    stand = await started(stand_in(db, BASE, fhir=stuck))
    await stand.send(text("$stuck"))

    async def fail_once(recorder: CommunicationRecorder, api: Api) -> None:
        db.execute("UPDATE synapse_fhir_outbox SET next_attempt_ms = 0")  # (no waiting)
        await recorder._read_table()
        recorder._backoff_until = 0.0
        recorder.wake()
        await api.drain()

    for _ in range(STUCK_AFTER + 2):  # (until it waits alone in the table)
        await fail_once(stand.recorder, stand.api)
    assert "$stuck" in {row.event_id for row in outbox_store.due_rows(db, 2**62, 10)}

    def failures() -> int:
        return int(
            db.execute(
                "SELECT failed_answering FROM synapse_fhir_outbox WHERE event_id = '$stuck'"
            ).fetchone()[0]
        )

    while failures() < DEAD_AFTER - 1:
        await fail_once(stand.recorder, stand.api)
    assert stand.dead() == {}
    # A new process, on the same table: one more failure, and it is a dead letter.
    restarted = await started(stand_in(db, BASE, fhir=stuck))
    assert restarted.dead() == {}
    await fail_once(restarted.recorder, restarted.api)
    assert restarted.dead() == {"$stuck": restarted.dead()["$stuck"]}
    assert restarted.dead()["$stuck"].startswith("kept failing while FHIR answered")
    # Retried by the admin, it starts from nothing.
    assert outbox_store.requeue_dead(db, ["$stuck"], 0) == 1
    assert outbox_store.failed_answering(db, "$stuck") == 1


@pytest_twisted.ensureDeferred
async def test_rows_an_earlier_version_left_in_the_outbox_are_written_first(
    db: sqlite3.Cursor,
) -> None:
    """Upgrading in place: the outbox held every message on its way; what a stop left there
    is written at start-up, in order, and the table keeps only dead letters after."""
    outbox_store.create_schema(db)
    for n, event in enumerate((text("$old1"), reply("$old2", "$old1"))):
        row = {**vars(event), "room_id": ROOM}
        assert outbox_store.enqueue(db, row, 1_000 + n)
    stand = await started(stand_in(db, BASE))
    await stand.send(text("$new"))
    parent = stand.fhir.communication("$old1")
    assert parent is not None
    assert in_response_to(stand, "$old2") == [{"reference": f"Communication/{parent['id']}"}]
    assert stand.fhir.communication("$new") is not None
    assert outbox_store.counts(db) == (0, 0)
