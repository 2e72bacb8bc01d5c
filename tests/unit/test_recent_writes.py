"""The bounded memory of the module's own recent writes."""

from __future__ import annotations

from synapse_fhir_module.recording.recent_writes import RecentWrites


def test_remembers_the_newest_and_forgets_the_oldest() -> None:
    writes = RecentWrites(size=3)
    writes.add_all(["Communication/1", "Communication/2", "Communication/1"])
    writes.add_all(["Communication/3", "Communication/4"])
    assert "Communication/1" not in writes
    assert all(f"Communication/{n}" in writes for n in (2, 3, 4))
