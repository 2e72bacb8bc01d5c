"""``sync.subscription: true``: FHIR notifies the module through rest-hook Subscriptions, for a
FHIR server without the HAPI shim (design.md: endpoints, the
``PUT|DELETE /notify/<type>/<id>`` form).

Once the sync has started, the background instance makes sure FHIR holds exactly one
Subscription of this homeserver per synced type: criteria ``<Type>?``, a rest-hook to
``<sync.subscription_base_url or public_baseurl>/_synapse/client/fhir/notify`` that sends
``Authorization: Bearer <webhook.secret>``, with ``payload: application/fhir+json`` (without
one HAPI POSTs an empty body that names no resource) and HAPI's send-delete-messages channel
extension (without it a delete notifies nobody).

They carry the module's origin tag and a tag naming this homeserver, so a restart finds them
again and changes them in place (a new secret or endpoint, turned off, a type no longer
synced) instead of adding more, and two homeservers on one FHIR server leave each other's
alone. The check runs again every ``sync.poll_interval`` (someone deleted one, FHIR lost
them); an attempt that fails is retried sooner, backing off up to 5 minutes. Nothing here
holds up the sync: while the Subscriptions are missing, the reconcile sweep still finds
every change, only later.

The secret is never logged (FHIR's error texts are scrubbed of it too).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import attr
from synapse.module_api import ModuleApi

from synapse_fhir_module.config import ModuleConfig
from synapse_fhir_module.fhir.client import FHIR_JSON, FhirClient, parse_resource
from synapse_fhir_module.fhir.conventions import ORIGIN_TAG
from synapse_fhir_module.fhir.errors import FhirTransientError
from synapse_fhir_module.sync.fhir_to_matrix import SYNCED_TYPES

# Where FHIR Subscriptions post their notifications (the webhook resource, web/).
NOTIFY_PATH = "/_synapse/client/fhir/notify"

logger = logging.getLogger(__name__)

SEND_DELETE_MESSAGES = (
    "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages"
)
# Which homeserver a Subscription notifies (several may share one FHIR server).
SERVER_TAG_SYSTEM = "urn:synapse-fhir-module:server"
# Statuses under which a Subscription is (or is about to be) delivering.
LIVE_STATUSES = frozenset({"requested", "active"})
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0


def notify_endpoint(api: ModuleApi, config: ModuleConfig) -> str:
    """Where FHIR reaches this homeserver's notify resource."""
    base = config.sync.subscription_base_url or api.public_baseurl
    return base.rstrip("/") + NOTIFY_PATH


def server_tag(server_name: str) -> dict[str, str]:
    return {"system": SERVER_TAG_SYSTEM, "code": server_name}


def wanted_subscription(
    resource_type: str, *, endpoint: str, secret: str, server_name: str
) -> dict[str, Any]:
    """The Subscription that notifies this homeserver of changes to ``resource_type``."""
    return {
        "resourceType": "Subscription",
        "meta": {"tag": [dict(ORIGIN_TAG), server_tag(server_name)]},
        # FHIR (HAPI: within a moment) turns a requested Subscription active.
        "status": "requested",
        "reason": f"Matrix care-team rooms on {server_name} follow {resource_type} changes",
        "criteria": f"{resource_type}?",
        "channel": {
            "extension": [{"url": SEND_DELETE_MESSAGES, "valueBoolean": True}],
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": FHIR_JSON,
            "header": [f"Authorization: Bearer {secret}"],
        },
    }


@attr.s(frozen=True, auto_attribs=True)
class SubscriptionPlan:
    """What to write so that FHIR holds exactly the wanted Subscriptions."""

    create: list[dict[str, Any]]
    update: list[dict[str, Any]]  # the wanted resource, with the id of the one it replaces
    delete: list[str]  # ids

    @property
    def empty(self) -> bool:
        return not (self.create or self.update or self.delete)


def plan_subscriptions(
    existing: Iterable[Mapping[str, Any]], wanted: Iterable[Mapping[str, Any]]
) -> SubscriptionPlan:
    """Keep one of ours per criteria (one that is already right, if any), change it where it
    differs, create what is missing, delete the rest (duplicates, types no longer synced)."""
    by_criteria: dict[str, list[Mapping[str, Any]]] = {}
    for subscription in existing:
        by_criteria.setdefault(str(subscription.get("criteria")), []).append(subscription)
    create: list[dict[str, Any]] = []
    update: list[dict[str, Any]] = []
    delete: list[str] = []
    for want in wanted:
        found = by_criteria.pop(str(want["criteria"]), [])
        if not found:
            create.append(dict(want))
            continue
        found.sort(key=lambda s: not is_up_to_date(s, want))  # a right one first
        keep, *extra = found
        if not is_up_to_date(keep, want):
            update.append({**want, "id": keep["id"]})
        delete.extend(str(s["id"]) for s in extra)
    for leftovers in by_criteria.values():
        delete.extend(str(s["id"]) for s in leftovers)
    return SubscriptionPlan(create=create, update=update, delete=delete)


def is_up_to_date(existing: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Whether ``existing`` delivers what ``want`` asks for (FHIR adds tags and the like)."""
    channel = existing.get("channel") or {}
    want_channel = want["channel"]
    return (
        existing.get("status") in LIVE_STATUSES
        and existing.get("criteria") == want["criteria"]
        and all(
            channel.get(key) == want_channel[key]
            for key in ("type", "endpoint", "payload", "header")
        )
        and any(
            isinstance(extension, Mapping)
            and extension.get("url") == SEND_DELETE_MESSAGES
            and extension.get("valueBoolean") is True
            for extension in channel.get("extension") or []
        )
    )


class SubscriptionRegistrar:
    """Keeps this homeserver's Subscriptions on FHIR as wanted (see the module docstring)."""

    def __init__(self, api: ModuleApi, fhir: FhirClient, config: ModuleConfig) -> None:
        if not config.webhook.secret:  # config.py refuses this combination
            raise ValueError("sync.subscription needs webhook.secret")
        self._api = api
        self._fhir = fhir
        self._secret = config.webhook.secret
        self._server_name = api.server_name
        self._endpoint = notify_endpoint(api, config)
        self._recheck_s = config.sync.poll_interval
        self._failures = 0

    def start(self) -> None:
        """Check now, then every ``sync.poll_interval``; never raises, never blocks."""
        self._schedule(0)

    async def ensure(self) -> SubscriptionPlan:
        """Make FHIR hold exactly the wanted Subscriptions; what it had to change."""
        ours = await self._fhir.search_json(
            "Subscription",
            [
                ("_tag", f"{ORIGIN_TAG['system']}|{ORIGIN_TAG['code']}"),
                ("_tag", f"{SERVER_TAG_SYSTEM}|{self._server_name}"),
                ("_count", "100"),
            ],
        )
        plan = plan_subscriptions(
            [s for s in ours if s.get("resourceType") == "Subscription"],
            [
                wanted_subscription(
                    resource_type,
                    endpoint=self._endpoint,
                    secret=self._secret,
                    server_name=self._server_name,
                )
                for resource_type in SYNCED_TYPES
            ],
        )
        for subscription in plan.update:
            await self._fhir.update(parse_resource(subscription))
            logger.info(
                "Updated Subscription/%s (%s) to notify %s",
                subscription["id"],
                subscription["criteria"],
                self._endpoint,
            )
        for subscription in plan.create:
            created = await self._fhir.create(parse_resource(subscription))
            logger.info(
                "Created Subscription/%s (%s) to notify %s",
                created.id,
                subscription["criteria"],
                self._endpoint,
            )
        for subscription_id in plan.delete:
            await self._fhir.delete("Subscription", subscription_id)
            logger.info(
                "Deleted Subscription/%s (a duplicate or no longer needed)", subscription_id
            )
        return plan

    def _schedule(self, seconds: float) -> None:
        self._api.delayed_background_call(seconds * 1000, self._run, desc="fhir_subscriptions")

    async def _run(self) -> None:
        try:
            await self.ensure()
        except Exception as e:  # FHIR away, or refusing: try again later, whatever it was
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2**self._failures)
            self._failures += 1
            log = logger.warning if isinstance(e, FhirTransientError) else logger.error
            log(
                "Could not register the FHIR Subscriptions (%s); trying again in %.0f s",
                self._scrub(f"{type(e).__name__}: {e}"),
                delay,
            )
            self._schedule(delay)
            return
        self._failures = 0
        self._schedule(self._recheck_s)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "<webhook.secret>")
