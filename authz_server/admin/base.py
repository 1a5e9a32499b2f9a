"""What every admin use case shares: the store, keyring, hasher, clock and probe, and the lookups
that come before the role check.

`AdminService` (service.py) is this base plus one mixin per resource. The
lookups follow one order, so that a refused caller cannot probe which names
exist: look the target up, authorize on it (`policy.authorize`), and only then
report its absence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TypeVar

from authz_server.admin import policy, validate
from authz_server.admin.audit import Audit
from authz_server.admin.policy import Actor
from authz_server.admin.probe import CredentialProbe, HttpProbe
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.errors import InvalidInput, NotFound
from authz_server.models import GatewayKey, McpServer, Principal
from authz_server.rules import SIGNATURE_HEADER, TIMESTAMP_HEADER, template_reserved
from authz_server.store.base import Store


_T = TypeVar("_T")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AdminBase:
    """The state and lookups the resource mixins share; `AdminService` composes them.

    `signature_header` and `timestamp_header` are the sidecar's settings of the same
    names: no credential template may set them, and `overrides test` signs with them.
    """

    # The one role check (the mixins call it as a method; tests call it on the class).
    _authorize = staticmethod(policy.authorize)

    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        hasher: KeyHasher,
        clock: Callable[[], datetime] = utcnow,
        probe: CredentialProbe | None = None,
        *,
        signature_header: str = SIGNATURE_HEADER,
        timestamp_header: str = TIMESTAMP_HEADER,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._hasher = hasher
        self._clock = clock
        self._probe = probe or HttpProbe()
        self._signature_header = signature_header.lower()
        self._timestamp_header = timestamp_header.lower()
        self._reserved_headers = template_reserved(signature_header, timestamp_header)

    # --- the role check, for listings ---------------------------------------------------------

    @staticmethod
    def _sees_everyone(actor: Actor, action: str) -> bool:
        return policy.may(actor, action, everyone=True)

    @staticmethod
    def _visible(actor: Actor, action: str, people: Iterable[Principal]) -> frozenset[str] | None:
        return policy.visible(actor, action, people)

    def _audit(self, actor: Actor, action: str, target: str) -> Audit:
        return Audit(self._store, self._clock, actor, action, target)

    def _now(self) -> datetime:
        return validate.as_utc(self._clock())

    # --- lookups ----------------------------------------------------------------------------------

    async def _server(self, name: str) -> McpServer:
        validate.check_name(name, "server")
        return _found(await self._store.get_server(name), f"No server named {name}.")

    async def _principal(self, name: str) -> Principal:
        validate.check_name(name, "principal")
        return _found(await self._store.get_principal_by_name(name), f"No principal named {name}.")

    async def _principal_name(self, principal_id: str) -> str:
        """The principal's name, or its bare id when it no longer exists."""
        p = await self._store.get_principal(principal_id)
        return p.name if p else principal_id

    async def _owned_principal(self, actor: Actor, action: str, name: str | None) -> Principal:
        """Look the principal up (None: the caller), authorize on it, then report absence: in that
        order, so a refused caller cannot probe which names exist (nor which belong to a principal
        who outranks them: both are the same refusal)."""
        if name is None:
            if actor.is_operator:
                raise InvalidInput("Name the principal (--principal NAME): the local operator has no keys or overrides.")
            me = await self._store.get_principal(actor.principal_id)
            self._authorize(actor, action, me)
            return _found(me, "Your principal no longer exists.")
        validate.check_name(name, "principal")
        principal = await self._store.get_principal_by_name(name)
        self._authorize(actor, action, principal)
        return _found(principal, f"No principal named {name}.")

    async def _owned_key(self, actor: Actor, action: str, key_id: str) -> GatewayKey:
        """Look the key and its principal up, authorize on that principal, then report absence."""
        validate.check_key_id(key_id)
        key = await self._store.get_key(key_id)
        owner = await self._store.get_principal(key.principal_id) if key else None
        self._authorize(actor, action, owner)
        return _found(key, f"No key with id {key_id}.")


def _found(thing: _T | None, missing: str) -> _T:
    """`thing`, or NotFound with the `missing` message."""
    if thing is None:
        raise NotFound(missing)
    return thing
