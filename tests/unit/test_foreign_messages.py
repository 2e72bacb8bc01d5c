"""Other systems' Communications in a thread: which are relayed, in what order, replying
to what (pure)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM, ORIGIN_TAG
from synapse_fhir_module.sync.foreign_messages import (
    answered,
    conditional_event_id,
    is_module_written,
    literal_id,
    part_of,
    recorded_event_id,
    relay_order,
    with_reply,
)

THREAD = "CommunicationRequest/t1"


def communication(resource_id: str, last_updated: Any = None, **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Communication", "id": resource_id, **fields}
    if last_updated is not None:
        resource["meta"] = {"lastUpdated": last_updated}
    return resource


def test_an_ozo_style_communication_is_foreign() -> None:
    # (As the guide's examples write them: no identifier, no `sent`, no tag.)
    assert not is_module_written(communication("c", partOf=[{"reference": THREAD}]))
    # Another system's own identifier or `sent` does not make it ours.
    assert not is_module_written(
        communication(
            "c", identifier=[{"system": "urn:other", "value": "1"}], sent="2025-01-01T00:00:00Z"
        )
    )


def test_the_modules_own_by_tag_or_by_event_id_identifier() -> None:
    assert is_module_written(communication("c", meta={"tag": [dict(ORIGIN_TAG)]}))
    # The tag lost on the way: the event-id identifier alone still marks it.
    assert is_module_written(
        communication("c", identifier=[{"system": EVENT_ID_SYSTEM, "value": "$abc"}])
    )


def test_fhirs_order_oldest_first_ties_by_id_unreadable_last() -> None:
    resources = [
        communication("b", "2025-01-01T10:00:00.500+01:00"),
        communication("z", "2025-01-01T09:00:00.100Z"),  # = 10:00:00.100+01:00
        communication("a", "2025-01-01T10:00:00.500+01:00"),
        communication("x", "garbled"),
        communication("y"),
        communication("c", "2025-01-01T08:59:59Z"),
    ]
    assert [r["id"] for r in relay_order(resources)] == ["c", "z", "a", "b", "x", "y"]


def test_what_a_communication_answers() -> None:
    assert answered(communication("c")) is None
    assert answered(communication("c", inResponseTo=[{"display": "x"}])) is None
    assert (
        answered(communication("c", inResponseTo=[{"reference": "Communication/9"}]))
        == "Communication/9"
    )
    assert answered(communication("c", inResponseTo=[{"reference": "Task/9"}])) is None
    assert literal_id("Communication/9") == "9"
    assert literal_id("Communication/9/_history/2") == "9"
    assert literal_id("Task/9") is None and literal_id("Communication/") is None


def test_the_recorders_conditional_reference_names_an_event() -> None:
    ref = f"Communication?identifier={EVENT_ID_SYSTEM}|$ev1:x"
    assert conditional_event_id(ref) == "$ev1:x"
    assert conditional_event_id("Communication?identifier=urn:other|$ev1") is None
    assert conditional_event_id(f"Communication?identifier={EVENT_ID_SYSTEM}|a,b") is None
    assert conditional_event_id("Communication/1") is None


def test_a_recorded_event_belongs_to_its_thread_only() -> None:
    recorded = communication(
        "r",
        identifier=[{"system": EVENT_ID_SYSTEM, "value": "$ev1"}],
        partOf=[{"reference": THREAD}],
    )
    assert recorded_event_id(recorded) == "$ev1"
    assert part_of(recorded, THREAD)
    assert not part_of(recorded, "CommunicationRequest/other")
    assert recorded_event_id(communication("r", identifier=[{"system": EVENT_ID_SYSTEM}])) is None


def test_a_reply_relation() -> None:
    assert with_reply({"body": "x"}, "$e") == {
        "body": "x",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$e"}},
    }


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "id": _JSON,
                "meta": st.one_of(_JSON, st.fixed_dictionaries({"lastUpdated": _JSON})),
                "identifier": _JSON,
                "inResponseTo": _JSON,
                "partOf": _JSON,
            },
        ),
        max_size=5,
    )
)
def test_any_json_is_read_without_error(resources: list[dict[str, Any]]) -> None:
    ordered = relay_order(resources)
    assert len(ordered) == len(resources)
    for resource in resources:
        is_module_written(resource)
        part_of(resource, THREAD)
        reference = answered(resource)
        if reference is not None:
            literal_id(reference)
            conditional_event_id(reference)


def test_part_of_reads_the_thread_reference_as_every_part_of_the_module_does() -> None:
    thread = "CommunicationRequest/cr-1"
    assert part_of({"partOf": [{"reference": f"{thread}/_history/2"}]}, thread)
    assert not part_of({"partOf": [{"reference": f"https://elsewhere.example/{thread}"}]}, thread)
    assert not part_of({"partOf": "CommunicationRequest/cr-1"}, thread)
