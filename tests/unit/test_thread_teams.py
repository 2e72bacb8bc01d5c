"""The CareTeams a thread's room is shared by (pure)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.fhir.thread_teams import SENDER_CARETEAM, further_teams, request_teams


def test_recipients_in_order_then_the_sender_team_without_repeats() -> None:
    request = {
        "recipient": [
            {"reference": "CareTeam/b", "type": "CareTeam"},
            {"reference": "Practitioner/p"},
            {"reference": "CareTeam/a/_history/3"},
            {"reference": "CareTeam/b"},
        ],
        "extension": [
            {"url": "urn:other", "valueReference": {"reference": "CareTeam/x"}},
            {"url": SENDER_CARETEAM, "valueReference": {"reference": "CareTeam/s"}},
        ],
    }
    assert request_teams(request) == ["CareTeam/b", "CareTeam/a", "CareTeam/s"]


def test_a_sender_team_also_listed_as_recipient_counts_once() -> None:
    request = {
        "recipient": [{"reference": "CareTeam/s"}, {"reference": "CareTeam/b"}],
        "extension": [{"url": SENDER_CARETEAM, "valueReference": {"reference": "CareTeam/s"}}],
    }
    assert request_teams(request) == ["CareTeam/s", "CareTeam/b"]


def test_no_team() -> None:
    assert request_teams({"recipient": [{"reference": "Practitioner/p"}]}) == []
    assert request_teams({}) == []


def test_further_teams_are_the_others_sorted() -> None:
    assert further_teams("CareTeam/a", ["CareTeam/c", "CareTeam/a", "CareTeam/b"]) == (
        "CareTeam/b",
        "CareTeam/c",
    )
    # Readdressed away from the first team: it stays first, the others follow the request.
    assert further_teams("CareTeam/a", ["CareTeam/z"]) == ("CareTeam/z",)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "recipient": st.one_of(
                _JSON, st.lists(st.fixed_dictionaries({"reference": _JSON}), max_size=3)
            ),
            "extension": st.one_of(
                _JSON,
                st.lists(
                    st.fixed_dictionaries(
                        {"url": st.just(SENDER_CARETEAM), "valueReference": _JSON}
                    ),
                    max_size=2,
                ),
            ),
        },
    )
)
def test_any_json_gives_distinct_care_team_references(request: dict[str, Any]) -> None:
    teams = request_teams(request)
    assert len(teams) == len(set(teams))
    assert all(t.startswith("CareTeam/") and t.count("/") == 1 and t != "CareTeam/" for t in teams)
