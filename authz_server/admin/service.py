"""The management use cases: one layer behind the local CLI and the admin gRPC API.

`AdminService` owns every rule about *what* may be changed and *how* input is
validated; the CLI and the API only translate arguments and render results.

Contract of every public coroutine:
- the first argument is the `Actor` doing it; `_authorize` is the one place
  that decides whether the actor may, and a refusal raises `PermissionDenied`
  with the same message whether or not the target exists;
- exactly one `AuditEvent` is appended per call, with outcome `ok`, `denied`
  or `error`, the actor's request id, and details that never contain a secret;
- bad input raises `InvalidInput`, a missing target `NotFound`, a duplicate
  `Conflict`; messages name fields and placeholders, never values;
- results are small frozen views (`to_json()` gives plain JSON types). A view
  never carries a hash, a ciphertext or a plaintext secret: one-time secrets
  (gateway keys, signing secrets) are returned separately as `Secret`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from authz_server.admin.probe import CredentialProbe, HttpProbe, ProbeFailed
from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.cipher import Keyring, aad_override, aad_shared, aad_signing
from authz_server.crypto.keys import KeyHasher
from authz_server.errors import (
    AuthzError,
    ConfigError,
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    StoreError,
)
from authz_server.models import (
    NAME_RE,
    PLACEHOLDER_RE,
    AuditEvent,
    AuthMode,
    GatewayKey,
    HeaderTemplate,
    McpServer,
    Override,
    OverrideStatus,
    Placeholder,
    Principal,
    PrincipalKind,
    Role,
    Secret,
    Team,
    UsageRecord,
    mask,
)
from authz_server.pipeline.mutate import IDENTITY_HEADERS, REQUEST_ID_HEADER, sign
from authz_server.store.base import Store

CLI_ACTOR_ID = "cli"
MAX_VALUE_BYTES = 8 * 1024
MAX_GRACE_SECONDS = 30 * 24 * 3600
MAX_LABEL_LEN = 100
MAX_DESCRIPTION_LEN = 500
MAX_HEADERS = 16
MAX_USAGE_LIMIT = 100_000  # records in one answer; an export streams any number
USAGE_PAGE_SIZE = 1000  # records per store query when exporting
MAX_AUDIT_LIMIT = 100_000
AUDIT_PAGE_SIZE = 1000
MAX_URL_LEN = 2048
MAX_TARGET_LEN = 300
# The seed's indicators for each credential status (shown by `overrides status`).
STATUS_INDICATORS = {"configured": "🟢", "missing": "🟡", "invalid": "🔴", "expired": "⏰"}

# Headers the gateway itself owns, or that would corrupt HTTP framing if a
# template could set them: identity and signature headers must only ever
# carry values the sidecar computed.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "x-user-id",
        "x-user-type",
        "x-user-team",
        "x-user-roles",
        "x-request-id",
        "x-mcp-authz-signature",
        "x-mcp-authz-timestamp",
        "content-length",
        "transfer-encoding",
        # hop-by-hop headers: meaningless (or harmful) to inject upstream
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)
_HTTP_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}$")
_PLACEHOLDER_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_KEY_ID_RE = re.compile(rf"^[0-9A-Za-z]{{{gateway_keys.KEY_ID_LEN}}}$")
# MCP tool names: 1-128 of letters, digits, '_', '-', '.', and '/' for namespaced tools.
_TOOL_RE = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")
_PRINCIPAL_ID_LEN = 12

# --- actions -------------------------------------------------------------------
# Keys and overrides belong to a principal: a user may act on their own.
_OWNED_ACTIONS = frozenset(
    {
        "keys.create",
        "keys.list",
        "keys.revoke",
        "keys.regenerate",
        "overrides.set",
        "overrides.list",
        "overrides.delete",
        # The status of a principal's credentials, and testing one against the upstream.
        "overrides.status",
        "overrides.test",
        # Usage records belong to the principal whose request they record.
        "usage.query",
        "usage.export",
    }
)
# Of those, what a manager may also do on another principal (one who does not outrank them):
# overrides, with their status and tests, and usage records. Never keys: a key for someone is
# the power to act as them, and so to use their personal credentials.
_MANAGED_ACTIONS = _OWNED_ACTIONS - {"keys.create", "keys.list", "keys.revoke", "keys.regenerate"}
# The hierarchy: admin > manager > user. A principal ranks as its highest role.
_RANK = {Role.ADMIN: 3, Role.MANAGER: 2, Role.USER: 1}
_SERVER_READ_ACTIONS = frozenset({"servers.list", "servers.show"})
# Any authenticated principal: who am I, and which placeholders a server asks for (no values).
_ANY_ROLE_ACTIONS = frozenset({"whoami", "servers.form"})
_ACTION_FILTER_RE = re.compile(r"^(\*|[a-z_]+(\.[a-z_]+)?\.?\*?)$")
_PRINCIPAL_ID_RE = re.compile(r"^p_[0-9A-Za-z]{12}$")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC with a 'Z', or None."""
    if dt is None:
        return None
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _as_utc(dt: datetime) -> datetime:
    # A naive datetime is taken to be UTC: the store only holds aware UTC times.
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _rank(roles: Iterable[Role]) -> int:
    """A principal's place in the hierarchy admin > manager > user: its highest role (0: none)."""
    return max((_RANK.get(Role(r), 0) for r in roles), default=0)


# --- the actor -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling: a principal (remote, authenticated by gateway key) or the local operator."""

    principal_id: str
    roles: frozenset[Role]
    # Per call, for the audit trail: the admin API's request id and the caller's address.
    request_id: str = field(default="", compare=False)
    source: str = field(default="", compare=False)

    @classmethod
    def operator(cls) -> Actor:
        """The local CLI operator: it holds the master key and the store, so it is an admin."""
        return cls(CLI_ACTOR_ID, frozenset({Role.ADMIN}))

    @classmethod
    def of(cls, principal: Principal, request_id: str = "", source: str = "") -> Actor:
        return cls(principal.id, frozenset(principal.roles), request_id, source)

    @property
    def is_operator(self) -> bool:
        return self.principal_id == CLI_ACTOR_ID


# --- views -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TeamView:
    name: str
    disabled: bool
    created_at: datetime | None

    @classmethod
    def of(cls, team: Team) -> TeamView:
        return cls(team.name, team.disabled, team.created_at)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "disabled": self.disabled, "created_at": iso(self.created_at)}


@dataclass(frozen=True, slots=True)
class PrincipalView:
    id: str
    name: str
    kind: str
    team: str
    roles: tuple[str, ...]
    disabled: bool
    rate_limit_per_minute: int | None
    created_at: datetime | None

    @classmethod
    def of(cls, p: Principal) -> PrincipalView:
        return cls(
            p.id,
            p.name,
            p.kind.value,
            p.team,
            tuple(r.value for r in p.roles),
            p.disabled,
            p.rate_limit_per_minute,
            p.created_at,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "team": self.team,
            "roles": list(self.roles),
            "disabled": self.disabled,
            "rate_limit_per_minute": self.rate_limit_per_minute,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class ServerView:
    name: str
    mode: str
    headers: tuple[str, ...]  # "Name: template"
    placeholders: tuple[tuple[str, bool], ...]  # (name, required)
    shared_masks: tuple[tuple[str, str], ...]  # (placeholder, mask) for shared mode
    shared_status: str | None  # "configured" / "missing" in shared mode, else None
    has_signing_secret: bool
    description: str
    created_at: datetime | None
    updated_at: datetime | None
    upstream_url: str = ""

    @classmethod
    def of(cls, s: McpServer) -> ServerView:
        shared_status = None
        if s.mode is AuthMode.SHARED:
            required = {p.name for p in s.placeholders if p.required}
            shared_status = "configured" if required <= set(s.shared_values) and s.shared_values else "missing"
        return cls(
            s.name,
            s.mode.value,
            tuple(f"{h.name}: {h.template}" for h in s.headers),
            tuple((p.name, p.required) for p in s.placeholders),
            tuple(sorted(s.shared_masks.items())),
            shared_status,
            s.signing_secret is not None,
            s.description,
            s.created_at,
            s.updated_at,
            s.upstream_url,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "headers": list(self.headers),
            "placeholders": [{"name": n, "required": r} for n, r in self.placeholders],
            "shared_values": dict(self.shared_masks),
            "shared_status": self.shared_status,
            "has_signing_secret": self.has_signing_secret,
            "description": self.description,
            "upstream_url": self.upstream_url,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class ServerFormView:
    """What a server asks a principal for: its mode and placeholders, never a value."""

    name: str
    mode: str
    placeholders: tuple[Placeholder, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "placeholders": [{"name": p.name, "required": p.required} for p in self.placeholders],
        }


@dataclass(frozen=True, slots=True)
class WhoAmIView:
    """The caller: a principal, or the local operator (`id` "cli")."""

    id: str
    name: str
    kind: str
    team: str
    roles: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind, "team": self.team, "roles": list(self.roles)}


def key_status(key: GatewayKey, now: datetime) -> str:
    """active, revoked or expired. A revocation in the future (a grace period) is still active."""
    if key.revoked_at is not None and key.revoked_at <= now:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


@dataclass(frozen=True, slots=True)
class GatewayKeyView:
    key_id: str
    principal: str  # the principal's name
    label: str
    created_at: datetime | None
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    scope: tuple[str, ...]
    status: str

    @classmethod
    def of(cls, key: GatewayKey, principal_name: str, now: datetime) -> GatewayKeyView:
        return cls(
            key.key_id,
            principal_name,
            key.label,
            key.created_at,
            key.last_used_at,
            key.expires_at,
            key.revoked_at,
            key.scope,
            key_status(key, now),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "principal": self.principal,
            "label": self.label,
            "created_at": iso(self.created_at),
            "last_used_at": iso(self.last_used_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "scope": list(self.scope),
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class OverrideView:
    principal: str  # name
    kind: str  # user / service
    server: str
    masks: tuple[tuple[str, str], ...]  # (placeholder, mask)
    updated_by: str  # a principal's name, or "cli"
    updated_at: datetime
    status: str  # "expired" once expires_at has passed, whatever was stored
    status_reason: str
    expires_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "kind": self.kind,
            "server": self.server,
            "values": dict(self.masks),
            "updated_by": self.updated_by,
            "updated_at": iso(self.updated_at),
            "expires_at": iso(self.expires_at),
            "status": self.status,
            "status_reason": self.status_reason,
        }


@dataclass(frozen=True, slots=True)
class CredentialStatusView:
    """One (principal, server) pair: is a credential there for Check to inject, and is it good?

    `status` is configured, missing (required but not provided), invalid (the
    upstream rejected it, or `overrides test` failed) or expired. `source` says
    which credential Check would use: "override", "shared" (the server's
    default), or "" when there is none.
    """

    server: str
    mode: str
    principal: str
    kind: str
    team: str
    status: str
    source: str
    masks: tuple[tuple[str, str], ...]
    updated_by: str
    updated_at: datetime | None
    reason: str

    @property
    def indicator(self) -> str:
        return STATUS_INDICATORS.get(self.status, "?")

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "mode": self.mode,
            "principal": self.principal,
            "kind": self.kind,
            "team": self.team,
            "status": self.status,
            "source": self.source,
            "values": dict(self.masks),
            "updated_by": self.updated_by,
            "updated_at": iso(self.updated_at),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class OverrideTestView:
    """The outcome of `overrides test`: the upstream's answer to an MCP initialize
    sent with the principal's credential.

    `result` is "ok" (2xx: status set to configured), "rejected" (401/403: set to
    invalid) or "inconclusive" (anything else: the status is left as it was).
    """

    principal: str
    server: str
    result: str
    http_status: int  # 0 when no HTTP answer came
    detail: str
    status: str  # the override's status afterwards

    def to_json(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "server": self.server,
            "result": self.result,
            "http_status": self.http_status,
            "detail": self.detail,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class AuditView:
    """One audit event; `actor` is the principal's name (its id when gone, "cli", or "-")."""

    id: int | None
    at: datetime
    actor: str
    actor_id: str
    action: str
    target: str
    outcome: str
    request_id: str
    details: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, e: AuditEvent, actor: str) -> AuditView:
        return cls(e.id, e.at, actor, e.actor, e.action, e.target, e.outcome, e.request_id,
                   tuple(sorted(e.details.items())))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": iso(self.at),
            "actor": self.actor,
            "actor_id": self.actor_id,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "request_id": self.request_id,
            "details": dict(self.details),
        }


@dataclass(frozen=True, slots=True)
class _AuditFilter:
    actor: str | None
    action: str | None
    target: str | None
    since: datetime | None
    until: datetime | None


@dataclass(frozen=True, slots=True)
class UsageView:
    """One attributed request through Envoy.

    `principal` is the principal's name; its id when the principal no longer
    exists; "-" when the caller was never authenticated.
    """

    id: int | None
    at: datetime
    request_id: str
    principal: str
    principal_id: str
    key_id: str
    server: str
    tool: str
    mcp_method: str
    decision: str
    reason: str
    upstream_status: int
    request_bytes: int
    response_bytes: int
    duration_ms: float

    @classmethod
    def of(cls, r: UsageRecord, principal: str) -> UsageView:
        return cls(
            r.id,
            r.at,
            r.request_id,
            principal,
            r.principal_id,
            r.key_id,
            r.server,
            r.tool,
            r.mcp_method,
            r.decision,
            r.reason,
            r.upstream_status,
            r.request_bytes,
            r.response_bytes,
            r.duration_ms,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": iso(self.at),
            "request_id": self.request_id,
            "principal": self.principal,
            "principal_id": self.principal_id,
            "key_id": self.key_id,
            "server": self.server,
            "tool": self.tool,
            "mcp_method": self.mcp_method,
            "decision": self.decision,
            "reason": self.reason,
            "upstream_status": self.upstream_status,
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "duration_ms": self.duration_ms,
        }


@dataclass(frozen=True, slots=True)
class _UsageFilter:
    """Validated, authorized filters, in store terms (`principal_id` None: everyone).

    `visible` (None: no such filter) is the principal ids whose records the actor may see
    when listing everyone; "" is in it for records of unauthenticated requests."""

    principal_id: str | None
    server: str | None
    tool: str | None
    since: datetime | None
    until: datetime | None
    visible: frozenset[str] | None = None

    def shows(self, record: UsageRecord) -> bool:
        return self.visible is None or record.principal_id in self.visible


# --- audit ---------------------------------------------------------------------


@dataclass
class _Audit:
    """Appends exactly one audit event when the operation ends, whatever its outcome.

    The operation fills in `target` and `details` as it learns them. An
    error while writing the audit row of a *failed* operation is dropped so
    the caller sees the original error; for a successful one it propagates.
    """

    store: Store
    clock: Callable[[], datetime]
    actor: Actor
    action: str
    target: str
    details: dict[str, str] = field(default_factory=dict)

    async def __aenter__(self) -> _Audit:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, PermissionDenied):
            outcome = "denied"
        else:
            outcome = "error"
        details = dict(self.details)
        if isinstance(exc, AuthzError):
            details["reason"] = exc.reason
            details["message"] = exc.message  # safe by the error tree's contract
        elif exc is not None:
            details["reason"] = "internal"
        if self.actor.source:
            details["source"] = self.actor.source
        event = AuditEvent(
            at=self.clock(),
            actor=self.actor.principal_id,
            action=self.action,
            target=self.target,
            outcome=outcome,
            request_id=self.actor.request_id,
            details=details,
        )
        try:
            await self.store.append_audit([event])
        except StoreError:
            if exc is None:
                raise
        return False


# --- the service ---------------------------------------------------------------------


class AdminService:
    """Every management use case, against a `Store`, with one role check and one audit trail."""

    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        hasher: KeyHasher,
        clock: Callable[[], datetime] = utcnow,
        probe: CredentialProbe | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._hasher = hasher
        self._clock = clock
        self._probe = probe or HttpProbe()

    # --- authorization --------------------------------------------------------------

    @staticmethod
    def _authorize(actor: Actor, action: str, target: Principal | None = None, *, everyone: bool = False) -> None:
        """The one role check: return, or raise PermissionDenied.

        `target` is the principal the action is on: the one named, or the owner
        of the key or override acted on. It is None when the action is on no
        principal's thing (a server, a team, the audit trail) or when the
        principal or key named does not exist. Callers look the target up, call
        this, and only then raise NotFound, so a refusal never tells whether
        the target exists. `everyone` asks to list across principals; the
        caller then keeps only the rows of principals this check lets the
        actor act on (`_may`), so nobody lists a principal who outranks them.

        The rule:
        - admin: everything (the local operator is an admin);
        - any role: who am I, and a server's placeholder names (no values);
        - manager: reading servers; on another principal, overrides (set,
          list masked, delete, test, status) and usage records, but only of a
          principal whose highest role is not above the manager's (so never an
          admin's); never another principal's keys, since a key for someone is
          the power to act as them;
        - manager and user: their own keys, overrides and usage records;
        - everything else (servers, principals, teams, pruning usage, the
          audit trail) is for admins.
        An unknown target is refused to all but admins, exactly as a principal
        who outranks the actor would be.
        """
        roles = actor.roles
        if Role.ADMIN in roles:
            return
        if action in _ANY_ROLE_ACTIONS and roles:
            return
        if action in _SERVER_READ_ACTIONS and Role.MANAGER in roles:
            return
        if action in _OWNED_ACTIONS and roles:
            manages = action in _MANAGED_ACTIONS and Role.MANAGER in roles
            if everyone:
                if manages:
                    return
            elif target is not None:
                if target.id == actor.principal_id:
                    return
                if manages and _rank(target.roles) <= _rank(roles):
                    return
        raise PermissionDenied(f"You are not allowed to do {action} on this target.")

    def _may(self, actor: Actor, action: str, target: Principal | None = None, *, everyone: bool = False) -> bool:
        """`_authorize` as a yes/no, for choosing what a listing shows."""
        try:
            self._authorize(actor, action, target, everyone=everyone)
        except PermissionDenied:
            return False
        return True

    def _sees_everyone(self, actor: Actor, action: str) -> bool:
        return self._may(actor, action, everyone=True)

    def _visible(self, actor: Actor, action: str, people: Iterable[Principal]) -> frozenset[str] | None:
        """Whose rows a listing of everyone shows the actor: None for all of them (an actor who may
        act even on an unknown principal, i.e. an admin), else the ids of the principals in
        `people` the actor may act on, so nobody sees the rows of a principal who outranks them."""
        if self._may(actor, action, None):
            return None
        return frozenset(p.id for p in people if self._may(actor, action, p))

    def _audit(self, actor: Actor, action: str, target: str) -> _Audit:
        return _Audit(self._store, self._clock, actor, action, target)

    def _now(self) -> datetime:
        return _as_utc(self._clock())

    # --- init and master key -------------------------------------------------------------

    async def verify_master_key(self, *, require_initialized: bool = True) -> None:
        """Raise MasterKeyError unless our keyring opens the store's check values.

        Every command that opens a store calls this first, so a wrong master key
        stops before anything is written. With `require_initialized`, a store
        without check values (never initialised) is a ConfigError too: values
        sealed into it would be bound to a key nobody recorded.
        """
        checks = await self._store.get_key_checks()
        if not checks and require_initialized:
            raise ConfigError("The store is not initialised: run 'mcp-authz init' first.")
        self._keyring.verify_check(checks)

    async def initialize(
        self, actor: Actor, admin_name: str = "admin", team: str = "default"
    ) -> tuple[Principal, GatewayKeyView, Secret]:
        """Bind the store to this master key and create the first admin and their key.

        The store must be migrated. Refuses with Conflict when it already holds
        master key checks (initialised before).
        """
        async with self._audit(actor, "init", f"principal:{admin_name}") as op:
            self._authorize(actor, "init", None)
            _check_name(admin_name, "admin principal")
            _check_name(team, "team")
            if await self._store.get_key_checks():
                raise Conflict(
                    "The store is already initialised. Use the existing admin key, or create another with "
                    "'mcp-authz keys create'."
                )
            if await self._store.get_principal_by_name(admin_name) is not None:
                raise Conflict(f"A principal named {admin_name} exists already.")
            now = self._now()
            await self._store.put_key_checks(self._keyring.check_values())
            await self._store.ensure_team(team, now)
            principal = await self._store.add_principal(
                Principal(
                    id=_new_principal_id(),
                    name=admin_name,
                    kind=PrincipalKind.USER,
                    team=team,
                    roles=(Role.ADMIN,),
                    created_at=now,
                )
            )
            key, secret = await self._issue_key(principal.id, "initial admin key", None, (), now)
            op.details.update({"team": team, "key_id": key.key_id, "key_versions": _versions(self._keyring)})
            return principal, GatewayKeyView.of(key, principal.name, now), secret

    # --- servers --------------------------------------------------------------------------

    async def add_server(
        self,
        actor: Actor,
        name: str,
        mode: AuthMode | str,
        headers: Sequence[str] = (),
        optional: Iterable[str] = (),
        description: str = "",
        upstream_url: str = "",
    ) -> tuple[ServerView, Secret]:
        """Register an MCP server. Returns its view and its signing secret, shown once.
        `upstream_url` (optional) is where `overrides test` sends an MCP initialize."""
        async with self._audit(actor, "servers.add", f"server:{name}") as op:
            self._authorize(actor, "servers.add", None)
            _check_name(name, "server")
            auth_mode = _parse_mode(mode)
            templates = _parse_headers(headers)
            placeholders = _placeholders(auth_mode, templates, set(optional))
            _check_text(description, "description", MAX_DESCRIPTION_LEN)
            _check_upstream_url(upstream_url)
            if await self._store.get_server(name) is not None:
                raise Conflict(f"A server named {name} exists already.")
            now = self._now()
            signing = Secret(secrets.token_urlsafe(32))
            server = await self._store.add_server(
                McpServer(
                    name=name,
                    mode=auth_mode,
                    headers=templates,
                    placeholders=placeholders,
                    signing_secret=self._keyring.seal(signing.reveal(), aad_signing(name)),
                    description=description,
                    created_at=now,
                    updated_at=now,
                    upstream_url=upstream_url,
                )
            )
            op.details.update({"mode": auth_mode.value, "placeholders": ",".join(p.name for p in placeholders)})
            if upstream_url:
                op.details["upstream_url"] = upstream_url
            return ServerView.of(server), signing

    async def update_server(
        self, actor: Actor, name: str, *, upstream_url: str | None = None, description: str | None = None
    ) -> ServerView:
        """Change a server's upstream URL and/or description (None: unchanged, "": cleared)."""
        async with self._audit(actor, "servers.update", f"server:{name}") as op:
            self._authorize(actor, "servers.update", None)
            server = await self._server(name)
            if upstream_url is None and description is None:
                raise InvalidInput("Nothing to change: give an upstream URL or a description.")
            if upstream_url is not None:
                _check_upstream_url(upstream_url)
                op.details["upstream_url"] = upstream_url
                server = replace(server, upstream_url=upstream_url)
            if description is not None:
                _check_text(description, "description", MAX_DESCRIPTION_LEN)
                op.details["description"] = "changed"
                server = replace(server, description=description)
            return ServerView.of(await self._store.update_server(replace(server, updated_at=self._now())))

    async def server_form(self, actor: Actor, name: str) -> ServerFormView:
        """A server's mode and placeholder names, so a client knows what to ask its user for.
        Any authenticated principal may read it: it holds no value."""
        async with self._audit(actor, "servers.form", f"server:{name}"):
            self._authorize(actor, "servers.form", None)
            server = await self._server(name)
            return ServerFormView(server.name, server.mode.value, server.placeholders)

    async def whoami(self, actor: Actor) -> WhoAmIView:
        """The caller, as the admin API authenticated it."""
        async with self._audit(actor, "whoami", "self"):
            self._authorize(actor, "whoami", None)
            if actor.is_operator:
                return WhoAmIView(CLI_ACTOR_ID, CLI_ACTOR_ID, "operator", "", tuple(r.value for r in actor.roles))
            me = await self._store.get_principal(actor.principal_id)
            if me is None:
                raise NotFound("Your principal no longer exists.")
            return WhoAmIView(me.id, me.name, me.kind.value, me.team, tuple(r.value for r in me.roles))

    async def list_servers(self, actor: Actor) -> list[ServerView]:
        async with self._audit(actor, "servers.list", "servers"):
            self._authorize(actor, "servers.list", None)
            return [ServerView.of(s) for s in await self._store.list_servers()]

    async def show_server(self, actor: Actor, name: str) -> ServerView:
        async with self._audit(actor, "servers.show", f"server:{name}"):
            self._authorize(actor, "servers.show", None)
            return ServerView.of(await self._server(name))

    async def set_shared(self, actor: Actor, name: str, values: Mapping[str, str]) -> ServerView:
        """Replace a shared-mode server's default values (every required placeholder must be given)."""
        async with self._audit(actor, "servers.set_shared", f"server:{name}") as op:
            self._authorize(actor, "servers.set_shared", None)
            server = await self._server(name)
            if server.mode is not AuthMode.SHARED:
                raise InvalidInput(
                    f"Server {name} is in {server.mode.value} mode; only shared servers have default values"
                    + (
                        ". Each principal sets their own with 'mcp-authz overrides set'."
                        if server.mode is AuthMode.INDIVIDUAL
                        else "."
                    )
                )
            clean = _check_values(server, values)
            sealed = {f: self._keyring.seal(v, aad_shared(name, f)) for f, v in clean.items()}
            updated = await self._store.update_server(
                replace(
                    server,
                    shared_values=sealed,
                    shared_masks={f: mask(v) for f, v in clean.items()},
                    updated_at=self._now(),
                )
            )
            op.details["fields"] = ",".join(sorted(clean))
            return ServerView.of(updated)

    async def remove_server(self, actor: Actor, name: str) -> None:
        """Delete a server and every override for it."""
        async with self._audit(actor, "servers.remove", f"server:{name}"):
            self._authorize(actor, "servers.remove", None)
            await self._server(name)
            await self._store.remove_server(name)

    async def rotate_signing_secret(self, actor: Actor, name: str) -> Secret:
        """A new signing secret for the server, shown once; the old one stops signing at once."""
        async with self._audit(actor, "servers.rotate_signing_secret", f"server:{name}"):
            self._authorize(actor, "servers.rotate_signing_secret", None)
            server = await self._server(name)
            signing = Secret(secrets.token_urlsafe(32))
            await self._store.update_server(
                replace(
                    server,
                    signing_secret=self._keyring.seal(signing.reveal(), aad_signing(name)),
                    updated_at=self._now(),
                )
            )
            return signing

    # --- principals and teams ------------------------------------------------------------------

    async def add_principal(
        self,
        actor: Actor,
        name: str,
        team: str,
        roles: Iterable[Role | str],
        kind: PrincipalKind | str = PrincipalKind.USER,
        rate_limit_per_minute: int | None = None,
    ) -> PrincipalView:
        """Create a user or a service account, creating its team when missing."""
        async with self._audit(actor, "principals.add", f"principal:{name}") as op:
            self._authorize(actor, "principals.add", None)
            _check_name(name, "principal")
            _check_name(team, "team")
            role_tuple = _parse_roles(roles)
            principal_kind = _parse_kind(kind)
            if rate_limit_per_minute is not None and not 1 <= rate_limit_per_minute <= 1_000_000:
                raise InvalidInput("The rate limit must be between 1 and 1000000 requests per minute.")
            if await self._store.get_principal_by_name(name) is not None:
                raise Conflict(f"A principal named {name} exists already.")
            now = self._now()
            await self._store.ensure_team(team, now)
            principal = await self._store.add_principal(
                Principal(
                    id=_new_principal_id(),
                    name=name,
                    kind=principal_kind,
                    team=team,
                    roles=role_tuple,
                    rate_limit_per_minute=rate_limit_per_minute,
                    created_at=now,
                )
            )
            op.details.update(
                {
                    "id": principal.id,
                    "team": team,
                    "kind": principal_kind.value,
                    "roles": ",".join(r.value for r in role_tuple),
                }
            )
            return PrincipalView.of(principal)

    async def list_principals(self, actor: Actor, team: str | None = None) -> list[PrincipalView]:
        async with self._audit(actor, "principals.list", f"team:{team}" if team else "principals"):
            self._authorize(actor, "principals.list", None)
            if team is not None:
                _check_name(team, "team")
            return [PrincipalView.of(p) for p in await self._store.list_principals(team)]

    async def set_principal_disabled(self, actor: Actor, name: str, disabled: bool) -> PrincipalView:
        """Disabling blocks every key of the principal at once; enabling restores them."""
        action = "principals.disable" if disabled else "principals.enable"
        async with self._audit(actor, action, f"principal:{name}"):
            self._authorize(actor, action, None)
            principal = await self._principal(name)
            return PrincipalView.of(await self._store.set_principal_disabled(principal.id, disabled))

    async def list_teams(self, actor: Actor) -> list[TeamView]:
        async with self._audit(actor, "teams.list", "teams"):
            self._authorize(actor, "teams.list", None)
            return [TeamView.of(t) for t in await self._store.list_teams()]

    async def set_team_disabled(self, actor: Actor, name: str, disabled: bool) -> TeamView:
        """Disabling a team blocks every key of every principal in it."""
        action = "teams.disable" if disabled else "teams.enable"
        async with self._audit(actor, action, f"team:{name}"):
            self._authorize(actor, action, None)
            _check_name(name, "team")
            if await self._store.get_team(name) is None:
                raise NotFound(f"No team named {name}.")
            return TeamView.of(await self._store.set_team_disabled(name, disabled))

    # --- gateway keys ------------------------------------------------------------------------

    async def create_key(
        self,
        actor: Actor,
        principal_name: str | None,
        label: str = "",
        expires_at: datetime | None = None,
        scope: Iterable[str] = (),
    ) -> tuple[GatewayKeyView, Secret]:
        """Issue a key for a principal (None: the caller). The key is returned once and stored only as a hash."""
        async with self._audit(actor, "keys.create", f"principal:{principal_name or '(own)'}") as op:
            principal = await self._owned_principal(actor, "keys.create", principal_name)
            _check_text(label, "label", MAX_LABEL_LEN)
            now = self._now()
            expiry = None if expires_at is None else _as_utc(expires_at)
            if expiry is not None and expiry <= now:
                raise InvalidInput("The expiry must be in the future.")
            scope_tuple = await self._check_scope(scope)
            key, secret = await self._issue_key(principal.id, label, expiry, scope_tuple, now)
            op.target = f"key:{key.key_id}"
            op.details.update({"principal": principal.name, "key_id": key.key_id})
            if scope_tuple:
                op.details["scope"] = ",".join(scope_tuple)
            if expiry is not None:
                op.details["expires_at"] = iso(expiry) or ""
            return GatewayKeyView.of(key, principal.name, now), secret

    async def list_keys(self, actor: Actor, principal_name: str | None = None) -> list[GatewayKeyView]:
        """Keys of one principal, or of everyone the actor may see (an admin: everyone's; a manager
        or a user: only their own)."""
        async with self._audit(actor, "keys.list", f"principal:{principal_name}" if principal_name else "keys"):
            if principal_name is not None:
                principal = await self._owned_principal(actor, "keys.list", principal_name)
                stored = await self._store.list_keys(principal.id)
                names = {principal.id: principal.name}
            elif self._sees_everyone(actor, "keys.list"):
                people = await self._store.list_principals()
                names = {p.id: p.name for p in people}
                visible = self._visible(actor, "keys.list", people)
                stored = [k for k in await self._store.list_keys(None) if visible is None or k.principal_id in visible]
            else:
                me = await self._store.get_principal(actor.principal_id)
                self._authorize(actor, "keys.list", me)
                stored = await self._store.list_keys(actor.principal_id)
                names = {actor.principal_id: me.name if me else actor.principal_id}
            now = self._now()
            return [GatewayKeyView.of(k, names.get(k.principal_id, k.principal_id), now) for k in stored]

    async def revoke_key(self, actor: Actor, key_id: str) -> GatewayKeyView:
        """Revoke now. An earlier revocation is kept; a pending grace period is cut short."""
        async with self._audit(actor, "keys.revoke", f"key:{key_id}"):
            key = await self._owned_key(actor, "keys.revoke", key_id)
            now = self._now()
            revoked = await self._store.revoke_key(key.key_id, now)
            return GatewayKeyView.of(revoked, await self._principal_name(revoked.principal_id), now)

    async def regenerate_key(
        self, actor: Actor, key_id: str, grace_seconds: int = 0
    ) -> tuple[GatewayKeyView, Secret]:
        """Issue a replacement (same principal, label, scope and expiry) and revoke the old key
        now, or after `grace_seconds` so clients can be switched without downtime."""
        async with self._audit(actor, "keys.regenerate", f"key:{key_id}") as op:
            old = await self._owned_key(actor, "keys.regenerate", key_id)
            if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
                raise InvalidInput("The grace period must be between 0 seconds and 30 days.")
            now = self._now()
            if old.revoked_at is not None:
                raise Conflict(
                    f"Key {old.key_id} is already revoked or replaced; create a new key with 'mcp-authz keys create'."
                )
            if old.expires_at is not None and old.expires_at <= now:
                raise Conflict(f"Key {old.key_id} has expired; create a new key with 'mcp-authz keys create'.")
            # The new key is stored before the old one is revoked, so the principal is never without one.
            new, secret = await self._issue_key(old.principal_id, old.label, old.expires_at, old.scope, now)
            await self._store.revoke_key(old.key_id, now + timedelta(seconds=grace_seconds))
            op.details.update({"new_key_id": new.key_id, "grace_seconds": str(grace_seconds)})
            return GatewayKeyView.of(new, await self._principal_name(new.principal_id), now), secret

    # --- overrides ---------------------------------------------------------------------------

    async def set_override(
        self,
        actor: Actor,
        principal_name: str | None,
        server_name: str,
        values: Mapping[str, str],
        expires_at: datetime | None = None,
    ) -> OverrideView:
        """Set (replace) a principal's own values for a server's placeholders (principal None: the
        caller). With `expires_at`, the credential is `expired` from then on and no longer injected."""
        target = f"override:{principal_name or '(own)'}/{server_name}"
        async with self._audit(actor, "overrides.set", target) as op:
            principal = await self._owned_principal(actor, "overrides.set", principal_name)
            server = await self._server(server_name)
            if server.mode is AuthMode.NONE:
                raise InvalidInput(f"Server {server_name} is in none mode: it takes no credentials.")
            clean = _check_values(server, values)
            now = self._now()
            expiry = None if expires_at is None else _as_utc(expires_at)
            if expiry is not None:
                if expiry <= now:
                    raise InvalidInput("The expiry must be in the future.")
                op.details["expires_at"] = iso(expiry) or ""
            override = await self._store.put_override(
                Override(
                    principal_id=principal.id,
                    server=server.name,
                    values={
                        f: self._keyring.seal(v, aad_override(server.name, principal.id, f)) for f, v in clean.items()
                    },
                    masks={f: mask(v) for f, v in clean.items()},
                    updated_by=actor.principal_id,
                    updated_at=now,
                    status=OverrideStatus.CONFIGURED,
                    status_at=now,
                    expires_at=expiry,
                )
            )
            op.details["fields"] = ",".join(sorted(clean))
            return await self._override_view(override, {principal.id: principal})

    async def list_overrides(
        self, actor: Actor, server_name: str | None = None, principal_name: str | None = None
    ) -> list[OverrideView]:
        """Overrides with masks and status; values are never decrypted. Without a principal: an admin
        sees everyone's, a manager everyone's but those of principals who outrank them (admins), a
        user only their own."""
        target = "overrides"
        if server_name or principal_name:
            target = f"override:{principal_name or '*'}/{server_name or '*'}"
        async with self._audit(actor, "overrides.list", target):
            if server_name is not None:
                _check_name(server_name, "server")
            people = {p.id: p for p in await self._store.list_principals()}
            visible: frozenset[str] | None = None
            if principal_name is not None:
                principal_id: str | None = (await self._owned_principal(actor, "overrides.list", principal_name)).id
            elif self._sees_everyone(actor, "overrides.list"):
                principal_id = None
                visible = self._visible(actor, "overrides.list", people.values())
            else:
                self._authorize(actor, "overrides.list", people.get(actor.principal_id))
                principal_id = actor.principal_id
            stored = await self._store.list_overrides(server_name, principal_id)
            return [
                await self._override_view(o, people) for o in stored if visible is None or o.principal_id in visible
            ]

    async def delete_override(self, actor: Actor, principal_name: str | None, server_name: str) -> None:
        """Delete an override (principal None: the caller's): the principal falls back to the
        server's shared value, if any."""
        async with self._audit(actor, "overrides.delete", f"override:{principal_name or '(own)'}/{server_name}"):
            principal = await self._owned_principal(actor, "overrides.delete", principal_name)
            _check_name(server_name, "server")
            if await self._store.get_override(principal.id, server_name) is None:
                raise NotFound(f"{principal.name} has no override for server {server_name}.")
            await self._store.delete_override(principal.id, server_name)

    async def credential_status(
        self, actor: Actor, server_name: str | None = None, principal_name: str | None = None
    ) -> list[CredentialStatusView]:
        """The credential status of each (principal, server) pair, sorted by server then principal.

        Servers: the one named, or every server that takes credentials. Principals:
        the one named, or everyone the actor may see (an admin: everyone; a manager:
        everyone but principals who outrank them; a user: only themselves).
        Values are masks; nothing is decrypted.
        """
        target = f"override:{principal_name or '*'}/{server_name or '*'}"
        async with self._audit(actor, "overrides.status", target) as op:
            if server_name is not None:
                server = await self._server(server_name)
                if server.mode is AuthMode.NONE:
                    raise InvalidInput(f"Server {server_name} is in none mode: it takes no credentials.")
                servers = [server]
            else:
                servers = [s for s in await self._store.list_servers() if s.mode is not AuthMode.NONE]
            people = {p.id: p for p in await self._store.list_principals()}
            if principal_name is not None:
                principals = [await self._owned_principal(actor, "overrides.status", principal_name)]
                principal_id: str | None = principals[0].id
            elif self._sees_everyone(actor, "overrides.status"):
                visible = self._visible(actor, "overrides.status", people.values())
                principals = [p for p in people.values() if visible is None or p.id in visible]
                principal_id = None
            else:
                me = people.get(actor.principal_id)
                self._authorize(actor, "overrides.status", me)
                principals, principal_id = ([me] if me else []), actor.principal_id
            overrides = {
                (o.principal_id, o.server): o
                for o in await self._store.list_overrides(server_name, principal_id)
            }
            now = self._now()
            rows = [
                await self._status_row(s, p, overrides.get((p.id, s.name)), people, now)
                for s in servers
                for p in sorted(principals, key=lambda p: p.name)
            ]
            op.details["count"] = str(len(rows))
            return rows

    async def test_override(
        self, actor: Actor, server_name: str, principal_name: str | None = None
    ) -> OverrideTestView:
        """Validate a principal's override (None: the caller's) by sending an MCP `initialize`
        to the server's upstream URL with it, signed and with the verified identity headers, as
        Check would send it. A 2xx marks it configured, a 401 or 403 invalid; anything else
        changes nothing. The result is recorded in the override's status and the audit trail."""
        target = f"override:{principal_name or '(own)'}/{server_name}"
        async with self._audit(actor, "overrides.test", target) as op:
            principal = await self._owned_principal(actor, "overrides.test", principal_name)
            server = await self._server(server_name)
            if server.mode is AuthMode.NONE:
                raise InvalidInput(f"Server {server_name} is in none mode: it takes no credentials.")
            if not server.upstream_url:
                raise InvalidInput(
                    f"Server {server_name} has no upstream URL to test against; an admin sets one with "
                    f"'mcp-authz servers update {server_name} --upstream-url URL'."
                )
            override = await self._store.get_override(principal.id, server.name)
            if override is None:
                raise NotFound(f"{principal.name} has no override for server {server_name}.")
            headers = self._probe_headers(server, principal, override, actor.request_id)
            try:
                status = await self._probe.initialize(server.upstream_url, headers)
            except ProbeFailed as failed:
                status, detail = 0, failed.message
            else:
                detail = f"upstream answered {status}"
            now = self._now()
            if 200 <= status < 300:
                result, new_status = "ok", OverrideStatus.CONFIGURED
            elif status in (401, 403):
                result, new_status = "rejected", OverrideStatus.INVALID
            else:
                result, new_status = "inconclusive", None
            after = override.status
            if new_status is not None:
                reason = f"overrides test: {detail}"
                with contextlib.suppress(NotFound):  # deleted meanwhile: nothing to mark
                    after = (
                        await self._store.set_override_status(principal.id, server.name, new_status, reason, now)
                    ).status
            op.details.update({"result": result, "http_status": str(status), "principal": principal.name})
            return OverrideTestView(principal.name, server.name, result, status, detail, after.value)

    def _probe_headers(
        self, server: McpServer, principal: Principal, override: Override, request_id: str
    ) -> list[tuple[str, str]]:
        """The headers Check would set: the rendered credential, the identity and a signature."""
        values = {
            name: self._keyring.open(sealed, aad_override(server.name, principal.id, name))
            for name, sealed in override.values.items()
        }
        out: list[tuple[str, str]] = []
        for header in server.headers:
            missing = False

            def fill(match: re.Match[str]) -> str:
                nonlocal missing
                secret = values.get(match.group(1))
                if secret is None:
                    missing = True
                    return ""
                return secret.reveal()

            value = PLACEHOLDER_RE.sub(fill, header.template)
            if not missing or not header.placeholders():
                out.append((header.name.lower(), value))
        identity = (principal.name, principal.kind.value, principal.team, ",".join(r.value for r in principal.roles))
        out += [(n, v) for n, v in zip(IDENTITY_HEADERS, identity) if v]
        request_id = request_id or str(uuid.uuid4())
        out.append((REQUEST_ID_HEADER, request_id))
        if server.signing_secret is not None:
            secret = self._keyring.open(server.signing_secret, aad_signing(server.name)).reveal().encode()
            timestamp = str(int(time.time()))
            path = _request_target(server.upstream_url)
            out.append(("x-mcp-authz-timestamp", timestamp))
            out.append(("x-mcp-authz-signature", sign(secret, timestamp, "POST", path, identity, request_id)))
        return out

    async def _status_row(
        self,
        server: McpServer,
        principal: Principal,
        override: Override | None,
        people: Mapping[str, Principal],
        now: datetime,
    ) -> CredentialStatusView:
        if override is not None:
            view = await self._override_view(override, people)
            reason = override.status_reason
            if view.status == OverrideStatus.EXPIRED.value and override.expires_at is not None:
                reason = f"expired at {iso(override.expires_at)}: set it again"
            return CredentialStatusView(
                server.name, server.mode.value, principal.name, principal.kind.value, principal.team, view.status,
                "override", view.masks, view.updated_by, override.updated_at, reason,
            )
        if server.mode is AuthMode.SHARED:
            required = {p.name for p in server.placeholders if p.required}
            ok = bool(server.shared_values) and required <= set(server.shared_values)
            return CredentialStatusView(
                server.name, server.mode.value, principal.name, principal.kind.value, principal.team,
                "configured" if ok else "missing", "shared" if ok else "",
                tuple(sorted(server.shared_masks.items())) if ok else (), "", None,
                "the server's shared default" if ok else "the server's shared default is not set",
            )
        return CredentialStatusView(
            server.name, server.mode.value, principal.name, principal.kind.value, principal.team, "missing", "",
            (), "", None, "no personal credential set",
        )

    # --- audit trail -------------------------------------------------------------------------

    async def query_audit(
        self,
        actor: Actor,
        actor_name: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[AuditView]:
        """Audit events matching every filter, oldest first, at most `limit`. Admins only.

        `actor_name` is a principal's name (or id), "cli" for the local operator,
        or "-" for unauthenticated callers; `action` may end in '*' (a prefix).
        """
        async with self._audit(actor, "audit.query", "audit") as op:
            self._authorize(actor, "audit.query", None)
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_LIMIT:
                raise InvalidInput(f"The limit must be between 1 and {MAX_AUDIT_LIMIT} events.")
            found = await self._audit_filter(op, actor_name, action, target, since, until)
            events = await self._store.query_audit(
                actor=found.actor, action=found.action, target=found.target, since=found.since,
                until=found.until, limit=limit,
            )
            names: dict[str, str] = {}
            views = [await self._audit_view(e, names) for e in events]
            op.details.update({"limit": str(limit), "count": str(len(views))})
            return views

    async def export_audit(
        self,
        actor: Actor,
        actor_name: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = AUDIT_PAGE_SIZE,
    ) -> AsyncIterator[list[AuditView]]:
        """Like `query_audit`, for any number of events: authorizes and audits (`audit.export`)
        now, then returns the events lazily, one store query of `page_size` per page, in id
        order. Keep the store open until the pages are read."""
        async with self._audit(actor, "audit.export", "audit") as op:
            self._authorize(actor, "audit.export", None)
            if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_AUDIT_LIMIT:
                raise InvalidInput(f"The page size must be between 1 and {MAX_AUDIT_LIMIT} events.")
            found = await self._audit_filter(op, actor_name, action, target, since, until)
        return self._audit_pages(found, page_size)

    async def _audit_pages(self, found: _AuditFilter, page_size: int) -> AsyncIterator[list[AuditView]]:
        names: dict[str, str] = {}
        after: int | None = None
        while True:
            events = await self._store.query_audit(
                actor=found.actor, action=found.action, target=found.target, since=found.since,
                until=found.until, after_id=after, limit=page_size,
            )
            if not events:
                return
            yield [await self._audit_view(e, names) for e in events]
            after = events[-1].id
            if len(events) < page_size or after is None:
                return

    async def _audit_filter(
        self,
        op: _Audit,
        actor_name: str | None,
        action: str | None,
        target: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> _AuditFilter:
        actor_id: str | None = None
        if actor_name is not None:
            if actor_name in (CLI_ACTOR_ID, "-") or _PRINCIPAL_ID_RE.match(actor_name):
                actor_id = actor_name
            else:
                actor_id = (await self._principal(actor_name)).id
            op.details["actor"] = actor_name
        if action is not None:
            if not _ACTION_FILTER_RE.match(action):
                raise InvalidInput(
                    "The action filter is an action such as keys.revoke, or a prefix ending in '*' (keys.*)."
                )
            op.details["action"] = action
        if target is not None:
            _check_text(target, "target filter", MAX_TARGET_LEN)
            if gateway_keys.looks_like_key(target):
                raise InvalidInput("That is a whole gateway key: filter on a key id (key:ID) instead.")
            op.details["target"] = target
        start = None if since is None else _as_utc(since)
        end = None if until is None else _as_utc(until)
        if start is not None and end is not None and start >= end:
            raise InvalidInput("The start of the time range (since) must be before its end (until).")
        if start is not None:
            op.details["since"] = iso(start) or ""
        if end is not None:
            op.details["until"] = iso(end) or ""
        return _AuditFilter(actor_id, action, target, start, end)

    async def _audit_view(self, event: AuditEvent, names: dict[str, str]) -> AuditView:
        who = event.actor
        if who in (CLI_ACTOR_ID, "-", ""):
            return AuditView.of(event, who or "-")
        if who not in names:
            names[who] = await self._principal_name(who)
        return AuditView.of(event, names[who])

    # --- usage -------------------------------------------------------------------------------

    async def query_usage(
        self,
        actor: Actor,
        principal_name: str | None = None,
        server_name: str | None = None,
        tool: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[UsageView]:
        """Usage records matching every filter given, oldest first (`since` inclusive,
        `until` exclusive), at most `limit` (1 to MAX_USAGE_LIMIT).

        Admins see everyone's. A manager sees everyone's but those of principals
        who outrank them (admins) and of principals no longer in the store (whose
        rank is unknown); records of unauthenticated requests belong to nobody
        and are shown. A user sees only their own. With no principal given the
        answer is silently narrowed to what the actor may see; naming a
        principal the actor may not see is PermissionDenied whether or not that
        principal exists. Servers and tools are matched by name, so records of
        removed ones stay queryable.
        """
        async with self._audit(actor, "usage.query", "usage") as op:
            _check_usage_limit(limit)
            found = await self._usage_filter(actor, "usage.query", op, principal_name, server_name, tool, since, until)
            if found.visible is None:
                records = await self._store.query_usage(
                    principal_id=found.principal_id,
                    server=found.server,
                    tool=found.tool,
                    since=found.since,
                    until=found.until,
                    limit=limit,
                )
                names: dict[str, str] = {}
                views = [await self._usage_view(r, names) for r in records]
            else:  # some records are hidden: read on until `limit` shown ones, or the end
                views = [v async for page in self._usage_pages(found, limit, limit) for v in page]
            op.details.update({"limit": str(limit), "count": str(len(views))})
            return views

    async def export_usage(
        self,
        actor: Actor,
        principal_name: str | None = None,
        server_name: str | None = None,
        tool: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        page_size: int = USAGE_PAGE_SIZE,
    ) -> AsyncIterator[list[UsageView]]:
        """Like `query_usage`, for exports of any size: authorizes and audits
        (`usage.export`) now, then returns the records lazily, page by page.

        Each page is one store query of at most `page_size` records, resuming
        after the last (at, id) returned, so memory holds one page whatever the
        export's size. `limit` (None: everything) caps the whole export. The
        pages read the store while they are iterated: keep it open until done.
        A record written meanwhile is included when it sorts after the point
        reached; an export is not a snapshot.
        """
        async with self._audit(actor, "usage.export", "usage") as op:
            if limit is not None:
                if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                    raise InvalidInput("The limit must be a positive number of records.")
                op.details["limit"] = str(limit)
            if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_USAGE_LIMIT:
                raise InvalidInput(f"The page size must be between 1 and {MAX_USAGE_LIMIT} records.")
            found = await self._usage_filter(actor, "usage.export", op, principal_name, server_name, tool, since, until)
        return self._usage_pages(found, limit, page_size)

    async def prune_usage(self, actor: Actor, before: datetime) -> int:
        """Delete usage records older than `before` (retention); return how many. Admin only."""
        async with self._audit(actor, "usage.prune", "usage") as op:
            self._authorize(actor, "usage.prune", None)
            cutoff = _as_utc(before)
            if cutoff > self._now():
                raise InvalidInput("The cutoff is in the future: prune deletes only records older than a past time.")
            pruned = await self._store.prune_usage(cutoff)
            op.details.update({"before": iso(cutoff) or "", "pruned": str(pruned)})
            return pruned

    async def _usage_filter(
        self,
        actor: Actor,
        action: str,
        op: _Audit,
        principal_name: str | None,
        server_name: str | None,
        tool: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> _UsageFilter:
        """Validate the filters, apply the role check, and note them (all secret-free) in the audit details."""
        if server_name is not None:
            _check_name(server_name, "server")
            op.details["server"] = server_name
        if tool is not None:
            if not isinstance(tool, str) or not _TOOL_RE.match(tool):
                raise InvalidInput("The tool name is invalid: use 1 to 128 letters, digits, '_', '-', '.' or '/'.")
            op.details["tool"] = tool
        start = None if since is None else _as_utc(since)
        end = None if until is None else _as_utc(until)
        if start is not None and end is not None and start >= end:
            raise InvalidInput("The start of the time range (since) must be before its end (until).")
        if start is not None:
            op.details["since"] = iso(start) or ""
        if end is not None:
            op.details["until"] = iso(end) or ""
        principal_id: str | None
        visible: frozenset[str] | None = None
        if principal_name is not None:
            principal_id = (await self._owned_principal(actor, action, principal_name)).id
            op.details["principal"] = principal_name
        elif self._sees_everyone(actor, action):
            principal_id = None
            visible = self._visible(actor, action, await self._store.list_principals())
            if visible is not None:
                visible |= {""}  # unauthenticated requests: nobody's
        else:
            self._authorize(actor, action, await self._store.get_principal(actor.principal_id))
            principal_id = actor.principal_id
            op.details["principal"] = "(own)"
        return _UsageFilter(principal_id, server_name, tool, start, end, visible)

    async def _usage_pages(
        self, found: _UsageFilter, limit: int | None, page_size: int
    ) -> AsyncIterator[list[UsageView]]:
        # Paging by `since`: the store orders by (at, id), so the records already
        # returned at the last `at` come first again; ask for that many more and
        # drop them. The page grows only while many records share one instant.
        names: dict[str, str] = {}
        since = found.since
        last: tuple[datetime, int] | None = None
        repeated = 0  # records returned so far whose `at` is last[0]
        remaining = limit
        while remaining is None or remaining > 0:
            want = page_size if remaining is None else min(page_size, remaining)
            asked = want + repeated
            records = await self._store.query_usage(
                principal_id=found.principal_id,
                server=found.server,
                tool=found.tool,
                since=since,
                until=found.until,
                limit=asked,
            )
            fresh = [r for r in records if last is None or (r.at, r.id or 0) > last][:want]
            if not fresh:
                return
            shown = [r for r in fresh if found.shows(r)]
            if shown:
                yield [await self._usage_view(r, names) for r in shown]
            if remaining is not None:
                remaining -= len(shown)
            newest = (fresh[-1].at, fresh[-1].id or 0)
            same = sum(1 for r in fresh if r.at == newest[0])
            repeated = same + (repeated if last is not None and last[0] == newest[0] else 0)
            last, since = newest, newest[0]
            if len(records) < asked:
                return  # the store had no more

    async def _usage_view(self, record: UsageRecord, names: dict[str, str]) -> UsageView:
        """The view, naming the principal (looked up once per id and cached in `names`)."""
        pid = record.principal_id
        if not pid:
            return UsageView.of(record, "-")
        if pid not in names:
            names[pid] = await self._principal_name(pid)  # the bare id when the principal is gone
        return UsageView.of(record, names[pid])

    # --- helpers ---------------------------------------------------------------------------

    async def _issue_key(
        self,
        principal_id: str,
        label: str,
        expires_at: datetime | None,
        scope: tuple[str, ...],
        now: datetime,
    ) -> tuple[GatewayKey, Secret]:
        for _ in range(3):
            key_id, secret = gateway_keys.generate()
            # Argon2id is deliberately slow: keep it off the event loop.
            digest = await asyncio.to_thread(self._hasher.hash, secret)
            try:
                stored = await self._store.add_key(
                    GatewayKey(
                        key_id=key_id,
                        principal_id=principal_id,
                        hash=digest,
                        label=label,
                        created_at=now,
                        expires_at=expires_at,
                        scope=scope,
                    )
                )
            except Conflict:
                continue  # a key id collision (62^7 ids): draw again
            return stored, secret
        raise Conflict("Could not allocate a unique key id; try again.")

    async def _server(self, name: str) -> McpServer:
        _check_name(name, "server")
        server = await self._store.get_server(name)
        if server is None:
            raise NotFound(f"No server named {name}.")
        return server

    async def _principal(self, name: str) -> Principal:
        _check_name(name, "principal")
        principal = await self._store.get_principal_by_name(name)
        if principal is None:
            raise NotFound(f"No principal named {name}.")
        return principal

    async def _principal_name(self, principal_id: str) -> str:
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
            if me is None:
                raise NotFound("Your principal no longer exists.")
            return me
        _check_name(name, "principal")
        principal = await self._store.get_principal_by_name(name)
        self._authorize(actor, action, principal)
        if principal is None:
            raise NotFound(f"No principal named {name}.")
        return principal

    async def _owned_key(self, actor: Actor, action: str, key_id: str) -> GatewayKey:
        """Look the key and its principal up, authorize on that principal, then report absence."""
        _check_key_id(key_id)
        key = await self._store.get_key(key_id)
        owner = await self._store.get_principal(key.principal_id) if key else None
        self._authorize(actor, action, owner)
        if key is None:
            raise NotFound(f"No key with id {key_id}.")
        return key

    async def _check_scope(self, scope: Iterable[str]) -> tuple[str, ...]:
        out: list[str] = []
        for i, raw in enumerate(scope, 1):
            entry = raw.strip()
            server, sep, tool = entry.partition(":")
            if not NAME_RE.match(server) or (sep and not _TOOL_RE.match(tool)):
                raise InvalidInput(
                    f"Scope entry {i} is not 'server' or 'server:tool' (a server name, then optionally ':' "
                    "and a tool name of letters, digits, '_', '-', '.' or '/')."
                )
            if await self._store.get_server(server) is None:
                raise InvalidInput(f"The scope names server {server}, which does not exist.")
            if entry not in out:
                out.append(entry)
        return tuple(out)

    async def _override_view(self, o: Override, people: Mapping[str, Principal]) -> OverrideView:
        owner = people.get(o.principal_id) or await self._store.get_principal(o.principal_id)
        if o.updated_by == CLI_ACTOR_ID:
            updated_by = CLI_ACTOR_ID
        else:
            by = people.get(o.updated_by) or await self._store.get_principal(o.updated_by)
            updated_by = by.name if by else o.updated_by
        expired = o.expires_at is not None and o.expires_at <= self._now()
        return OverrideView(
            principal=owner.name if owner else o.principal_id,
            kind=owner.kind.value if owner else "",
            server=o.server,
            masks=tuple(sorted(o.masks.items())),
            updated_by=updated_by,
            updated_at=o.updated_at,
            status=OverrideStatus.EXPIRED.value if expired else o.status.value,
            status_reason=o.status_reason,
            expires_at=o.expires_at,
        )


# --- validation (pure) ------------------------------------------------------------------


def _new_principal_id() -> str:
    return "p_" + "".join(secrets.choice(gateway_keys.ALPHABET) for _ in range(_PRINCIPAL_ID_LEN))


def _versions(keyring: Keyring) -> str:
    return ",".join(str(v) for v in keyring.versions)


def _check_name(name: str, what: str) -> None:
    # The rejected text is not echoed: a misplaced secret must not end up in a message.
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            f"The {what} name is invalid: use 1 to 63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )


def _check_key_id(key_id: str) -> None:
    if gateway_keys.looks_like_key(key_id):
        raise InvalidInput(
            "That is a whole gateway key, not a key id. Pass only the key id shown by 'mcp-authz keys list', "
            "and never put keys on a command line."
        )
    if not _KEY_ID_RE.match(key_id):
        raise InvalidInput(
            f"A key id is {gateway_keys.KEY_ID_LEN} letters and digits, as shown by 'mcp-authz keys list'."
        )


def _check_upstream_url(url: str) -> None:
    """An http(s) URL without user info or fragment: where `overrides test` posts an initialize."""
    if not isinstance(url, str):
        raise InvalidInput("The upstream URL must be text.")
    if not url:
        return  # "" clears it
    if len(url) > MAX_URL_LEN or _has_control(url) or any(c.isspace() for c in url):
        raise InvalidInput(f"The upstream URL is longer than {MAX_URL_LEN} characters or contains spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
    except ValueError:
        raise InvalidInput("The upstream URL is not a valid URL.") from None
    del port
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("The upstream URL must be http:// or https:// with a host, e.g. https://mcp.example.com/mcp.")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("The upstream URL must not contain user info: credentials belong in overrides, not URLs.")
    if parts.fragment:
        raise InvalidInput("The upstream URL must not have a #fragment.")


def _request_target(url: str) -> str:
    """The path and query an upstream receives for `url` (what a signature covers)."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _check_usage_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_USAGE_LIMIT:
        raise InvalidInput(f"The limit must be between 1 and {MAX_USAGE_LIMIT} records.")


def _has_control(text: str) -> bool:
    # Cc covers C0 (incl. CR, LF, TAB), DEL and C1; Zl/Zp are Unicode line breaks.
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def _check_text(text: str, what: str, limit: int) -> None:
    if len(text) > limit:
        raise InvalidInput(f"The {what} is longer than {limit} characters.")
    if _has_control(text):
        raise InvalidInput(f"The {what} contains a control character or line break.")


def _parse_mode(mode: AuthMode | str) -> AuthMode:
    try:
        return AuthMode(mode)
    except ValueError:
        raise InvalidInput("The mode must be none, shared or individual.") from None


def _parse_kind(kind: PrincipalKind | str) -> PrincipalKind:
    try:
        return PrincipalKind(kind)
    except ValueError:
        raise InvalidInput("The kind must be user or service.") from None


def _parse_roles(roles: Iterable[Role | str]) -> tuple[Role, ...]:
    try:
        parsed = {Role(r) for r in roles}
    except ValueError:
        raise InvalidInput("Roles must be among admin, manager and user.") from None
    if not parsed:
        raise InvalidInput("A principal needs at least one role (admin, manager or user).")
    return tuple(r for r in Role if r in parsed)  # canonical order: admin, manager, user


def _parse_headers(lines: Sequence[str]) -> tuple[HeaderTemplate, ...]:
    """'Name: template' lines into templates; names must be HTTP tokens the gateway does not own."""
    if len(lines) > MAX_HEADERS:
        raise InvalidInput(f"A server has at most {MAX_HEADERS} credential headers.")
    out: list[HeaderTemplate] = []
    seen: set[str] = set()
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith(":"):
            raise InvalidInput(f"Header {i}: pseudo-headers such as :path or :authority cannot be set.")
        name, sep, template = line.partition(":")
        name, template = name.strip(), template.strip()
        if not sep:
            raise InvalidInput(f"Header {i} must be 'Name: value', e.g. 'Authorization: Bearer {{{{API_KEY}}}}'.")
        if not _HTTP_TOKEN_RE.match(name):
            raise InvalidInput(
                f"Header {i}: the name is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~, "
                "at most 64)."
            )
        lowered = name.lower()
        if lowered in RESERVED_HEADERS:
            raise InvalidInput(f"Header {name} is reserved: the gateway sets or protects it itself.")
        if lowered in seen:
            raise InvalidInput(f"Header {name} is given twice.")
        seen.add(lowered)
        if not template:
            raise InvalidInput(f"Header {name} has an empty value template.")
        if len(template.encode()) > MAX_VALUE_BYTES or _has_control(template):
            raise InvalidInput(f"Header {name}: the template is longer than 8 KiB or contains a control character.")
        rest = PLACEHOLDER_RE.sub("", template)
        if "{{" in rest or "}}" in rest:
            raise InvalidInput(
                f"Header {name} has a '{{{{' or '}}}}' that is not a placeholder: "
                "placeholders look like {{API_KEY}} (capital letters, digits and '_')."
            )
        out.append(HeaderTemplate(name, template))
    return tuple(out)


def _placeholders(mode: AuthMode, headers: tuple[HeaderTemplate, ...], optional: set[str]) -> tuple[Placeholder, ...]:
    names: list[str] = []
    for h in headers:
        for p in h.placeholders():
            if p not in names:
                names.append(p)
    if mode is AuthMode.NONE:
        if headers:
            raise InvalidInput("A server in none mode injects no credentials: give it no headers.")
        if optional:
            raise InvalidInput("A server in none mode has no placeholders to make optional.")
        return ()
    if not names:
        raise InvalidInput(
            f"A server in {mode.value} mode needs at least one header with a placeholder, "
            "e.g. 'Authorization: Bearer {{API_KEY}}'."
        )
    unknown = optional - set(names)
    if unknown:
        shown = ", ".join(sorted(_safe_placeholder(n) for n in unknown))
        raise InvalidInput(f"Optional {shown} is not a placeholder of the headers (they use {', '.join(names)}).")
    return tuple(Placeholder(n, required=n not in optional) for n in names)


def _safe_placeholder(name: str) -> str:
    # Only echo text shaped like a placeholder name; anything else could be a pasted secret.
    return name if _PLACEHOLDER_NAME_RE.match(name) else "(an unknown name)"


def _check_values(server: McpServer, values: Mapping[str, str]) -> dict[str, str]:
    """Validate placeholder values for a server. Messages name placeholders, never values."""
    known = [p.name for p in server.placeholders]
    if not values:
        raise InvalidInput(f"No values given for server {server.name}; it needs {', '.join(known) or 'none'}.")
    unknown = set(values) - set(known)
    if unknown:
        shown = ", ".join(sorted(_safe_placeholder(n) for n in unknown))
        raise InvalidInput(f"Unknown placeholder {shown} for server {server.name}; it has {', '.join(known)}.")
    missing = [p.name for p in server.placeholders if p.required and p.name not in values]
    if missing:
        raise InvalidInput(f"Server {server.name} needs a value for {', '.join(missing)}.")
    for name in known:
        if name not in values:
            continue
        value = values[name]
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"The value of {name} is empty.")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise InvalidInput(f"The value of {name} is longer than 8 KiB.")
        if _has_control(value):
            raise InvalidInput(f"The value of {name} contains a control character or line break.")
    return {n: values[n] for n in known if n in values}
