"""The store contract: every persistent thing mcp-authz keeps, behind one Protocol.

Implementations: `sqlite.SqliteStore` (the embedded default, aiosqlite),
`postgres.PostgresStore` (asyncpg, for replicas) and `memory.MemoryStore`
(for tests). One contract suite, tests/store/, runs against all of them.

Rules every implementation keeps:
- Every mutation appends one change-log row per entity it changed, in the same
  transaction, with a strictly increasing `seq`. Sidecars follow the log to
  apply changes without a restart. `touch_keys` and audit writes are not
  changes: they never reach the log. Neither do usage records.
- Datetimes go in and come out timezone-aware, in UTC, to the microsecond.
- Secrets arrive already sealed (`Sealed`); the store never sees plaintext.
- A missing row named by a mutation raises `NotFound`; a duplicate raises
  `Conflict`; a row that cannot be decoded raises `CorruptRow`, naming the
  row but never its contents; a connection failure raises `StoreError`.
- Returned lists are sorted: teams and servers by name, principals by name,
  keys by created_at then key_id, overrides by server then principal_id,
  audit events by id, usage records by `at` then id (records arrive in batches,
  after the request, so id order is not time order).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from authz_server.models import (
    AuditEvent,
    Change,
    Entity,
    GatewayKey,
    McpServer,
    Override,
    OverrideStatus,
    Principal,
    Sealed,
    SealedRow,
    Snapshot,
    Team,
    UsageRecord,
)


class Store(Protocol):
    # --- lifecycle -----------------------------------------------------------
    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest version. Idempotent."""

    async def close(self) -> None: ...

    async def schema_version(self) -> int: ...

    # --- master key check (see crypto.cipher.Keyring.check_values) ------------
    async def get_key_checks(self) -> dict[int, Sealed]: ...

    async def put_key_checks(self, checks: dict[int, Sealed]) -> None:
        """Add or replace the check value of each version given; others stay."""

    async def remove_key_check(self, version: int) -> None:
        """Forget a retired version's check value (none: nothing happens)."""

    # --- re-encryption (mcp-authz master-key rotate) ------------------------------
    async def sealed_rows(self, entity: Entity, after: str = "", limit: int = 100) -> list[SealedRow]:
        """The sealed values of the servers (Entity.SERVER) or overrides (Entity.OVERRIDE) whose
        key comes after `after`, in key order (overrides: by principal id, then server), at most
        `limit`. Page through a table by passing the last row's key back as `after`."""

    async def reseal(self, rows: Sequence[tuple[SealedRow, SealedRow]]) -> int:
        """In one transaction, give each row (old, new) `new`'s sealed values, only where the row
        still holds exactly `old`'s: a row changed or deleted since it was read is left alone.
        Every other column stays. Each row replaced logs one change; returns how many were."""

    # --- teams ---------------------------------------------------------------
    async def ensure_team(self, name: str, at: datetime) -> Team:
        """Return the team, creating it (and logging a change) when missing."""

    async def get_team(self, name: str) -> Team | None: ...

    async def list_teams(self) -> list[Team]: ...

    async def set_team_disabled(self, name: str, disabled: bool) -> Team: ...

    # --- principals ------------------------------------------------------------
    async def add_principal(self, principal: Principal) -> Principal:
        """Conflict when the id or the name exists. The team must exist (NotFound otherwise)."""

    async def get_principal(self, principal_id: str) -> Principal | None: ...

    async def get_principal_by_name(self, name: str) -> Principal | None: ...

    async def list_principals(self, team: str | None = None) -> list[Principal]: ...

    async def set_principal_disabled(self, principal_id: str, disabled: bool) -> Principal: ...

    async def update_principal(self, principal: Principal) -> Principal:
        """Replace kind, team, roles and rate limit (not id, name, disabled or created_at).
        NotFound when the principal or the team is missing."""

    async def delete_principal(self, principal_id: str) -> None:
        """Delete the principal with its keys and overrides, each logged as a change. Audit events
        and usage records naming it stay. NotFound when missing."""

    # --- MCP servers -----------------------------------------------------------
    async def add_server(self, server: McpServer) -> McpServer: ...

    async def get_server(self, name: str) -> McpServer | None: ...

    async def list_servers(self) -> list[McpServer]: ...

    async def update_server(self, server: McpServer) -> McpServer:
        """Replace every field but name and created_at. NotFound when missing."""

    async def remove_server(self, name: str) -> None:
        """Delete the server and its overrides (each logged as a change)."""

    # --- gateway keys ------------------------------------------------------------
    async def add_key(self, key: GatewayKey) -> GatewayKey:
        """Conflict when the key id exists. The principal must exist (NotFound otherwise)."""

    async def get_key(self, key_id: str) -> GatewayKey | None: ...

    async def list_keys(self, principal_id: str | None = None) -> list[GatewayKey]: ...

    async def revoke_key(self, key_id: str, at: datetime) -> GatewayKey:
        """Set revoked_at to `at`, or keep an earlier revoked_at. NotFound when missing."""

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        """Record last_used_at per key id (unknown ids are ignored). Not a change."""

    # --- auth overrides ------------------------------------------------------------
    async def put_override(self, override: Override) -> Override:
        """Insert or replace the (principal, server) override. Principal and server must exist."""

    async def get_override(self, principal_id: str, server: str) -> Override | None: ...

    async def list_overrides(self, server: str | None = None, principal_id: str | None = None) -> list[Override]: ...

    async def delete_override(self, principal_id: str, server: str) -> None: ...

    async def set_override_status(
        self, principal_id: str, server: str, status: OverrideStatus, reason: str, at: datetime
    ) -> Override: ...

    # --- change log ---------------------------------------------------------------
    async def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        """Changes with seq > `seq`, oldest first, at most `limit`."""

    async def trim_changes(self, *, before: datetime | None = None, keep: int | None = None) -> int:
        """Delete change-log rows older than `before` and those beyond the newest `keep`; never the
        newest row (it carries the seq a snapshot reports). Return how many were deleted."""

    async def oldest_change_seq(self) -> int:
        """The oldest seq still in the change log (0 when empty): a follower whose seq is below
        it minus one has missed trimmed changes and must reload the snapshot."""

    async def wait_for_changes(self, timeout: float) -> None:
        """Return when new changes may exist (PostgreSQL: NOTIFY), or after `timeout` seconds."""

    async def snapshot(self) -> Snapshot:
        """Every team, principal, server, key and override, read consistently,
        with `seq` the newest change-log seq at that moment (0 when empty)."""

    # --- audit -----------------------------------------------------------------------
    async def append_audit(self, events: Sequence[AuditEvent]) -> None: ...

    async def query_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """Events matching every filter given (`action` may end in '*' for a prefix), in id
        order (append order), at most `limit`. `after_id` resumes a listing: only ids above it."""

    async def prune_audit(self, before: datetime) -> int:
        """Delete events older than `before`; return how many."""

    # --- usage (written in batches off the request path; not changes) ---------------------
    async def append_usage(self, records: Sequence[UsageRecord]) -> None: ...

    async def query_usage(
        self,
        *,
        principal_id: str | None = None,
        server: str | None = None,
        tool: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[UsageRecord]:
        """Records matching every filter given, oldest first (since inclusive, until exclusive)."""

    async def prune_usage(self, before: datetime) -> int:
        """Delete records with `at` older than `before`; return how many."""
