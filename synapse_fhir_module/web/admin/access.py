"""Who may use the module's admin endpoints: a server admin, named by the access token of
the request (``Authorization: Bearer``; Synapse's own check). No token: 401
``M_MISSING_TOKEN``; an unknown or expired one: 401 ``M_UNKNOWN_TOKEN``; anyone else: 403
``M_FORBIDDEN``, with nothing of what the endpoint holds."""

from __future__ import annotations

from synapse.module_api import ModuleApi, SynapseRequest
from synapse.module_api.errors import Codes, SynapseError

NOT_ADMIN = "Server admins only"


async def require_admin(api: ModuleApi, request: SynapseRequest) -> str:
    """The admin's user id; raises (401/403) for anyone else."""
    requester = await api.get_user_by_req(request)
    user_id = requester.user.to_string()
    if not await api.is_user_admin(user_id):
        raise SynapseError(403, NOT_ADMIN, Codes.FORBIDDEN)
    return user_id
