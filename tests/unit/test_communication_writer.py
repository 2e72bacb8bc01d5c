"""The writer keeps entries FHIR could never accept out of the Bundle (no FHIR server here:
the client is a recording stand-in; tests/integration/test_communication_writer.py uses HAPI)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.mapping.communication import (
    CommunicationWrite,
    RoomContext,
    message_write,
)
from synapse_fhir_module.recording.writer import CommunicationWriter, invalid_fhir

ROOM = RoomContext(thread="CommunicationRequest/t", care_team="CareTeam/c", patient=None)


def write_of(event_id: str, body: str = "hello") -> CommunicationWrite:
    event = {
        "type": "m.room.message",
        "event_id": event_id,
        "origin_server_ts": 1_779_000_000_000,
        "content": {"msgtype": "m.text", "body": body},
    }
    return message_write(event, ROOM, "Practitioner/gp")


def broken(write: CommunicationWrite, text: str) -> CommunicationWrite:
    """The write with a payload no FHIR server accepts (a negative attachment size)."""
    resource = dict(write.resource, payload=[{"contentAttachment": {"title": text, "size": -5}}])
    return CommunicationWrite(write.method, write.url, resource, write.if_none_exist)


class RecordingFhir:
    def __init__(self) -> None:
        self.bundles: list[dict[str, Any]] = []

    async def transaction_json(self, bundle: dict[str, Any]) -> dict[str, Any]:
        self.bundles.append(bundle)
        return {
            "resourceType": "Bundle",
            "entry": [
                {"response": {"location": f"Communication/{n}/_history/1"}}
                for n, _ in enumerate(bundle["entry"])
            ],
        }


def test_invalid_fhir_names_fields_but_never_values() -> None:
    reason = invalid_fhir(broken(write_of("$a"), "secret diagnosis"))
    assert reason is not None
    assert "payload.0.contentAttachment.size" in reason
    assert "secret diagnosis" not in reason
    assert "-5" not in reason
    assert invalid_fhir(write_of("$b")) is None


@pytest_twisted.ensureDeferred
async def test_an_invalid_entry_is_a_dead_letter_and_the_rest_is_written() -> None:
    fhir = RecordingFhir()
    writes = [("$1", write_of("$1")), ("$2", broken(write_of("$2"), "x")), ("$3", write_of("$3"))]
    result = await CommunicationWriter(fhir).write(writes)  # type: ignore[arg-type]
    assert result.written == ["$1", "$3"]
    assert list(result.dead) == ["$2"]
    assert result.locations == ["Communication/0", "Communication/1"]
    assert result.dead["$2"].startswith("not valid FHIR: ")
    (bundle,) = fhir.bundles
    sent = [e["resource"]["identifier"][0]["value"] for e in bundle["entry"]]
    assert sent == ["$1", "$3"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
ODD_ENTRY = st.one_of(
    JSON,
    st.lists(
        st.one_of(
            JSON,
            st.fixed_dictionaries(
                {"response": st.one_of(JSON, st.fixed_dictionaries({"location": JSON}))}
            ),
        ),
        max_size=4,
    ),
)


class OddFhir:
    """A FHIR server whose transaction answer is a Bundle with whatever ``entry`` holds."""

    def __init__(self, entry: Any) -> None:
        self.entry = entry

    async def transaction_json(self, bundle: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": self.entry}


@given(entry=ODD_ENTRY)
def test_a_bundle_answer_of_any_shape_is_read_without_raising(entry: Any) -> None:
    """Whatever the Bundle's ``entry`` holds, the batch counts as written (FHIR said 2xx):
    only well-formed locations are taken, and nothing raises."""
    writes = [("$a", write_of("$a")), ("$b", write_of("$b"))]
    result = _run(CommunicationWriter(OddFhir(entry)).write(writes))  # type: ignore[arg-type]
    assert sorted(result.written) == ["$a", "$b"]
    assert result.dead == {}
    assert all(location.startswith("Communication/") for location in result.locations)


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """A coroutine that never waits (its FHIR answers at once), run to its end."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited")
