"""The module's configuration (design.md: configuration): frozen attrs classes and their parser.

Every problem is reported as a ``ConfigError`` whose ``path`` names the offending
key (``fhir.base_url``); Synapse prefixes it with ``modules.<n>.config`` so the
operator sees exactly which line of ``homeserver.yaml`` to fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attr
from synapse.module_api.errors import ConfigError

Path = tuple[str, ...]
T = TypeVar("T")


class EncryptedRoomsPolicy(str, Enum):
    """What happens to messages the module cannot read (``m.room.encrypted``)."""

    METADATA_ONLY = "metadata_only"
    SKIP = "skip"
    FORBID = "forbid"


class RecordedRooms(str, Enum):
    """Whose messages become Communications."""

    CARE_TEAM = "care_team"  # rooms bound to a CareTeam (design.md: mapping)
    ALL = "all"  # every room on this server (senders still need a FHIR person)


class RedactionPolicy(str, Enum):
    """Whose redaction withdraws a recorded message (its Communication entered-in-error)."""

    SENDER = "sender"  # only its sender's (the same FHIR person)
    MODERATORS = "moderators"  # also this server's users Synapse let redact it, noted


class CommunicationProfile(str, Enum):
    """The form of what recording writes."""

    BASE = "base"  # R4 Communications as design.md: mapping describes them
    OZO = "ozo"  # also meets (and declares) the OZO guide's OZOCommunication(Request)


@attr.s(frozen=True, auto_attribs=True, kw_only=True, repr=False)
class FhirAuthConfig:
    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        # Never print credentials, not even in a debugger or a crash report.
        kind = "bearer" if self.bearer_token else "basic" if self.username else "none"
        return f"FhirAuthConfig(<{kind}>)"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class FhirConfig:
    base_url: str
    auth: FhirAuthConfig = FhirAuthConfig()
    timeout: float = 10.0  # seconds


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class WebhookConfig:
    # None: nobody may push to /notify (every call is refused with 401).
    secret: str | None = attr.ib(default=None, repr=False)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class EnforcementConfig:
    enabled: bool = True
    fail_closed: bool = True
    cache_ttl: float = 300.0  # seconds
    # Matrix users let into every care-team room besides the members (e.g. an audit bot).
    exempt_users: tuple[str, ...] = ()


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class CommunicationConfig:
    enabled: bool = True
    encrypted_rooms: EncryptedRoomsPolicy = EncryptedRoomsPolicy.METADATA_ONLY
    batch_size: int = 50
    rooms: RecordedRooms = RecordedRooms.CARE_TEAM
    redactions: RedactionPolicy = RedactionPolicy.SENDER
    profile: CommunicationProfile = CommunicationProfile.BASE
    # One FHIR Task per thread and member: requested while they have a message to read.
    unread_tasks: bool = False
    # Where the recorder reads Synapse's event stream as the service user (its /sync):
    # a client listener of the instance that runs background work (public_baseurl if None).
    client_url: str | None = None
    # How often the stream position FHIR has everything before is saved (seconds).
    checkpoint_interval: float = 1.0
    # Messages held in memory for FHIR at most; beyond, they are read again from Synapse.
    max_pending: int = 20_000
    # How long a message waits for others to share its FHIR transaction (seconds).
    batch_linger: float = 0.0


DEFAULT_POWER_LEVELS = {"Practitioner": 50, "RelatedPerson": 0, "Patient": 0}


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class SyncConfig:
    enabled: bool = True
    poll_interval: float = 60.0  # seconds
    # Every team synced again from FHIR this often (and at start-up): drift left by lost
    # notifications, expunged or deleted resources is repaired.
    full_reconcile_interval: float = 3600.0  # seconds
    # Register rest-hook Subscriptions on FHIR (for a FHIR server without the shim).
    subscription: bool = False
    # The URL FHIR reaches this Synapse at, for those Subscriptions (public_baseurl if None).
    subscription_base_url: str | None = None
    # Space name when the CareTeam has none (CareTeam.name is used when present).
    default_space_name: str = "Care team"
    # design.md: mapping defaults, by member type; role codes ("system|code") take precedence.
    power_levels: Mapping[str, int] = attr.Factory(lambda: dict(DEFAULT_POWER_LEVELS))
    role_power_levels: Mapping[str, int] = attr.Factory(dict)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AccountValidityConfig:
    enabled: bool = True
    # Whether an account that no FHIR person names counts as expired.
    expire_unmapped: bool = False


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class RegistrationConfig:
    require_fhir_identity: bool = False


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class IdentityConfig:
    # A local account is the FHIR person carrying one of its verified email addresses.
    email: bool = True
    # Identifier systems whose values are email addresses (OZO puts practitioners' there).
    email_identifier_systems: tuple[str, ...] = ()
    # Count the addresses of accounts made through single sign-on (the identity
    # provider's claims, which Synapse stores as verified without asking).
    trust_sso_emails: bool = False
    # Mail a team member who has no account (and exactly one address) how to join.
    invite_by_email: bool = False
    # Where the invitation sends them (e.g. the Element or registration page).
    join_url: str | None = None
    # At most one invitation per address this often.
    invite_interval: float = 7 * 24 * 3600.0  # seconds
    # Answer the Identity Service API v2 lookups on Synapse's own listener (README,
    # "Identity lookups"). Off by default: it tells local users which account an email
    # address belongs to.
    lookup: bool = False
    # How long an identity-service token (from /account/register) is valid.
    lookup_token_lifetime: float = 86400.0  # seconds
    # Where the module asks this homeserver about OpenID tokens
    # (<url>/_matrix/federation/v1/openid/userinfo); None = Synapse's public_baseurl.
    lookup_homeserver_url: str | None = None
    # Per user and instance: addresses one request may look up at most (the bucket's
    # size), and addresses the bucket regains per second.
    # Whose accounts lookups may reveal: practitioners by default (that a relative's or a
    # patient's address has an account here says someone is in care).
    lookup_person_types: tuple[str, ...] = ("Practitioner",)
    lookup_burst: int = 1000
    lookup_per_second: float = 1.0


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AuditConfig:
    # Write the audit journal to FHIR as AuditEvents (the journal itself is always kept).
    enabled: bool = False
    # AuditEvents in one FHIR transaction.
    batch_size: int = 100
    # How often the shipper looks for rows other instances journaled (seconds).
    poll_interval: float = 5.0
    # Journal rows older than this are deleted (with ``enabled``: once FHIR has them).
    retention: float = 30 * 86400.0  # seconds
    # Refusals of one user journaled one by one per minute at most (all remote users
    # together: ten times this); the rest go into one summary row per user and minute.
    max_refusals_per_minute: int = 30


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class ModuleConfig:
    fhir: FhirConfig
    service_user: str = "fhir"
    webhook: WebhookConfig = WebhookConfig()
    enforcement: EnforcementConfig = EnforcementConfig()
    communication: CommunicationConfig = CommunicationConfig()
    sync: SyncConfig = SyncConfig()
    account_validity: AccountValidityConfig = AccountValidityConfig()
    registration: RegistrationConfig = RegistrationConfig()
    identity: IdentityConfig = IdentityConfig()
    audit: AuditConfig = AuditConfig()
    # Name of the Synapse worker that runs background work; None = main process.
    worker: str | None = None


def parse_module_config(raw: Any) -> ModuleConfig:
    """Turn the ``config:`` mapping of the ``modules:`` entry into a ModuleConfig."""
    section = _Section(raw, ())
    config = ModuleConfig(
        fhir=_parse_fhir(section.required_section("fhir")),
        service_user=section.value("service_user", _localpart, "fhir"),
        webhook=_parse_webhook(section.section("webhook")),
        enforcement=_parse_enforcement(section.section("enforcement")),
        communication=_parse_communication(section.section("communication")),
        sync=_parse_sync(section.section("sync")),
        account_validity=_parse_account_validity(section.section("account_validity")),
        registration=RegistrationConfig(
            require_fhir_identity=section.section("registration").flag(
                "require_fhir_identity", False
            )
        ),
        identity=_parse_identity(section.section("identity")),
        audit=_parse_audit(section.section("audit")),
        worker=section.value("worker", _nonempty_string, None),
    )
    section.reject_unknown_keys()
    if config.identity.lookup and not config.identity.email:
        raise ConfigError(
            "identity.lookup answers from identity by email: with identity.email off it "
            "would find nobody",
            path=("identity", "lookup"),
        )
    if config.sync.subscription and config.webhook.secret is None:
        raise ConfigError(
            "sync.subscription is true: the Subscriptions send this secret, and without it "
            "the notify endpoint refuses every call",
            path=("webhook", "secret"),
        )
    return config


def _parse_fhir(section: _Section) -> FhirConfig:
    auth_section = section.section("auth")
    auth = FhirAuthConfig(
        bearer_token=auth_section.value("bearer_token", _nonempty_string, None),
        username=auth_section.value("username", _nonempty_string, None),
        password=auth_section.value("password", _string, None),
    )
    auth_section.reject_unknown_keys()
    if auth.bearer_token and (auth.username or auth.password):
        raise ConfigError(
            "give either bearer_token or username/password, not both",
            path=auth_section.path,
        )
    if (auth.username is None) != (auth.password is None):
        missing = "password" if auth.password is None else "username"
        raise ConfigError(
            "basic auth needs both username and password",
            path=auth_section.path + (missing,),
        )
    config = FhirConfig(
        base_url=section.required_value("base_url", _base_url),
        auth=auth,
        timeout=section.value("timeout", _positive_duration, 10.0),
    )
    section.reject_unknown_keys()
    return config


def _parse_webhook(section: _Section) -> WebhookConfig:
    config = WebhookConfig(secret=section.value("secret", _nonempty_string, None))
    section.reject_unknown_keys()
    return config


def _parse_enforcement(section: _Section) -> EnforcementConfig:
    config = EnforcementConfig(
        enabled=section.flag("enabled", True),
        fail_closed=section.flag("fail_closed", True),
        cache_ttl=section.value("cache_ttl", _positive_duration, 300.0),
        exempt_users=section.value("exempt_users", _user_ids, ()),
    )
    section.reject_unknown_keys()
    return config


def _parse_identity(section: _Section) -> IdentityConfig:
    config = IdentityConfig(
        email=section.flag("email", True),
        email_identifier_systems=section.value("email_identifier_systems", _identifier_systems, ()),
        trust_sso_emails=section.flag("trust_sso_emails", False),
        invite_by_email=section.flag("invite_by_email", False),
        join_url=section.value("join_url", _join_url, None),
        invite_interval=section.value("invite_interval", _positive_duration, 7 * 24 * 3600.0),
        lookup=section.flag("lookup", False),
        lookup_token_lifetime=section.value("lookup_token_lifetime", _positive_duration, 86400.0),
        lookup_homeserver_url=section.value("lookup_homeserver_url", _homeserver_url, None),
        lookup_person_types=section.value("lookup_person_types", _person_types, ("Practitioner",)),
        lookup_burst=section.value("lookup_burst", _int_between(1, 1_000_000), 1000),
        lookup_per_second=section.value("lookup_per_second", _positive_number, 1.0),
    )
    section.reject_unknown_keys()
    if config.invite_by_email and config.join_url is None:
        raise ConfigError(
            "invite_by_email is true: the invitation must say where to join "
            "(e.g. https://element.example.org/#/register)",
            path=section.path + ("join_url",),
        )
    if config.invite_by_email and not config.email:
        raise ConfigError(
            "invite_by_email needs identity.email: true (the address is how the new "
            "account is found to be the invited person)",
            path=section.path + ("invite_by_email",),
        )
    return config


def _parse_account_validity(section: _Section) -> AccountValidityConfig:
    config = AccountValidityConfig(
        enabled=section.flag("enabled", True),
        expire_unmapped=section.flag("expire_unmapped", False),
    )
    section.reject_unknown_keys()
    return config


def _parse_communication(section: _Section) -> CommunicationConfig:
    config = CommunicationConfig(
        enabled=section.flag("enabled", True),
        encrypted_rooms=section.value(
            "encrypted_rooms", _enum(EncryptedRoomsPolicy), EncryptedRoomsPolicy.METADATA_ONLY
        ),
        batch_size=section.value("batch_size", _int_between(1, 1000), 50),
        rooms=section.value("rooms", _enum(RecordedRooms), RecordedRooms.CARE_TEAM),
        redactions=section.value("redactions", _enum(RedactionPolicy), RedactionPolicy.SENDER),
        profile=section.value("profile", _enum(CommunicationProfile), CommunicationProfile.BASE),
        unread_tasks=section.flag("unread_tasks", False),
        client_url=section.value("client_url", _homeserver_url, None),
        checkpoint_interval=section.value("checkpoint_interval", _checkpoint_interval, 1.0),
        max_pending=section.value("max_pending", _int_between(100, 10_000_000), 20_000),
        batch_linger=section.value("batch_linger", _batch_linger, 0.0),
    )
    section.reject_unknown_keys()
    if config.unread_tasks and not config.enabled:
        # The Tasks point at the Communications recording writes.
        raise ConfigError(
            "unread_tasks needs the messages recorded: set communication.enabled: true",
            path=section.path + ("unread_tasks",),
        )
    if config.profile is CommunicationProfile.OZO and config.rooms is RecordedRooms.ALL:
        # An ordinary room has no care team, so no patient: its thread could never have
        # the subject OZOCommunicationRequest requires.
        raise ConfigError(
            "profile: ozo records care-team rooms only (an ordinary room's thread has no "
            "patient for OZOCommunicationRequest.subject); use rooms: care_team",
            path=section.path + ("rooms",),
        )
    return config


def _parse_sync(section: _Section) -> SyncConfig:
    config = SyncConfig(
        enabled=section.flag("enabled", True),
        poll_interval=section.value("poll_interval", _positive_duration, 60.0),
        full_reconcile_interval=section.value(
            "full_reconcile_interval", _positive_duration, 3600.0
        ),
        subscription=section.flag("subscription", False),
        subscription_base_url=section.value("subscription_base_url", _base_url, None),
        default_space_name=section.value("default_space_name", _nonempty_string, "Care team"),
        power_levels={
            **DEFAULT_POWER_LEVELS,
            **section.value("power_levels", _levels_by_type, {}),
        },
        role_power_levels=section.value("role_power_levels", _levels_by_role, {}),
    )
    section.reject_unknown_keys()
    return config


def _parse_audit(section: _Section) -> AuditConfig:
    config = AuditConfig(
        enabled=section.flag("enabled", False),
        batch_size=section.value("batch_size", _int_between(1, 1000), 100),
        poll_interval=section.value("poll_interval", _audit_poll_interval, 5.0),
        retention=section.value("retention", _audit_retention, 30 * 86400.0),
        max_refusals_per_minute=section.value(
            "max_refusals_per_minute", _int_between(1, 10_000), 30
        ),
    )
    section.reject_unknown_keys()
    return config


class _Section:
    """One mapping of the config, remembering its path and which keys were read."""

    def __init__(self, raw: Any, path: Path) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError("expected a mapping", path=path)
        self._raw: Mapping[str, Any] = raw
        self.path = path
        self._read: set[str] = set()

    def section(self, key: str) -> _Section:
        self._read.add(key)
        return _Section(self._raw.get(key), self.path + (key,))

    def required_section(self, key: str) -> _Section:
        if self._raw.get(key) is None:
            raise ConfigError("this section is required", path=self.path + (key,))
        return self.section(key)

    def value(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        self._read.add(key)
        if key not in self._raw or self._raw[key] is None:
            return default
        return self._convert(key, convert)

    def required_value(self, key: str, convert: Callable[[Any], T]) -> T:
        self._read.add(key)
        if self._raw.get(key) is None:
            raise ConfigError("this key is required", path=self.path + (key,))
        return self._convert(key, convert)

    def flag(self, key: str, default: bool) -> bool:
        return self.value(key, _boolean, default)

    def reject_unknown_keys(self) -> None:
        # A typo such as `fail_close` must not silently fall back to a default.
        for key in self._raw:
            if key not in self._read:
                raise ConfigError("unknown key", path=self.path + (str(key),))

    def _convert(self, key: str, convert: Callable[[Any], T]) -> T:
        try:
            return convert(self._raw[key])
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e), path=self.path + (key,)) from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LOCALPART = re.compile(r"^[a-z0-9._=/+-]+$")
_USER_ID = re.compile(r"^@[a-z0-9._=/+-]+:[A-Za-z0-9.:\[\]-]+$")


def parse_duration(value: Any) -> float:
    """``"10s"``, ``"5m"``, ``"250ms"`` → seconds.

    A bare number is refused: Synapse reads bare numbers as milliseconds while
    people often mean seconds, and a 10 ms FHIR timeout would fail every request.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(
            f"expected a duration with a unit such as '10s', '5m' or '250ms', got {value!r}"
        )
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"expected a duration such as '10s', '5m' or '250ms', got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("the duration must be more than zero")
    return seconds


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _nonempty_string(value: Any) -> str:
    text = _string(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _localpart(value: Any) -> str:
    text = _nonempty_string(value)
    if not _LOCALPART.match(text):
        raise ValueError(
            "expected a Matrix user localpart (lower-case letters, digits and ._=/+-), "
            f"got {text!r}"
        )
    return text


def _user_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of Matrix user ids such as '@audit:example.org'")
    for item in value:
        if not isinstance(item, str) or not _USER_ID.match(item):
            raise ValueError(
                f"expected a Matrix user id such as '@audit:example.org', got {item!r}"
            )
    return tuple(value)


def _identifier_systems(value: Any) -> tuple[str, ...]:
    example = "https://www.ozoverbindzorg.nl/namingsystem/email"
    if not isinstance(value, list):
        raise ValueError(f"expected a list of identifier systems such as {example!r}")
    for item in value:
        # (Searched as "system|value": a bar, a comma or a space would break the search.)
        if not isinstance(item, str) or not item or any(c in item for c in "|, \t\n"):
            raise ValueError(f"expected an identifier system such as {example!r}, got {item!r}")
    return tuple(dict.fromkeys(value))


def _person_types(value: Any) -> tuple[str, ...]:
    allowed = ("Practitioner", "RelatedPerson", "Patient")
    if not isinstance(value, list) or any(item not in allowed for item in value):
        raise ValueError(f"expected a list of {', '.join(allowed)}, got {value!r}")
    return tuple(dict.fromkeys(value))


def _join_url(value: Any) -> str:
    text = _nonempty_string(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"expected an http(s) URL such as https://element.example.org, got {text!r}"
        )
    return text


def _base_url(value: Any) -> str:
    text = _nonempty_string(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"expected an http(s) URL such as http://127.0.0.1:8080/fhir, got {text!r}"
        )
    if parts.query or parts.fragment:
        raise ValueError("the FHIR base URL must not have a query or fragment")
    if parts.username or parts.password:
        # It would end up in logs; credentials belong in fhir.auth.
        raise ValueError("put credentials in fhir.auth, not in the URL")
    return text.rstrip("/")


def _homeserver_url(value: Any) -> str:
    text = _nonempty_string(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"expected this homeserver's http(s) base URL such as http://127.0.0.1:8008, "
            f"got {text!r}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("expected a base URL without query, fragment or credentials")
    return text.rstrip("/")


def _batch_linger(value: Any) -> float:
    seconds = parse_duration(value)
    if not 0 <= seconds <= 1:
        # Longer would hold every message back for it (the latency target is 100 ms).
        raise ValueError(f"expected between 0 and 1s, got {value!r}")
    return seconds


def _checkpoint_interval(value: Any) -> float:
    seconds = _positive_duration(value)
    if not 0.1 <= seconds <= 60:
        # Shorter costs Synapse a stream read that often; longer replays more after a crash.
        raise ValueError(f"expected between 100ms and 60s, got {value!r}")
    return seconds


def _audit_poll_interval(value: Any) -> float:
    seconds = _positive_duration(value)
    if not 0.1 <= seconds <= 3600:
        raise ValueError(f"expected between 100ms and 1h, got {value!r}")
    return seconds


def _audit_retention(value: Any) -> float:
    seconds = _positive_duration(value)
    if seconds < 3600:
        # The console's recent refusals, and rows FHIR has yet to take, need some time.
        raise ValueError(f"expected at least 1h, got {value!r}")
    return seconds


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    if not 0 < value <= 1_000_000:
        raise ValueError(f"expected a number more than 0 (at most 1000000), got {value}")
    return float(value)


def _int_between(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}, got {value}")
        return value

    return convert


_level = _int_between(0, 99)  # below the service user's 100


def _levels_by_type(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of member type to power level")
    unknown = sorted(set(value) - set(DEFAULT_POWER_LEVELS))
    if unknown:
        raise ValueError(
            f"unknown member type {unknown[0]!r}; expected {', '.join(DEFAULT_POWER_LEVELS)}"
        )
    return {str(kind): _level(level) for kind, level in value.items()}


def _levels_by_role(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of role code ('system|code') to power level")
    for role in value:
        if not isinstance(role, str) or role.count("|") != 1 or role.startswith("|"):
            raise ValueError(f"expected role codes as 'system|code', got {role!r}")
    return {str(role): _level(level) for role, level in value.items()}


E = TypeVar("E", bound=Enum)


def _enum(kind: type[E]) -> Callable[[Any], E]:
    def convert(value: Any) -> E:
        choices = [member.value for member in kind]
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return kind(value)

    return convert
