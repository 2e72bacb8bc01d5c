"""Recording as Synapse runs it: the instance that runs background work drains messages to
FHIR and reads Synapse's stream back; every instance answers ``/health`` and the dead
letters from the tables."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attr
from synapse.module_api import EventBase, ModuleApi

from synapse_fhir_module.config import CommunicationProfile, ModuleConfig
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.recording.counts import OutboxCounts
from synapse_fhir_module.recording.figures import RecordingFigures
from synapse_fhir_module.recording.recent_writes import RecentWrites
from synapse_fhir_module.recording.recorder import CommunicationRecorder, NoteMessages

logger = logging.getLogger(__name__)

RETRY_MS = 5_000
WAKE_INTERVAL_MS = 1_000


@attr.s(frozen=True, auto_attribs=True)
class RecordingPart:
    """What the rest of the module asks of recording on this instance."""

    counts: Callable[[], Awaitable[OutboxCounts]]
    # Dead letters were made pending again (the admin's retry).
    table_changed: Callable[[], None]
    # The draining instance only: each event Synapse reports.
    on_event: Callable[[EventBase], None] | None


def register_recording(
    api: ModuleApi,
    config: ModuleConfig,
    *,
    fhir: FhirClient,
    bindings: RoomBindings,
    teams: CareTeamDirectory,
    persons: PersonDirectory,
    service_user_id: str,
    recent_writes: RecentWrites,
    runs_here: bool,
    note_messages: NoteMessages | None,
    first: Callable[[], Awaitable[None]] | None,
) -> RecordingPart | None:
    """Recording, when ``communication.enabled``: the recorder where background work runs,
    the tables' figures elsewhere. ``first``: what must be ready before the recorder starts
    (the unread markers' tables, which it writes notes into)."""
    if not config.communication.enabled:
        return None
    if not runs_here:
        figures = RecordingFigures(
            api, ozo=config.communication.profile is CommunicationProfile.OZO
        )
        # (The draining instance's 1 s wake-up finds the retried rows.)
        return RecordingPart(figures.counts, table_changed=_do_nothing, on_event=None)
    recorder = CommunicationRecorder(
        api,
        config.communication,
        fhir,
        bindings,
        teams,
        persons,
        service_user_id=service_user_id,
        exempt_users=config.enforcement.exempt_users,
        recent_writes=recent_writes,
        note_messages=note_messages,
    )

    async def start() -> None:
        try:
            if first is not None:
                await first()
            await recorder.start()
        except Exception as e:
            # Until the tables exist nothing is written: keep trying.
            logger.warning("Could not start the outbox (%s); trying again in 5 s", e)
            api.delayed_background_call(RETRY_MS, start, desc="fhir_outbox_start")

    api.delayed_background_call(0, start, desc="fhir_outbox_start")
    # Rows waiting for a retry are picked up by this periodic wake-up. (The module decides
    # where background work runs — `worker` — so its loops must not also depend on
    # Synapse's own run_background_tasks_on.)
    api.looping_background_call(
        recorder.wake, WAKE_INTERVAL_MS, desc="fhir_outbox_wake", run_on_all_instances=True
    )
    # Where recording stands in Synapse's stream: read on, and saved.
    api.looping_background_call(
        recorder.step,
        int(config.communication.checkpoint_interval * 1000),
        desc="fhir_recording_step",
        run_on_all_instances=True,
    )
    return RecordingPart(recorder.counts, recorder.table_changed, recorder.on_new_event)


def _do_nothing() -> None:
    pass
