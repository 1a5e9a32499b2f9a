"""MemoryStore: the Store contract over dicts, for tests.

It keeps the same rules as the SQL stores (change log, Conflict and NotFound,
sort orders, UTC datetimes) and hands out copies, so a caller that mutates a
returned dict never changes what is stored. Nothing survives the process.
Not to be confused with the live tables Check reads (authz_server/live/), which
every sidecar keeps in memory whatever its store.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from authz_server.errors import Conflict, NotFound, StoreError
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
    override_key,
    split_override_key,
)
from authz_server.store.codec import check_usage, now, utc

_T = TypeVar("_T")
_EARLIEST = datetime.min.replace(tzinfo=UTC)


def _own(record: _T) -> _T:
    """A copy with datetimes in UTC and dicts copied (their values are immutable)."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        value = getattr(record, f.name)
        if isinstance(value, datetime):
            changes[f.name] = utc(value)
        elif isinstance(value, dict):
            changes[f.name] = dict(value)
    return dataclasses.replace(record, **changes)  # type: ignore[type-var]


class MemoryStore:
    """The Store in process memory. `memory://` in a store URL."""

    SCHEMA_VERSION = 4  # as the SQL migrations: 1 initial, 2 usage records, 3 upstream_url, 4 record uids

    def __init__(self) -> None:
        self._version = 0
        self._key_checks: dict[int, Sealed] = {}
        self._teams: dict[str, Team] = {}
        self._principals: dict[str, Principal] = {}
        self._servers: dict[str, McpServer] = {}
        self._keys: dict[str, GatewayKey] = {}
        self._overrides: dict[tuple[str, str], Override] = {}
        self._changes: list[Change] = []
        self._seq = 0  # the newest seq ever logged: trimming never makes one come back
        self._audit: list[AuditEvent] = []
        self._audit_ids = 0
        self._usage: list[UsageRecord] = []
        self._usage_ids = 0
        self._uids: set[str] = set()  # of every audit event and usage record appended
        self._changed = asyncio.Event()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------

    async def migrate(self) -> None:
        self._version = self.SCHEMA_VERSION

    async def close(self) -> None:
        self._closed = True

    async def schema_version(self) -> int:
        return self._version

    def _open(self) -> None:
        if self._closed:
            raise StoreError("The memory store is closed.")

    # --- master key check ------------------------------------------------------------

    async def get_key_checks(self) -> dict[int, Sealed]:
        self._open()
        return dict(sorted(self._key_checks.items()))

    async def put_key_checks(self, checks: dict[int, Sealed]) -> None:
        self._open()
        self._key_checks.update(checks)

    async def remove_key_check(self, version: int) -> None:
        self._open()
        self._key_checks.pop(version, None)

    # --- re-encryption -------------------------------------------------------------------

    def _sealed(self, entity: Entity) -> dict[tuple[str, ...], SealedRow]:
        """Every row of `entity` holding sealed values, by its sort key."""
        if entity is Entity.SERVER:
            return {(s.name,): SealedRow(entity, s.name, dict(s.shared_values), s.signing_secret)
                    for s in self._servers.values()}  # fmt: skip
        return {(o.principal_id, o.server): SealedRow(entity, override_key(o.principal_id, o.server), dict(o.values))
                for o in self._overrides.values()}  # fmt: skip

    @staticmethod
    def _sort_key(entity: Entity, key: str) -> tuple[str, ...]:
        return split_override_key(key) if entity is Entity.OVERRIDE else (key,)

    async def sealed_rows(self, entity: Entity, after: str = "", limit: int = 100) -> list[SealedRow]:
        self._open()
        start = self._sort_key(entity, after)
        rows = self._sealed(entity)
        return [rows[k] for k in sorted(rows) if k > start][: max(0, limit)]

    async def reseal(self, rows: Sequence[tuple[SealedRow, SealedRow]]) -> int:
        self._open()
        replaced = 0
        for old, new in rows:
            if self._sealed(old.entity).get(self._sort_key(old.entity, old.key)) != old:
                continue
            if old.entity is Entity.SERVER:
                server = self._servers[old.key]
                self._servers[old.key] = dataclasses.replace(
                    server, shared_values=dict(new.values), signing_secret=new.signing
                )
            else:
                pair = split_override_key(old.key)
                self._overrides[pair] = dataclasses.replace(self._overrides[pair], values=dict(new.values))
            self._log(old.entity, old.key)
            replaced += 1
        return replaced

    # --- teams -----------------------------------------------------------------

    async def ensure_team(self, name: str, at: datetime) -> Team:
        self._open()
        if name not in self._teams:
            self._teams[name] = Team(name=name, disabled=False, created_at=utc(at))
            self._log(Entity.TEAM, name)
        return self._teams[name]

    async def get_team(self, name: str) -> Team | None:
        self._open()
        return self._teams.get(name)

    async def list_teams(self) -> list[Team]:
        self._open()
        return sorted(self._teams.values(), key=lambda t: t.name)

    async def set_team_disabled(self, name: str, disabled: bool) -> Team:
        self._open()
        if name not in self._teams:
            raise NotFound(f"There is no team named {name!r}.")
        self._teams[name] = dataclasses.replace(self._teams[name], disabled=disabled)
        self._log(Entity.TEAM, name)
        return self._teams[name]

    # --- principals ----------------------------------------------------------------

    async def add_principal(self, principal: Principal) -> Principal:
        self._open()
        if principal.id in self._principals:
            raise Conflict(f"A principal with id {principal.id!r} exists already.")
        if any(p.name == principal.name for p in self._principals.values()):
            raise Conflict(f"A principal named {principal.name!r} exists already.")
        if principal.team not in self._teams:
            raise NotFound(f"There is no team named {principal.team!r}.")
        self._principals[principal.id] = _own(principal)
        self._log(Entity.PRINCIPAL, principal.id)
        return self._principals[principal.id]

    async def get_principal(self, principal_id: str) -> Principal | None:
        self._open()
        return self._principals.get(principal_id)

    async def get_principal_by_name(self, name: str) -> Principal | None:
        self._open()
        return next((p for p in self._principals.values() if p.name == name), None)

    async def list_principals(self, team: str | None = None) -> list[Principal]:
        self._open()
        found = [p for p in self._principals.values() if team is None or p.team == team]
        return sorted(found, key=lambda p: p.name)

    async def set_principal_disabled(self, principal_id: str, disabled: bool) -> Principal:
        self._open()
        if principal_id not in self._principals:
            raise NotFound(f"There is no principal with id {principal_id!r}.")
        self._principals[principal_id] = dataclasses.replace(self._principals[principal_id], disabled=disabled)
        self._log(Entity.PRINCIPAL, principal_id)
        return self._principals[principal_id]

    async def update_principal(self, principal: Principal) -> Principal:
        self._open()
        existing = self._principals.get(principal.id)
        if existing is None:
            raise NotFound(f"There is no principal with id {principal.id!r}.")
        if principal.team not in self._teams:
            raise NotFound(f"There is no team named {principal.team!r}.")
        self._principals[principal.id] = dataclasses.replace(
            existing, kind=principal.kind, team=principal.team, roles=principal.roles,
            rate_limit_per_minute=principal.rate_limit_per_minute,
        )  # fmt: skip
        self._log(Entity.PRINCIPAL, principal.id)
        return self._principals[principal.id]

    async def delete_principal(self, principal_id: str) -> None:
        self._open()
        if principal_id not in self._principals:
            raise NotFound(f"There is no principal with id {principal_id!r}.")
        for key_id in sorted(k for k, key in self._keys.items() if key.principal_id == principal_id):
            del self._keys[key_id]
            self._log(Entity.KEY, key_id)
        for row in sorted(r for r in self._overrides if r[0] == principal_id):
            del self._overrides[row]
            self._log(Entity.OVERRIDE, override_key(*row))
        del self._principals[principal_id]
        self._log(Entity.PRINCIPAL, principal_id)

    # --- MCP servers -------------------------------------------------------------------

    async def add_server(self, server: McpServer) -> McpServer:
        self._open()
        if server.name in self._servers:
            raise Conflict(f"A server named {server.name!r} exists already.")
        self._servers[server.name] = _own(server)
        self._log(Entity.SERVER, server.name)
        return _own(self._servers[server.name])

    async def get_server(self, name: str) -> McpServer | None:
        self._open()
        server = self._servers.get(name)
        return None if server is None else _own(server)

    async def list_servers(self) -> list[McpServer]:
        self._open()
        return [_own(s) for s in sorted(self._servers.values(), key=lambda s: s.name)]

    async def update_server(self, server: McpServer) -> McpServer:
        self._open()
        existing = self._servers.get(server.name)
        if existing is None:
            raise NotFound(f"There is no server named {server.name!r}.")
        self._servers[server.name] = _own(dataclasses.replace(server, created_at=existing.created_at))
        self._log(Entity.SERVER, server.name)
        return _own(self._servers[server.name])

    async def remove_server(self, name: str) -> None:
        self._open()
        if name not in self._servers:
            raise NotFound(f"There is no server named {name!r}.")
        for pid in sorted(p for p, s in self._overrides if s == name):
            del self._overrides[(pid, name)]
            self._log(Entity.OVERRIDE, override_key(pid, name))
        del self._servers[name]
        self._log(Entity.SERVER, name)

    # --- gateway keys ---------------------------------------------------------------------

    async def add_key(self, key: GatewayKey) -> GatewayKey:
        self._open()
        if key.key_id in self._keys:
            raise Conflict(f"A gateway key with id {key.key_id!r} exists already.")
        if key.principal_id not in self._principals:
            raise NotFound(f"There is no principal with id {key.principal_id!r}.")
        self._keys[key.key_id] = _own(key)
        self._log(Entity.KEY, key.key_id)
        return self._keys[key.key_id]

    async def get_key(self, key_id: str) -> GatewayKey | None:
        self._open()
        return self._keys.get(key_id)

    async def list_keys(self, principal_id: str | None = None) -> list[GatewayKey]:
        self._open()
        found = [k for k in self._keys.values() if principal_id is None or k.principal_id == principal_id]
        # Keys without created_at first, as SQL's NULLS FIRST puts them.
        return sorted(found, key=lambda k: (k.created_at is not None, k.created_at or _EARLIEST, k.key_id))

    async def revoke_key(self, key_id: str, at: datetime) -> GatewayKey:
        self._open()
        key = self._keys.get(key_id)
        if key is None:
            raise NotFound(f"There is no gateway key with id {key_id!r}.")
        at = utc(at)
        revoked_at = at if key.revoked_at is None or at < key.revoked_at else key.revoked_at
        self._keys[key_id] = dataclasses.replace(key, revoked_at=revoked_at)
        self._log(Entity.KEY, key_id)
        return self._keys[key_id]

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        self._open()
        for key_id, at in last_used.items():
            key = self._keys.get(key_id)
            at = utc(at)
            # Replicas flush on their own clocks: never move last_used_at backwards.
            if key is not None and (key.last_used_at is None or key.last_used_at < at):
                self._keys[key_id] = dataclasses.replace(key, last_used_at=at)

    # --- auth overrides -----------------------------------------------------------------------

    async def put_override(self, override: Override) -> Override:
        self._open()
        if override.principal_id not in self._principals:
            raise NotFound(f"There is no principal with id {override.principal_id!r}.")
        if override.server not in self._servers:
            raise NotFound(f"There is no server named {override.server!r}.")
        row = (override.principal_id, override.server)
        self._overrides[row] = _own(override)
        self._log(Entity.OVERRIDE, override_key(*row))
        return _own(self._overrides[row])

    async def get_override(self, principal_id: str, server: str) -> Override | None:
        self._open()
        found = self._overrides.get((principal_id, server))
        return None if found is None else _own(found)

    async def list_overrides(self, server: str | None = None, principal_id: str | None = None) -> list[Override]:
        self._open()
        found = [
            o
            for o in self._overrides.values()
            if (server is None or o.server == server) and (principal_id is None or o.principal_id == principal_id)
        ]
        return [_own(o) for o in sorted(found, key=lambda o: (o.server, o.principal_id))]

    async def delete_override(self, principal_id: str, server: str) -> None:
        self._open()
        if self._overrides.pop((principal_id, server), None) is None:
            raise NotFound(f"There is no override for principal {principal_id!r} on server {server!r}.")
        self._log(Entity.OVERRIDE, override_key(principal_id, server))

    async def set_override_status(
        self, principal_id: str, server: str, status: OverrideStatus, reason: str, at: datetime
    ) -> Override:
        self._open()
        row = (principal_id, server)
        existing = self._overrides.get(row)
        if existing is None:
            raise NotFound(f"There is no override for principal {principal_id!r} on server {server!r}.")
        self._overrides[row] = dataclasses.replace(
            existing, status=OverrideStatus(status), status_reason=reason, status_at=utc(at)
        )
        self._log(Entity.OVERRIDE, override_key(*row))
        return _own(self._overrides[row])

    # --- change log ---------------------------------------------------------------------------------

    def _log(self, entity: Entity, key: str) -> None:
        self._seq += 1
        self._changes.append(Change(seq=self._seq, entity=entity, entity_key=key, at=now()))
        # Wake every current waiter; later waiters wait on a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()

    async def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        self._open()
        if limit <= 0:
            return []
        return [c for c in self._changes if c.seq > seq][:limit]

    async def trim_changes(self, *, before: datetime | None = None, keep: int | None = None) -> int:
        self._open()
        if before is None and keep is None:
            return 0
        cut = None if before is None else utc(before)
        # The newest row stays; past it, a row goes when it is older than `before` or beyond `keep`.
        newest_first = list(reversed(self._changes))
        kept = [c for i, c in enumerate(newest_first)
                if i == 0 or not ((cut is not None and c.at < cut) or (keep is not None and i >= max(1, keep)))]  # fmt: skip
        trimmed = len(self._changes) - len(kept)
        self._changes = kept[::-1]
        return trimmed

    async def oldest_change_seq(self) -> int:
        self._open()
        return self._changes[0].seq if self._changes else 0

    async def wait_for_changes(self, timeout: float) -> None:
        self._open()
        try:
            await asyncio.wait_for(self._changed.wait(), max(0.0, timeout))
        except TimeoutError:
            pass

    async def snapshot(self) -> Snapshot:
        self._open()
        return Snapshot(
            seq=self._changes[-1].seq if self._changes else 0,
            teams=tuple(await self.list_teams()),
            principals=tuple(await self.list_principals()),
            servers=tuple(await self.list_servers()),
            keys=tuple(await self.list_keys()),
            overrides=tuple(await self.list_overrides()),
        )

    # --- audit ------------------------------------------------------------------------------------------

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        self._open()
        for event in events:
            if event.uid in self._uids:
                continue  # stored already (a retried batch), as the SQL stores' APPEND_ONCE
            self._uids.add(event.uid)
            self._audit_ids += 1
            self._audit.append(dataclasses.replace(_own(event), id=self._audit_ids))

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
        self._open()
        since = None if since is None else utc(since)
        until = None if until is None else utc(until)

        def matches(e: AuditEvent) -> bool:
            if action is not None:
                if action.endswith("*") and not e.action.startswith(action[:-1]):
                    return False
                if not action.endswith("*") and e.action != action:
                    return False
            return (
                (actor is None or e.actor == actor)
                and (target is None or e.target == target)
                and (since is None or e.at >= since)
                and (until is None or e.at < until)
                and (after_id is None or (e.id or 0) > after_id)
            )

        if limit <= 0:
            return []
        return [_own(e) for e in self._audit if matches(e)][:limit]

    async def prune_audit(self, before: datetime) -> int:
        self._open()
        before = utc(before)
        kept = [e for e in self._audit if e.at >= before]
        pruned = len(self._audit) - len(kept)
        self._audit = kept
        return pruned

    # --- usage ------------------------------------------------------------------------------------------

    async def append_usage(self, records: Sequence[UsageRecord]) -> None:
        self._open()
        for record in check_usage(records):  # all checked before any is kept, as in one transaction
            if record.uid in self._uids:
                continue
            self._uids.add(record.uid)
            self._usage_ids += 1
            self._usage.append(dataclasses.replace(record, id=self._usage_ids))

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
        self._open()
        since = None if since is None else utc(since)
        until = None if until is None else utc(until)
        if limit <= 0:
            return []
        found = [
            r
            for r in self._usage
            if (principal_id is None or r.principal_id == principal_id)
            and (server is None or r.server == server)
            and (tool is None or r.tool == tool)
            and (since is None or r.at >= since)
            and (until is None or r.at < until)
        ]
        found.sort(key=lambda r: (r.at, r.id))  # as the SQL stores: ORDER BY at, id
        return found[:limit]  # records hold no dicts: sharing them is safe

    async def prune_usage(self, before: datetime) -> int:
        self._open()
        before = utc(before)
        kept = [r for r in self._usage if r.at >= before]
        pruned = len(self._usage) - len(kept)
        self._usage = kept
        return pruned
