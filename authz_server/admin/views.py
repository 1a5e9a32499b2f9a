"""The results of the admin use cases: small frozen views, the same whichever way they came.

A view never carries a hash, a ciphertext or a plaintext secret: values are
masks (`…9xQa`), and one-time secrets (gateway keys, signing secrets) are
returned beside a view as `Secret`, never in it. `to_json()` gives plain JSON
types, for the CLI's `--json`; `admin/wire.py` turns views into the admin API's
messages and back, so the remote CLI renders exactly what the local one does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from authz_server.models import (
    AuditEvent,
    AuthMode,
    GatewayKey,
    McpServer,
    Placeholder,
    Principal,
    Team,
    UsageRecord,
)

# The seed's indicators for each credential status (shown by `overrides status`).
STATUS_INDICATORS = {"configured": "🟢", "missing": "🟡", "invalid": "🔴", "expired": "⏰"}


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC with a 'Z', or None."""
    if dt is None:
        return None
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _json(name: str, form: str = "") -> dict[str, tuple[str, str]]:
    """The metadata of a field whose JSON key is `name`, in a `form`: "object" (pairs as an
    object) or "placeholders" (a list of {"name", "required"})."""
    return {"json": (name, form)}


def _plain(value: Any, form: str) -> Any:
    if form == "object":
        return dict(value)
    if form == "placeholders":
        pairs = (p if isinstance(p, tuple) else (p.name, p.required) for p in value)
        return [{"name": n, "required": r} for n, r in pairs]
    if isinstance(value, datetime):
        return iso(value)
    return list(value) if isinstance(value, tuple) else value


class _View:
    """What every view shares: `to_json()`, each field in order as plain JSON types (times in ISO
    8601 UTC, tuples as lists), under the key and in the form its `_json` metadata gives."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            name, form = f.metadata.get("json", (f.name, ""))
            out[name] = _plain(getattr(self, f.name), form)
        return out


@dataclass(frozen=True, slots=True)
class TeamView(_View):
    name: str
    disabled: bool
    created_at: datetime | None

    @classmethod
    def of(cls, team: Team) -> TeamView:
        return cls(team.name, team.disabled, team.created_at)


@dataclass(frozen=True, slots=True)
class PrincipalView(_View):
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


@dataclass(frozen=True, slots=True)
class ServerView(_View):
    name: str
    mode: str
    headers: tuple[str, ...]  # "Name: template"
    # (name, required), and (placeholder, mask) of the shared values in shared mode
    placeholders: tuple[tuple[str, bool], ...] = field(metadata=_json("placeholders", "placeholders"))
    shared_masks: tuple[tuple[str, str], ...] = field(metadata=_json("shared_values", "object"))
    shared_status: str | None  # "configured" / "missing" in shared mode, else None
    has_signing_secret: bool
    description: str
    upstream_url: str
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def of(cls, s: McpServer) -> ServerView:
        shared_status = None
        if s.mode is AuthMode.SHARED:
            required = {p.name for p in s.placeholders if p.required}
            shared_status = "configured" if required <= set(s.shared_values) and s.shared_values else "missing"
        return cls(
            name=s.name,
            mode=s.mode.value,
            headers=tuple(f"{h.name}: {h.template}" for h in s.headers),
            placeholders=tuple((p.name, p.required) for p in s.placeholders),
            shared_masks=tuple(sorted(s.shared_masks.items())),
            shared_status=shared_status,
            has_signing_secret=s.signing_secret is not None,
            description=s.description,
            upstream_url=s.upstream_url,
            created_at=s.created_at,
            updated_at=s.updated_at,
        )


@dataclass(frozen=True, slots=True)
class ServerFormView(_View):
    """What a server asks a principal for: its mode and placeholders, never a value."""

    name: str
    mode: str
    placeholders: tuple[Placeholder, ...] = field(metadata=_json("placeholders", "placeholders"))


@dataclass(frozen=True, slots=True)
class OverrideIssueView(_View):
    """An override that no longer fits its server after `servers update`: the required
    placeholders it lacks. Its status is now `missing` with `reason`; it is kept, not dropped."""

    principal: str  # name (its id when gone)
    server: str
    missing: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class PrincipalDeletedView(_View):
    """What `principals delete` removed with the principal; its audit events and usage records stay."""

    id: str
    name: str
    keys_revoked: int
    overrides_deleted: int


@dataclass(frozen=True, slots=True)
class WhoAmIView(_View):
    """The caller: a principal, or the local operator (`id` "cli")."""

    id: str
    name: str
    kind: str
    team: str
    roles: tuple[str, ...]



def key_status(key: GatewayKey, now: datetime) -> str:
    """active, revoked or expired. A revocation in the future (a grace period) is still active."""
    if key.revoked_at is not None and key.revoked_at <= now:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


@dataclass(frozen=True, slots=True)
class GatewayKeyView(_View):
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


@dataclass(frozen=True, slots=True)
class OverrideView(_View):
    principal: str  # name
    kind: str  # user / service
    server: str
    masks: tuple[tuple[str, str], ...] = field(metadata=_json("values", "object"))  # (placeholder, mask)
    updated_by: str  # a principal's name, or "cli"
    updated_at: datetime
    expires_at: datetime | None
    status: str  # "expired" once expires_at has passed, whatever was stored
    status_reason: str


@dataclass(frozen=True, slots=True)
class CredentialStatusView(_View):
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
    masks: tuple[tuple[str, str], ...] = field(metadata=_json("values", "object"))
    updated_by: str
    updated_at: datetime | None
    reason: str

    @property
    def indicator(self) -> str:
        return STATUS_INDICATORS.get(self.status, "?")


@dataclass(frozen=True, slots=True)
class OverrideTestView(_View):
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


@dataclass(frozen=True, slots=True)
class AuditView(_View):
    """One audit event; `actor` is the principal's name (its id when gone, "cli", or "-")."""

    id: int | None
    at: datetime
    actor: str
    actor_id: str
    action: str
    target: str
    outcome: str
    request_id: str
    details: tuple[tuple[str, str], ...] = field(metadata=_json("details", "object"))

    @classmethod
    def of(cls, e: AuditEvent, actor: str) -> AuditView:
        return cls(e.id, e.at, actor, e.actor, e.action, e.target, e.outcome, e.request_id,
                   tuple(sorted(e.details.items())))


@dataclass(frozen=True, slots=True)
class UsageView(_View):
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
        # Every field but the principal's name is the record's own.
        return cls(principal=principal, **{f.name: getattr(r, f.name) for f in _USAGE_FIELDS})


_USAGE_FIELDS = tuple(f for f in dataclasses.fields(UsageView) if f.name != "principal")
