"""The console's addresses, registered on Synapse's listener (every instance: each reads
the same tables; the lags are the answering instance's, as ``/health``'s are).

- ``/_synapse/client/fhir/admin/`` (with its slash): the page, ``console.js``,
  ``console.css`` (anyone);
- ``/_synapse/client/fhir/admin/api/…``: ``health``, ``networks``, ``denials``,
  ``dead-letters``, ``dead-letters/retry`` and ``audit/retry-refused`` (server admins:
  ``access.require_admin``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

from synapse.module_api import ModuleApi

from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.web.admin.audit import RetryRefusedAuditResource
from synapse_fhir_module.web.admin.denials import DenialsResource, RecentRefusals
from synapse_fhir_module.web.admin.health import AdminHealthResource
from synapse_fhir_module.web.admin.networks import NetworksResource
from synapse_fhir_module.web.admin.page import FILES, StaticFile
from synapse_fhir_module.web.dead_letters import DeadLettersResource, RetryDeadLettersResource
from synapse_fhir_module.web.health import HealthReport

CONSOLE_PATH = "/_synapse/client/fhir/admin"
API_PATH = f"{CONSOLE_PATH}/api"


def register_console(
    api: ModuleApi,
    *,
    report: HealthReport,
    teams: CareTeamDirectory,
    keep: Collection[str],
    recent_refusals: RecentRefusals,
    now_ms: Callable[[], int],
    outbox_changed: Callable[[], None] | None,
    retry_refused_audit: Callable[[], Awaitable[int]] | None = None,
) -> None:
    """``outbox_changed`` None: recording is off, there are no dead letters to show."""
    # (Nothing at CONSOLE_PATH itself: a resource there would have children, which Synapse
    # cannot attach twice when it builds the tree for each of several listeners.)
    api.register_web_resource(f"{CONSOLE_PATH}/", StaticFile("index.html"))
    for name in FILES:
        if name != "index.html":
            api.register_web_resource(f"{CONSOLE_PATH}/{name}", StaticFile(name))
    api.register_web_resource(f"{API_PATH}/health", AdminHealthResource(api, report))
    api.register_web_resource(f"{API_PATH}/networks", NetworksResource(api, teams, keep))
    api.register_web_resource(f"{API_PATH}/denials", DenialsResource(api, recent_refusals))
    if retry_refused_audit is not None:
        api.register_web_resource(
            f"{API_PATH}/audit/retry-refused", RetryRefusedAuditResource(api, retry_refused_audit)
        )
    if outbox_changed is not None:
        api.register_web_resource(f"{API_PATH}/dead-letters", DeadLettersResource(api))
        api.register_web_resource(
            f"{API_PATH}/dead-letters/retry", RetryDeadLettersResource(api, now_ms, outbox_changed)
        )
