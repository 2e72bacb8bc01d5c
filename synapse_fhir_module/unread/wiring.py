"""The unread markers as Synapse runs them: read markers are noted wherever Synapse stores
them; the instance that runs background work writes the Tasks."""

from __future__ import annotations

import logging

from synapse.module_api import EventBase, ModuleApi

from synapse_fhir_module.callback_safety import never_raises
from synapse_fhir_module.config import ModuleConfig
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.unread.tasks import INTERVAL_MS, SWEEP_INTERVAL_MS, UnreadTasks

logger = logging.getLogger(__name__)

RETRY_MS = 5_000


class UnreadPart:
    def __init__(self, api: ModuleApi, tasks: UnreadTasks, *, runs_here: bool) -> None:
        self._api = api
        self._runs_here = runs_here
        self.tasks = tasks
        api.register_account_data_callbacks(
            on_account_data_updated=never_raises(self.tasks.on_account_data_updated, fallback=None)
        )
        api.delayed_background_call(0, self._start, desc="fhir_unread_start")
        if runs_here:
            api.looping_background_call(
                self.tasks.run,
                INTERVAL_MS,
                desc="fhir_unread_tasks",
                # (The module decides where background work runs — `worker` — so its
                # loops must not also depend on Synapse's run_background_tasks_on.)
                run_on_all_instances=True,
            )
            api.looping_background_call(
                self.tasks.sweep,
                SWEEP_INTERVAL_MS,
                desc="fhir_unread_sweep",
                run_on_all_instances=True,
            )

    def on_event(self, event: EventBase) -> None:
        self.tasks.seen(event)
        if self._runs_here and event.type == "m.room.member":
            self._api.run_as_background_process(
                "fhir_unread_members", self.tasks.members_changed, event.room_id
            )

    async def _start(self) -> None:
        try:
            await self.tasks.start()
        except Exception as e:
            logger.warning("Could not open the unread-marker tables (%s); trying again in 5 s", e)
            self._api.delayed_background_call(RETRY_MS, self._start, desc="fhir_unread_start")


def register_unread(
    api: ModuleApi,
    config: ModuleConfig,
    *,
    fhir: FhirClient,
    bindings: RoomBindings,
    teams: CareTeamDirectory,
    runs_here: bool,
) -> UnreadPart | None:
    """The markers, when ``communication.unread_tasks`` is on."""
    if not config.communication.unread_tasks:
        return None
    tasks = UnreadTasks(api, fhir, bindings, teams, profile=config.communication.profile)
    return UnreadPart(api, tasks, runs_here=runs_here)
