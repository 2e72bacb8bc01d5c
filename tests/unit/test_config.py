"""parse_config: every key (design.md: configuration), defaults, durations, and errors naming
the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from synapse.module_api.errors import ConfigError

from synapse_fhir_module import FhirModule
from synapse_fhir_module.config import (
    EncryptedRoomsPolicy,
    FhirConfig,
    ModuleConfig,
    RecordedRooms,
    RedactionPolicy,
    parse_duration,
)

REPO = Path(__file__).resolve().parents[2]
BASE = {"fhir": {"base_url": "http://127.0.0.1:8080/fhir"}}


def parse(raw: Any) -> ModuleConfig:
    return FhirModule.parse_config(raw)


def error_path(raw: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    return tuple(caught.value.path or ())


def with_key(section: str, key: str, value: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"fhir": dict(BASE["fhir"])}
    raw.setdefault(section, {})[key] = value
    return raw


def test_minimal_config_takes_the_documented_defaults() -> None:
    config = parse(BASE)
    assert config == ModuleConfig(fhir=FhirConfig(base_url="http://127.0.0.1:8080/fhir"))
    assert config.fhir.timeout == 10.0
    assert config.service_user == "fhir"
    assert config.webhook.secret is None
    assert (config.enforcement.enabled, config.enforcement.fail_closed) == (True, True)
    assert config.enforcement.cache_ttl == 300.0
    assert config.communication.encrypted_rooms is EncryptedRoomsPolicy.METADATA_ONLY
    assert config.communication.batch_size == 50
    assert config.communication.rooms is RecordedRooms.CARE_TEAM
    assert config.communication.redactions is RedactionPolicy.SENDER
    assert (config.sync.enabled, config.sync.poll_interval) == (True, 60.0)
    assert config.sync.full_reconcile_interval == 3600.0
    assert config.account_validity.enabled is True
    assert config.registration.require_fhir_identity is False
    assert config.audit.enabled is False
    assert (config.audit.batch_size, config.audit.poll_interval) == (100, 5.0)
    assert config.audit.retention == 30 * 86400.0
    assert config.audit.max_refusals_per_minute == 30
    assert config.worker is None


def test_annotated_snippet_parses_to_the_defaults() -> None:
    """homeserver.module.yaml documents the defaults: it must say what the code does."""
    snippet = yaml.safe_load((REPO / "homeserver.module.yaml").read_text())
    (entry,) = snippet["modules"]
    assert entry["module"] == "synapse_fhir_module.FhirModule"
    documented = parse(entry["config"])
    assert documented == parse(BASE)
    # Every top-level key of the config class is shown in the snippet.
    assert set(entry["config"]) == {field.name for field in ModuleConfig.__attrs_attrs__}


def test_every_key_is_read() -> None:
    raw = {
        "fhir": {
            "base_url": "https://fhir.example.org/r4/",
            "auth": {"bearer_token": "tok"},
            "timeout": "2.5s",
        },
        "service_user": "care-bot",
        "webhook": {"secret": "s3cret"},
        "enforcement": {
            "enabled": False,
            "fail_closed": False,
            "cache_ttl": "90s",
            "exempt_users": ["@audit:example.org"],
        },
        "communication": {
            "enabled": False,
            "encrypted_rooms": "forbid",
            "batch_size": 200,
            "rooms": "all",
            "redactions": "moderators",
        },
        "sync": {
            "enabled": False,
            "poll_interval": "2m",
            "full_reconcile_interval": "30m",
            "subscription": True,
            "subscription_base_url": "https://matrix.example.org/",
            "default_space_name": "Zorgteam",
            "power_levels": {"RelatedPerson": 10},
            "role_power_levels": {"http://snomed.info/sct|62247001": 75},
        },
        "account_validity": {"enabled": False, "expire_unmapped": True},
        "registration": {"require_fhir_identity": True},
        "audit": {
            "enabled": True,
            "batch_size": 20,
            "poll_interval": "250ms",
            "retention": "7d",
            "max_refusals_per_minute": 5,
        },
        "worker": "background_worker",
    }
    config = parse(raw)
    assert config.fhir.base_url == "https://fhir.example.org/r4"  # trailing slash dropped
    assert config.fhir.auth.bearer_token == "tok"
    assert config.fhir.timeout == 2.5
    assert config.service_user == "care-bot"
    assert config.webhook.secret == "s3cret"
    assert (config.enforcement.enabled, config.enforcement.fail_closed) == (False, False)
    assert config.enforcement.cache_ttl == 90.0
    assert config.enforcement.exempt_users == ("@audit:example.org",)
    assert config.communication.encrypted_rooms is EncryptedRoomsPolicy.FORBID
    assert (config.communication.enabled, config.communication.batch_size) == (False, 200)
    assert config.communication.rooms is RecordedRooms.ALL
    assert config.communication.redactions is RedactionPolicy.MODERATORS
    assert (config.sync.enabled, config.sync.poll_interval) == (False, 120.0)
    assert config.sync.full_reconcile_interval == 1800.0
    assert config.sync.subscription is True
    assert config.sync.subscription_base_url == "https://matrix.example.org"
    assert config.sync.default_space_name == "Zorgteam"
    assert config.sync.power_levels == {"Practitioner": 50, "RelatedPerson": 10, "Patient": 0}
    assert config.sync.role_power_levels == {"http://snomed.info/sct|62247001": 75}
    assert config.account_validity.enabled is False
    assert config.account_validity.expire_unmapped is True
    assert config.registration.require_fhir_identity is True
    assert config.worker == "background_worker"
    assert config.audit.enabled is True
    assert (config.audit.batch_size, config.audit.poll_interval) == (20, 0.25)
    assert (config.audit.retention, config.audit.max_refusals_per_minute) == (7 * 86400.0, 5)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("enabled", "yes"),
        ("batch_size", 0),
        ("batch_size", 1001),
        ("batch_size", "10"),
        ("poll_interval", 5),
        ("poll_interval", "50ms"),
        ("poll_interval", "2h"),
        ("retention", "30m"),
        ("retention", "forever"),
        ("max_refusals_per_minute", 0),
        ("max_refusals_per_minute", True),
        ("batchsize", 10),
    ],
)
def test_bad_audit_values_name_their_key(key: str, value: Any) -> None:
    assert error_path(with_key("audit", key, value)) == ("audit", key)


def test_basic_auth() -> None:
    config = parse(with_key("fhir", "auth", {"username": "u", "password": "p"}))
    assert (config.fhir.auth.username, config.fhir.auth.password) == ("u", "p")


def test_credentials_never_appear_in_repr() -> None:
    config = parse(
        {
            "fhir": {**BASE["fhir"], "auth": {"username": "u", "password": "hunter2"}},
            "webhook": {"secret": "topsecret"},
        }
    )
    assert "hunter2" not in repr(config)
    assert "topsecret" not in repr(config)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("10s", 10.0), ("5m", 300.0), ("1.5h", 5400.0), ("1d", 86400.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({}, ("fhir",)),
        (None, ("fhir",)),
        ({"fhir": {}}, ("fhir", "base_url")),
        ({"fhir": {"base_url": "ftp://x/fhir"}}, ("fhir", "base_url")),
        ({"fhir": {"base_url": "not a url"}}, ("fhir", "base_url")),
        ({"fhir": {"base_url": 12}}, ("fhir", "base_url")),
        ({"fhir": {"base_url": "http://u:pw@127.0.0.1/fhir"}}, ("fhir", "base_url")),
        (with_key("fhir", "timeout", 10), ("fhir", "timeout")),
        (with_key("fhir", "timeout", "10 parsecs"), ("fhir", "timeout")),
        (with_key("fhir", "timeout", "0s"), ("fhir", "timeout")),
        (with_key("fhir", "auth", {"bearer_token": "t", "username": "u"}), ("fhir", "auth")),
        (with_key("fhir", "auth", {"username": "u"}), ("fhir", "auth", "password")),
        (with_key("fhir", "auth", {"token": "t"}), ("fhir", "auth", "token")),
        (with_key("fhir", "auth", "secret"), ("fhir", "auth")),
        (with_key("fhir", "base_ur1", "x"), ("fhir", "base_ur1")),
        (with_key("enforcement", "fail_close", True), ("enforcement", "fail_close")),
        (with_key("enforcement", "enabled", "yes"), ("enforcement", "enabled")),
        (with_key("enforcement", "cache_ttl", "soon"), ("enforcement", "cache_ttl")),
        (
            with_key("communication", "encrypted_rooms", "drop"),
            ("communication", "encrypted_rooms"),
        ),
        (with_key("communication", "batch_size", 0), ("communication", "batch_size")),
        (with_key("communication", "rooms", "some"), ("communication", "rooms")),
        (with_key("communication", "redactions", "admins"), ("communication", "redactions")),
        (with_key("communication", "redactions", True), ("communication", "redactions")),
        (with_key("sync", "power_levels", {"Nurse": 50}), ("sync", "power_levels")),
        (with_key("sync", "power_levels", {"Patient": 100}), ("sync", "power_levels")),
        (with_key("sync", "role_power_levels", {"62247001": 75}), ("sync", "role_power_levels")),
        (with_key("sync", "subscription", "yes"), ("sync", "subscription")),
        (with_key("communication", "batch_size", 5000), ("communication", "batch_size")),
        (with_key("communication", "batch_size", "50"), ("communication", "batch_size")),
        (with_key("sync", "poll_interval", "-1s"), ("sync", "poll_interval")),
        (
            with_key("sync", "full_reconcile_interval", 3600),
            ("sync", "full_reconcile_interval"),
        ),
        (with_key("enforcement", "exempt_users", "@a:b"), ("enforcement", "exempt_users")),
        (with_key("enforcement", "exempt_users", ["audit"]), ("enforcement", "exempt_users")),
        (
            with_key("account_validity", "expire_unmapped", "no"),
            ("account_validity", "expire_unmapped"),
        ),
        (with_key("webhook", "secret", ""), ("webhook", "secret")),
        (
            with_key("registration", "require_fhir_identity", 1),
            ("registration", "require_fhir_identity"),
        ),
        (
            with_key("account_validity", "enabled", None) | {"account_validity": []},
            ("account_validity",),
        ),
        ({**BASE, "service_user": "Not Valid"}, ("service_user",)),
        ({**BASE, "worker": ""}, ("worker",)),
        ({**BASE, "unexpected": 1}, ("unexpected",)),
        ([], ()),
    ],
)
def test_wrong_or_missing_key_names_its_path(raw: Any, path: tuple[str, ...]) -> None:
    assert error_path(raw) == path


def test_error_message_says_what_is_expected() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(with_key("fhir", "timeout", 10))
    assert "'10s'" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse(with_key("communication", "redactions", "admins"))
    assert "expected one of sender, moderators, got 'admins'" in str(caught.value)


def test_subscriptions_need_the_webhook_secret() -> None:
    """Registered Subscriptions send webhook.secret; without one /notify refuses them all."""
    raw = {**BASE, "sync": {"subscription": True}}
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    assert tuple(caught.value.path or ()) == ("webhook", "secret")
    assert "sync.subscription" in str(caught.value)
    config = parse({**raw, "webhook": {"secret": "s3cret"}})
    assert config.sync.subscription is True
    assert config.sync.subscription_base_url is None  # public_baseurl, then


def test_unread_tasks_need_the_messages_recorded() -> None:
    """The Tasks point at the Communications recording writes."""
    assert parse(with_key("communication", "unread_tasks", True)).communication.unread_tasks
    raw = {**BASE, "communication": {"enabled": False, "unread_tasks": True}}
    assert error_path(raw) == ("communication", "unread_tasks")
    assert error_path(with_key("communication", "unread_tasks", "yes")) == (
        "communication",
        "unread_tasks",
    )
