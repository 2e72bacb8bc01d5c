"""Names from FHIR (a team's name, a thread's category) as Matrix room names."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.mapping.relay_content import clean_text
from synapse_fhir_module.sync.care_rooms import ROOM_NAME_BYTES, fitting_name


def test_a_short_name_is_kept_as_it_is() -> None:
    assert fitting_name("Wound care") == "Wound care"


@given(st.text(min_size=1, max_size=5_000) | st.just("a\ud800b\x01c"))
def test_any_name_fits_the_bound_and_keeps_its_start(name: str) -> None:
    fitted = fitting_name(name)
    assert len(fitted.encode("utf-8")) <= ROOM_NAME_BYTES
    assert clean_text(name).startswith(fitted.removesuffix("…"))
    fitted.encode("utf-8")  # (nothing an event could not carry)
