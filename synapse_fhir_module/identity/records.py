"""The identity service's durable state (``identity.store``), reached through ``ModuleApi``:
access tokens and the lookup pepper.

A token is an opaque random string handed to the client once; the table keeps only its
SHA-256, so a copy of the database lets nobody act as anyone. Tokens expire after
``identity.lookup_token_lifetime``; a client then registers again with a fresh OpenID
token (which needs the user's valid Matrix access token).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

from synapse.module_api import ModuleApi

from synapse_fhir_module.identity import store as identity_store
from synapse_fhir_module.identity.lookup import new_pepper

# Tokens kept per user (one per client that registered); the oldest go first.
TOKENS_PER_USER = 20
TOKEN_PREFIX = "sfm_is_"


def _now_ms() -> int:
    return int(time.time() * 1000)


def new_token() -> str:
    # 32 random bytes; the prefix tells a leaked token's origin at a glance.
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class IdentityRecords:
    def __init__(
        self,
        api: ModuleApi,
        *,
        token_lifetime: float,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self._api = api
        self._lifetime_ms = int(token_lifetime * 1000)
        self._clock_ms = clock_ms
        self._tables_exist = False
        self._pepper: str | None = None

    async def issue(self, user_id: str) -> str:
        """A new token for ``user_id``."""
        await self._create_tables()
        token = new_token()
        now = self._clock_ms()
        await self._api.run_db_interaction(
            "fhir_identity_store_token",
            identity_store.store_token,
            token_hash(token),
            user_id,
            now,
            now + self._lifetime_ms,
            keep_per_user=TOKENS_PER_USER,
        )
        return token

    async def user_of(self, token: str) -> str | None:
        """Whose unexpired token this is; None for an unknown or expired one."""
        await self._create_tables()
        return await self._api.run_db_interaction(
            "fhir_identity_token_user",
            identity_store.user_of_token,
            token_hash(token),
            self._clock_ms(),
        )

    async def revoke(self, token: str) -> bool:
        await self._create_tables()
        return await self._api.run_db_interaction(
            "fhir_identity_revoke_token", identity_store.delete_token, token_hash(token)
        )

    async def pepper(self) -> str:
        """The lookup pepper: made once for the server, then read (and remembered here)."""
        if self._pepper is None:
            await self._create_tables()
            self._pepper = await self._api.run_db_interaction(
                "fhir_identity_pepper", identity_store.pepper, new_pepper()
            )
        return self._pepper

    async def _create_tables(self) -> None:
        if self._tables_exist:
            return
        try:
            await self._api.run_db_interaction("fhir_identity_schema", identity_store.create_schema)
        except Exception:
            # On PostgreSQL a creation running at the same moment (another instance) can
            # fail this one; the second attempt finds the tables.
            await self._api.run_db_interaction("fhir_identity_schema", identity_store.create_schema)
        self._tables_exist = True
