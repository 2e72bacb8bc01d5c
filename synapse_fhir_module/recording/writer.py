"""Writes a batch of Communications to FHIR as one ``transaction`` Bundle.

Every new message is a conditional create (``ifNoneExist`` on its event id), so sending
the same batch twice — a retry after a timeout whose answer was lost — changes nothing.
When FHIR refuses the transaction for good (a 4xx other than 408/429), the batch is
split in halves until the entries it refuses are alone: those become dead letters with
FHIR's reason, and everything else is written. Transient errors are raised for the
caller to retry the whole batch later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attr
from fhir.resources.R4B.communication import Communication
from pydantic import ValidationError

from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.errors import FhirPermanentError, FhirTransientError
from synapse_fhir_module.mapping.communication import CommunicationWrite
from synapse_fhir_module.mapping.profile import (
    OZO_COMMUNICATION,
    communication_problems,
    declares,
)

logger = logging.getLogger(__name__)


@attr.s(auto_attribs=True)
class WriteResult:
    written: list[str] = attr.Factory(list)  # event ids FHIR now has
    dead: dict[str, str] = attr.Factory(dict)  # event id -> why FHIR refused it
    locations: list[str] = attr.Factory(list)  # "Communication/<id>" FHIR wrote
    location_of: dict[str, str] = attr.Factory(dict)  # event id -> its "Communication/<id>"
    # Event ids FHIR had already (the conditional create matched: a replay after a crash).
    already_there: set[str] = attr.Factory(set)


class CommunicationWriter:
    def __init__(self, fhir: FhirClient) -> None:
        self._fhir = fhir

    async def write(self, writes: Sequence[tuple[str, CommunicationWrite]]) -> WriteResult:
        """``writes``: (event id, write) in the order they must be applied."""
        result = WriteResult()
        valid = []
        for event_id, write in writes:
            problem = invalid_fhir(write)
            if problem:
                # Checked one by one: a single invalid entry would fail the whole Bundle.
                logger.warning("The Communication for %s is not valid FHIR", event_id)
                result.dead[event_id] = problem
            else:
                valid.append((event_id, write))
        await self._write_part(valid, result)
        return result

    async def _write_part(
        self, writes: list[tuple[str, CommunicationWrite]], result: WriteResult
    ) -> None:
        if not writes:
            return
        try:
            response = await self._fhir.transaction_json(_bundle(writes))
        except FhirPermanentError as e:
            if e.status in (401, 403, 407):
                # FHIR refuses the module itself (its credentials, a policy), not an entry:
                # the batch waits, rather than every message becoming a dead letter.
                raise FhirTransientError(str(e.args[0]), status=e.status) from e
            if len(writes) == 1:
                event_id = writes[0][0]
                reason = f"HTTP {e.status}: {e.outcome or e}"
                logger.warning(
                    "FHIR refused the Communication for %s (HTTP %s)", event_id, e.status
                )
                result.dead[event_id] = reason
                return
            middle = len(writes) // 2
            await self._write_part(writes[:middle], result)
            await self._write_part(writes[middle:], result)
            return
        locations = _locations(response)
        result.written.extend(event_id for event_id, _ in writes)
        result.locations.extend(locations)
        event_ids = [event_id for event_id, _ in writes]
        if len(locations) == len(writes):  # (a response's entries follow the request's)
            result.location_of.update(zip(event_ids, locations, strict=True))
        statuses = _statuses(response)
        if len(statuses) == len(writes):
            # (A conditional create that found its resource; a 200 to an update changed it.)
            result.already_there.update(
                event_id
                for (event_id, write), status in zip(writes, statuses, strict=True)
                if write.if_none_exist and status.startswith("200")
            )


def invalid_fhir(write: CommunicationWrite) -> str | None:
    """Why the write's resource is not a valid R4B Communication, or None when it is."""
    return invalid_communication(write.resource)


def invalid_communication(resource: dict[str, Any]) -> str | None:
    """Why ``resource`` is not a valid R4B Communication, or does not meet the OZO profile
    it declares; None when it is fine.

    The reason names the fields and rules only, never their values (message text).
    """
    try:
        Communication.model_validate(resource)
    except ValidationError as e:
        problems = (
            f"{'.'.join(str(part) for part in error['loc']) or 'resource'}: {error['msg']}"
            for error in e.errors(include_input=False, include_url=False)
        )
        return "not valid FHIR: " + "; ".join(problems)
    if declares(resource, OZO_COMMUNICATION):
        # Never a profile claimed that the resource does not meet.
        unmet = communication_problems(resource)
        if unmet:
            return "does not meet OZOCommunication: " + "; ".join(unmet)
    return None


def _bundle(writes: Sequence[tuple[str, CommunicationWrite]]) -> dict[str, Any]:
    # Plain JSON: every entry has passed `invalid_fhir` already.
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [write.bundle_entry() for _, write in writes],
    }


def _statuses(response: dict[str, Any]) -> list[str]:
    """Each entry's ``response.status`` ("201 Created"; "200 OK" when a conditional create
    found the resource there already)."""
    return [str(_response_of(entry).get("status") or "") for entry in _entries(response)]


def _locations(response: dict[str, Any]) -> list[str]:
    """``Communication/<id>`` of each entry FHIR created or updated (from ``Location``)."""
    found = []
    for entry in _entries(response):
        location = _response_of(entry).get("location")
        if isinstance(location, str) and location.startswith("Communication/"):
            found.append("/".join(location.split("/")[:2]))
    return found


def _entries(response: dict[str, Any]) -> list[Any]:
    entries = response.get("entry")
    return entries if isinstance(entries, list) else []


def _response_of(entry: Any) -> dict[str, Any]:
    answer = entry.get("response") if isinstance(entry, dict) else None
    return answer if isinstance(answer, dict) else {}
