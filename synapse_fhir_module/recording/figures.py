"""Recording's ``/health`` figures: the tables' counts plus the messages held in memory —
the drain's own count where it runs; elsewhere what it reports in its table about once a
second (``RecordingFigures``)."""

from __future__ import annotations

import logging

from synapse.module_api import ModuleApi

from synapse_fhir_module.recording import outbox_store, position_store
from synapse_fhir_module.recording.counts import OutboxCounts
from synapse_fhir_module.recording.metrics import OUTBOX_DEAD, OUTBOX_PENDING

logger = logging.getLogger(__name__)


class RecordingFigures:
    def __init__(self, api: ModuleApi, *, ozo: bool) -> None:
        self._api = api
        # (This instance writes nothing, so leaves nothing unwritten for the profile.)
        self._not_written = 0 if ozo else None

    async def counts(self) -> OutboxCounts:
        return await read_counts(self._api, held=None, not_written=self._not_written)


async def read_counts(
    api: ModuleApi,
    *,
    held: tuple[int, int] | None,
    not_written: int | None,
) -> OutboxCounts:
    """The table's figures plus the messages held in memory: ``held`` (how many, and how
    long the oldest has waited, in ms) where the drain runs, else what the draining
    instance last reported in its table."""
    try:
        table_pending, dead = await api.run_db_interaction(
            "fhir_outbox_counts", outbox_store.counts
        )
        if held is None:
            held = await api.run_db_interaction("fhir_recording_counts", position_store.reported)
    except Exception:  # e.g. the tables are not there yet
        logger.debug("Outbox counts unavailable", exc_info=True)
        return OutboxCounts(not_written_profile=not_written)
    pending = table_pending + held[0]
    OUTBOX_PENDING.set(pending)
    OUTBOX_DEAD.set(dead)
    return OutboxCounts(
        pending=pending, dead=dead, not_written_profile=not_written, behind_ms=held[1]
    )
