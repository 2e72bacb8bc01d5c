"""identity.lookup and its keys: defaults (off), values, and errors naming the key."""

from __future__ import annotations

from typing import Any

import pytest
from synapse.module_api.errors import ConfigError

from synapse_fhir_module import FhirModule
from synapse_fhir_module.config import IdentityConfig

BASE: dict[str, Any] = {"fhir": {"base_url": "http://127.0.0.1:8080/fhir"}}


def identity(**keys: Any) -> dict[str, Any]:
    return {**BASE, "identity": keys}


def test_lookups_are_off_by_default() -> None:
    config = FhirModule.parse_config(BASE).identity
    assert config.lookup is False
    assert config.lookup_token_lifetime == 86400.0
    assert config.lookup_homeserver_url is None
    assert (config.lookup_burst, config.lookup_per_second) == (1000, 1.0)


def test_every_lookup_key_is_read() -> None:
    config = FhirModule.parse_config(
        identity(
            lookup=True,
            lookup_token_lifetime="2h",
            lookup_homeserver_url="http://127.0.0.1:8008/",
            lookup_burst=50,
            lookup_per_second=0.5,
        )
    ).identity
    assert config == IdentityConfig(
        lookup=True,
        lookup_token_lifetime=7200.0,
        lookup_homeserver_url="http://127.0.0.1:8008",
        lookup_burst=50,
        lookup_per_second=0.5,
    )


@pytest.mark.parametrize(
    ("keys", "key", "explanation"),
    [
        ({"lookup": "yes"}, "lookup", "true or false"),
        ({"lookup": True, "email": False}, "lookup", "identity.email"),
        ({"lookup_token_lifetime": 3600}, "lookup_token_lifetime", "'10s'"),
        ({"lookup_homeserver_url": "matrix.example.org"}, "lookup_homeserver_url", "http(s)"),
        (
            {"lookup_homeserver_url": "https://u:p@matrix.example.org"},
            "lookup_homeserver_url",
            "credentials",
        ),
        ({"lookup_burst": 0}, "lookup_burst", "from 1"),
        ({"lookup_burst": "many"}, "lookup_burst", "whole number"),
        ({"lookup_per_second": 0}, "lookup_per_second", "more than 0"),
        ({"lookup_per_second": True}, "lookup_per_second", "a number"),
        ({"lookups": True}, "lookups", "unknown key"),
    ],
)
def test_a_wrong_lookup_key_is_named(keys: dict[str, Any], key: str, explanation: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FhirModule.parse_config(identity(**keys))
    assert tuple(caught.value.path or ()) == ("identity", key)
    assert explanation in str(caught.value)
