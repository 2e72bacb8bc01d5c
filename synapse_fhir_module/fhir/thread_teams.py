"""Which CareTeams share a thread's room (pure): the request's addressees and the team
that replies, and how the room's record follows when the request changes.

A ``CommunicationRequest`` addresses CareTeams in ``recipient``; OZO names the team that
opened the thread (and gets the replies) in the extension ``ozo-sender-careteam``
(a ``valueReference`` on the request). The guide's versions disagree on whether that team
is also listed in ``recipient``: the room's teams are the union either way, in that
order, without repeats.

The room is made for the first of them and stays that team's (binding_store): a request
readdressed in FHIR never takes the room, history and all, away from the team it was made
for. Every other team follows the request: added, its members are invited and its space
lists the room; dropped, they leave (unless another of the room's teams lists them) and
its space no longer lists it. Adding a team to a request pulls its members into the room
with its whole history — the same trust in FHIR writers as for a CareTeam's participants.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SENDER_CARETEAM = "http://ozoverbindzorg.nl/fhir/StructureDefinition/ozo-sender-careteam"


def request_teams(request: Mapping[str, Any]) -> list[str]:
    """``CareTeam/<id>`` references of the request: its CareTeam recipients in order, then
    the sender team; without repeats or version suffixes."""
    found: list[str] = []
    for recipient in _items(request.get("recipient")):
        _add(found, recipient)
    for extension in _items(request.get("extension")):
        if isinstance(extension, Mapping) and extension.get("url") == SENDER_CARETEAM:
            _add(found, extension.get("valueReference"))
    return found


def further_teams(first: str, wanted: Iterable[str]) -> tuple[str, ...]:
    """The room's teams besides the one it was made for, as the record keeps them."""
    return tuple(sorted(set(wanted) - {first}))


def _add(found: list[str], value: Any) -> None:
    reference = value.get("reference") if isinstance(value, Mapping) else None
    if not isinstance(reference, str) or not reference.startswith("CareTeam/"):
        return
    team_id = reference.split("/")[1]
    if team_id and f"CareTeam/{team_id}" not in found:
        found.append(f"CareTeam/{team_id}")


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
