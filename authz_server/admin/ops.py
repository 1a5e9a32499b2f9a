"""`AdminOps`: every admin operation, declared once with its contract.

Two classes implement it: `AdminService` (service.py), which runs the use cases
on a store, and `RemoteAdmin` (remote.py), which runs them on a sidecar through
the admin gRPC API. The CLI types against it, and the gRPC servicer (api.py)
serves it. tests/unit/admin/test_ops.py fails when an operation is on one side
and not the other, or when a signature differs.

What holds for every operation (service.py states it in full): the first
argument is the `Actor` doing it, and exactly one audit event records the call;
a refusal is `PermissionDenied` whether or not the target exists; bad input is
`InvalidInput`, a missing target `NotFound`, a duplicate `Conflict`, and no
message holds a secret. "The caller" is the actor's own principal; a principal
named None means the caller's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from authz_server.admin.policy import Actor
from authz_server.admin.views import (
    AuditView, CredentialStatusView, GatewayKeyView, OverrideIssueView, OverrideTestView, OverrideView,
    PrincipalDeletedView, PrincipalView, ServerFormView, ServerView, TeamView, UsageView, WhoAmIView,
)  # fmt: skip
from authz_server.models import AuthMode, PrincipalKind, Role, Secret

DEFAULT_LIMIT = 1000  # rows a query answers when no limit is given
MAX_LIMIT = 100_000  # rows in one answer; an export streams any number
PAGE_SIZE = 1000  # rows per page of an export


class AdminOps(Protocol):
    """The admin operations. Signatures are the contract: both implementations repeat them exactly."""

    # --- servers --------------------------------------------------------------------------------

    async def whoami(self, actor: Actor) -> WhoAmIView:
        """The caller, as the admin API authenticated it (the local operator is `cli`). Any role."""
        ...

    async def list_servers(self, actor: Actor) -> list[ServerView]:
        """Every server, with masks of shared values. Admins and managers."""
        ...

    async def show_server(self, actor: Actor, name: str) -> ServerView:
        """One server. Admins and managers."""
        ...

    async def server_form(self, actor: Actor, name: str) -> ServerFormView:
        """A server's mode and placeholder names, so a client knows what to ask its user for.
        Any authenticated principal may read it: it holds no value."""
        ...

    async def add_server(self, actor: Actor, name: str, mode: AuthMode | str, headers: Sequence[str] = (),
                         optional: Iterable[str] = (), description: str = "",
                         upstream_url: str = "") -> tuple[ServerView, Secret]:  # fmt: skip
        """Register an MCP server (admins). `headers` are 'Name: template' lines whose placeholders
        (`{{API_KEY}}`) are required unless named in `optional`; `upstream_url` (optional) is where
        `overrides test` sends an MCP initialize. Returns its view and its signing secret, shown once."""
        ...

    async def update_server(self, actor: Actor, name: str, *, upstream_url: str | None = None,
                            description: str | None = None, mode: AuthMode | str | None = None,
                            headers: Sequence[str] | None = None, optional: Iterable[str] | None = None,
                            required: Iterable[str] | None = None,
                            ) -> tuple[ServerView, list[OverrideIssueView]]:  # fmt: skip
        """Change a server in place (None: unchanged; an upstream URL or description "": cleared).
        Admins. `headers` replace the templates, validated as in `add_server`; a placeholder kept
        keeps its required/optional flag unless named in `optional` or `required`, a new one is
        required. Every override is kept: one that lacks a now-required placeholder (with the
        shared values, in shared mode) gets status `missing` with a reason and is reported in the
        returned list, per principal. Shared values of placeholders that are gone are dropped."""
        ...

    async def set_shared(self, actor: Actor, name: str, values: Mapping[str, str]) -> ServerView:
        """Replace a shared-mode server's default values (every required placeholder must be given).
        Admins. The values are sealed; only their masks come back."""
        ...

    async def remove_server(self, actor: Actor, name: str) -> None:
        """Delete a server and every override for it. Admins."""
        ...

    async def rotate_signing_secret(self, actor: Actor, name: str) -> Secret:
        """A new signing secret for the server, shown once; the old one stops signing at once. Admins."""
        ...

    # --- principals and teams -------------------------------------------------------------------

    async def add_principal(self, actor: Actor, name: str, team: str, roles: Iterable[Role | str],
                            kind: PrincipalKind | str = PrincipalKind.USER,
                            rate_limit_per_minute: int | None = None) -> PrincipalView:  # fmt: skip
        """Create a user or a service account, creating its team when missing. Admins."""
        ...

    async def list_principals(self, actor: Actor, team: str | None = None) -> list[PrincipalView]:
        """Every principal, or a team's. Admins."""
        ...

    async def set_principal_disabled(self, actor: Actor, name: str, disabled: bool) -> PrincipalView:
        """Disabling blocks every key of the principal at once; enabling restores them. Admins."""
        ...

    async def update_principal(self, actor: Actor, name: str, *, roles: Iterable[Role | str] | None = None,
                               team: str | None = None, kind: PrincipalKind | str | None = None,
                               rate_limit_per_minute: int | None = None) -> PrincipalView:  # fmt: skip
        """Change a principal's roles, team (created when missing), kind or rate limit (0: none);
        None leaves a field as it is. Admins; nobody gives a role above their own, and the last
        enabled admin keeps the admin role."""
        ...

    async def delete_principal(self, actor: Actor, name: str) -> PrincipalDeletedView:
        """Delete a principal: its keys stop working at once and go, with its overrides; its audit
        events and usage records stay. Admins; the last enabled admin cannot be deleted."""
        ...

    async def list_teams(self, actor: Actor) -> list[TeamView]:
        """Every team. Admins."""
        ...

    async def set_team_disabled(self, actor: Actor, name: str, disabled: bool) -> TeamView:
        """Disabling a team blocks every key of every principal in it. Admins."""
        ...

    # --- gateway keys ---------------------------------------------------------------------------

    async def create_key(self, actor: Actor, principal_name: str | None, label: str = "",
                         expires_at: datetime | None = None,
                         scope: Iterable[str] = ()) -> tuple[GatewayKeyView, Secret]:  # fmt: skip
        """Issue a key for a principal (None: the caller), optionally expiring, and scoped to
        'server' or 'server:tool' entries. The key is returned once and stored only as a hash."""
        ...

    async def list_keys(self, actor: Actor, principal_name: str | None = None) -> list[GatewayKeyView]:
        """Keys of one principal, or of everyone the actor may see (an admin: everyone's; a manager
        or a user: only their own). Never a key or a hash: key ids, labels, status."""
        ...

    async def revoke_key(self, actor: Actor, key_id: str) -> GatewayKeyView:
        """Revoke now. An earlier revocation is kept; a pending grace period is cut short."""
        ...

    async def regenerate_key(self, actor: Actor, key_id: str, grace_seconds: int = 0) -> tuple[GatewayKeyView, Secret]:
        """Issue a replacement (same principal, label, scope and expiry), shown once, and revoke the
        old key now, or after `grace_seconds` (at most 30 days) so clients can be switched over."""
        ...

    # --- overrides and credential status --------------------------------------------------------

    async def set_override(self, actor: Actor, principal_name: str | None, server_name: str,
                           values: Mapping[str, str], expires_at: datetime | None = None) -> OverrideView:  # fmt: skip
        """Set (replace) a principal's own values for a server's placeholders. With `expires_at`,
        the credential is `expired` from then on and no longer injected."""
        ...

    async def list_overrides(self, actor: Actor, server_name: str | None = None,
                             principal_name: str | None = None) -> list[OverrideView]:  # fmt: skip
        """Overrides with masks and status; values are never decrypted. Without a principal: an admin
        sees everyone's, a manager everyone's but those of principals who outrank them (admins), a
        user only their own."""
        ...

    async def delete_override(self, actor: Actor, principal_name: str | None, server_name: str) -> None:
        """Delete an override: the principal falls back to the server's shared value, if any."""
        ...

    async def credential_status(self, actor: Actor, server_name: str | None = None,
                                principal_name: str | None = None) -> list[CredentialStatusView]:  # fmt: skip
        """The credential status of each (principal, server) pair, sorted by server then principal.

        Servers: the one named, or every server that takes credentials. Principals:
        the one named, or everyone the actor may see (an admin: everyone; a manager:
        everyone but principals who outrank them; a user: only themselves).
        Values are masks; nothing is decrypted.
        """
        ...

    async def test_override(self, actor: Actor, server_name: str, principal_name: str | None = None) -> OverrideTestView:
        """Validate a principal's override by sending an MCP `initialize` to the server's upstream
        URL with it, signed and with the verified identity headers, as Check would send it. A 2xx
        marks it configured, a 401 or 403 invalid; anything else changes nothing. The result is
        recorded in the override's status and the audit trail."""
        ...

    # --- records: the audit trail and usage -----------------------------------------------------

    async def query_audit(self, actor: Actor, actor_name: str | None = None, action: str | None = None,
                          target: str | None = None, since: datetime | None = None, until: datetime | None = None,
                          limit: int = DEFAULT_LIMIT) -> list[AuditView]:  # fmt: skip
        """Audit events matching every filter, oldest first (`since` inclusive, `until` exclusive),
        at most `limit` (1 to MAX_LIMIT). Admins only. `actor_name` is a principal's name (or id),
        "cli" for the local operator, or "-" for unauthenticated callers; `action` may end in '*'
        (a prefix); `target` is e.g. key:ID, never a whole key."""
        ...

    async def export_audit(self, actor: Actor, actor_name: str | None = None, action: str | None = None,
                           target: str | None = None, since: datetime | None = None, until: datetime | None = None,
                           limit: int | None = None, page_size: int = PAGE_SIZE,
                           ) -> AsyncIterator[list[AuditView]]:  # fmt: skip
        """Like `query_audit`, for any number of events (`limit` None: all of them): authorizes and
        audits (`audit.export`) now, then returns the events lazily, in pages of at most `page_size`
        (1 to MAX_LIMIT), oldest first. Keep the store (or the channel) open until they are read."""
        ...

    async def query_usage(self, actor: Actor, principal_name: str | None = None,
                          server_name: str | None = None, tool: str | None = None,
                          since: datetime | None = None, until: datetime | None = None,
                          limit: int = DEFAULT_LIMIT) -> list[UsageView]:  # fmt: skip
        """Usage records matching every filter given, oldest first (`since` inclusive, `until`
        exclusive), at most `limit` (1 to MAX_LIMIT).

        Admins see everyone's. A manager sees everyone's but those of principals
        who outrank them (admins) and of principals no longer in the store (whose
        rank is unknown); records of unauthenticated requests belong to nobody
        and are shown. A user sees only their own. With no principal given the
        answer is silently narrowed to what the actor may see; naming a
        principal the actor may not see is PermissionDenied whether or not that
        principal exists. Servers and tools are matched by name, so records of
        removed ones stay queryable.
        """
        ...

    async def export_usage(self, actor: Actor, principal_name: str | None = None,
                           server_name: str | None = None, tool: str | None = None,
                           since: datetime | None = None, until: datetime | None = None, limit: int | None = None,
                           page_size: int = PAGE_SIZE) -> AsyncIterator[list[UsageView]]:  # fmt: skip
        """Like `query_usage`, for exports of any size (`limit` None: everything): authorizes and
        audits (`usage.export`) now, then returns the records lazily, in pages of at most
        `page_size`. Each page is one read of the store, resuming after the last record
        returned, so memory holds one page whatever the export's size. A record written
        meanwhile is included when it sorts after the point reached: an export is not a snapshot.
        """
        ...

    async def prune_usage(self, actor: Actor, before: datetime) -> int:
        """Delete usage records older than `before` (retention); return how many. Admins, on the
        sidecar's host only: the admin API has no such call, and `RemoteAdmin` refuses it."""
        ...
