"""The Store contract written once in SQL, for SQLite and PostgreSQL alike.

`SqlStore` holds every query and every rule of the contract (existence checks,
change-log rows, sort orders). A backend supplies transactions (`_read`,
`_write`), the datetime encoding, and the few statements that differ.
Queries use `?` placeholders; the PostgreSQL transaction renumbers them.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from importlib import resources
from typing import Any, ClassVar, Protocol, TypeVar

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
from authz_server.store.codec import (
    AUDIT_COLUMNS,
    KEY_COLUMNS,
    OVERRIDE_COLUMNS,
    PRINCIPAL_COLUMNS,
    SEALED_SELECT,
    SERVER_COLUMNS,
    TEAM_COLUMNS,
    USAGE_COLUMNS,
    Row,
    RowCodec,
    TimeCodec,
    check_usage,
    encode_sealed,
    encode_sealed_map,
    now,
    utc,
)

_T = TypeVar("_T")
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class Tx(Protocol):
    """One open transaction. `changed` is set once a change-log row is written."""

    changed: bool

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    def fetch_chunks(self, sql: str, *args: Any, size: int = 1000) -> AsyncIterator[list[Row]]:
        """The rows `size` at a time, so a big table never sits in memory as rows all at once."""
        ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; return the number of rows it touched."""

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None: ...

    async def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Append rows to an append-only table (audit_events, usage_records), as few statements as the
        driver allows; a row whose `uid` is stored already is skipped (`append_once`)."""
        ...

    async def script(self, sql: str) -> None:
        """Run several statements (a migration file)."""


def load_migrations(dialect: str) -> list[tuple[int, str]]:
    """The numbered migration files for a dialect, oldest first."""
    folder = resources.files("authz_server.store") / "migrations" / dialect
    found: list[tuple[int, str]] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    if [v for v, _ in found] != list(range(1, len(found) + 1)):
        raise StoreError(f"The {dialect} migrations are not numbered 0001, 0002, … without gaps.")
    return found


async def _update(tx: Tx, table: str, columns: Sequence[str], values: dict[str, Any], key: str, at: Any) -> int:
    """UPDATE `columns` (from `values`) of the row of `table` whose `key` column is `at`; rows changed."""
    return await tx.execute(
        f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in columns)} WHERE {key} = ?", *(values[c] for c in columns), at
    )


def append_once(columns: Sequence[str]) -> str:
    """The append-only tables keep one row per record uid (migration 0004): a write-behind batch
    written again after an outage, or replayed from the spool, adds nothing it added before."""
    return "ON CONFLICT (uid) DO NOTHING" if "uid" in columns else ""


def insert_sql(table: str, columns: Sequence[str]) -> str:
    """One row's INSERT, with `?` placeholders."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _prefix_upper(prefix: str) -> str | None:
    """The least string above every string starting with `prefix` (code point order)."""
    successor = ord(prefix[-1]) + 1
    if 0xD800 <= successor <= 0xDFFF:  # surrogates cannot be stored: skip past them
        successor = 0xE000
    return None if successor > 0x10FFFF else prefix[:-1] + chr(successor)


class SqlStore(abc.ABC):
    """The Store Protocol over a SQL backend; see store/base.py for the contract."""

    dialect: ClassVar[str]  # names the folder under migrations/

    def __init__(self, times: TimeCodec) -> None:
        self._codec = RowCodec(times)

    # --- what a backend provides -------------------------------------------------

    @abc.abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Tx]:
        """A read-only transaction that sees one consistent state."""

    @abc.abstractmethod
    def _write(self, *, serial: bool = True) -> AbstractAsyncContextManager[Tx]:
        """A read-write transaction. `serial`: writers are serialised, so change-log
        seq order is commit order (needed by anything that logs changes)."""

    @abc.abstractmethod
    async def _bootstrap(self, tx: Tx) -> None:
        """Create the schema_migrations table (and schema) when missing."""

    @abc.abstractmethod
    async def _has_table(self, tx: Tx, name: str) -> bool: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def wait_for_changes(self, timeout: float) -> None: ...

    # --- lifecycle -------------------------------------------------------------------

    async def migrate(self) -> None:
        migrations = load_migrations(self.dialect)
        latest = migrations[-1][0] if migrations else 0
        for version, script in migrations:
            # One transaction per file; the version is re-read under the writer lock,
            # so two processes migrating at once apply each file once.
            async with self._write() as tx:
                await self._bootstrap(tx)
                current = await self._version(tx)
                if current > latest:
                    raise StoreError(
                        f"The store's schema (version {current}) is newer than this mcp-authz knows "
                        f"(version {latest}). Upgrade mcp-authz."
                    )
                if version <= current:
                    continue
                await tx.script(script)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    version,
                    self._codec.time(now()),
                )

    async def schema_version(self) -> int:
        async with self._read() as tx:
            if not await self._has_table(tx, "schema_migrations"):
                return 0
            return await self._version(tx)

    async def _version(self, tx: Tx) -> int:
        row = await tx.fetchrow("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
        return int(row["v"]) if row else 0

    # --- master key check ----------------------------------------------------------------

    async def get_key_checks(self) -> dict[int, Sealed]:
        async with self._read() as tx:
            rows = await tx.fetch("SELECT version, sealed FROM key_checks ORDER BY version")
        return dict(self._codec.decode_key_check(r) for r in rows)

    async def put_key_checks(self, checks: dict[int, Sealed]) -> None:
        async with self._write(serial=False) as tx:
            await tx.executemany(
                "INSERT INTO key_checks (version, sealed) VALUES (?, ?) "
                "ON CONFLICT (version) DO UPDATE SET sealed = excluded.sealed",
                [(version, encode_sealed(sealed)) for version, sealed in checks.items()],
            )

    async def remove_key_check(self, version: int) -> None:
        async with self._write(serial=False) as tx:
            await tx.execute("DELETE FROM key_checks WHERE version = ?", version)

    # --- re-encryption -------------------------------------------------------------------------

    _SEALED_WHERE: ClassVar[dict[Entity, tuple[str, str]]] = {
        # (after a key, at a key); an override's key is "principal_id/server" (ids hold no '/').
        Entity.SERVER: ("name > ? ORDER BY name", "name = ?"),
        Entity.OVERRIDE: (
            "(principal_id > ? OR (principal_id = ? AND server > ?)) ORDER BY principal_id, server",
            "principal_id = ? AND server = ?",
        ),
    }

    @staticmethod
    def _sealed_key(entity: Entity, key: str) -> tuple[str, ...]:
        return split_override_key(key) if entity is Entity.OVERRIDE else (key,)

    async def sealed_rows(self, entity: Entity, after: str = "", limit: int = 100) -> list[SealedRow]:
        if limit <= 0:
            return []
        after_args = self._sealed_key(entity, after)
        if entity is Entity.OVERRIDE:
            after_args = (after_args[0], *after_args)
        async with self._read() as tx:
            rows = await tx.fetch(
                f"{SEALED_SELECT[entity]} WHERE {self._SEALED_WHERE[entity][0]} LIMIT ?", *after_args, limit
            )
        return [self._codec.decode_sealed_row(entity, r) for r in rows]

    async def reseal(self, rows: Sequence[tuple[SealedRow, SealedRow]]) -> int:
        replaced = 0
        async with self._write() as tx:  # serial: no other writer changes a row between the read and the write
            for old, new in rows:
                where = self._SEALED_WHERE[old.entity][1]
                args = self._sealed_key(old.entity, old.key)
                row = await tx.fetchrow(f"{SEALED_SELECT[old.entity]} WHERE {where}", *args)
                if row is None or self._codec.decode_sealed_row(old.entity, row) != old:
                    continue
                if old.entity is Entity.SERVER:
                    await tx.execute(f"UPDATE servers SET shared_values = ?, signing_secret = ? WHERE {where}",
                                     encode_sealed_map(new.values), encode_sealed(new.signing), *args)  # fmt: skip
                else:
                    await tx.execute(f"UPDATE overrides SET sealed_values = ? WHERE {where}",
                                     encode_sealed_map(new.values), *args)  # fmt: skip
                await self._log(tx, old.entity, old.key)
                replaced += 1
        return replaced

    # --- teams -----------------------------------------------------------------------------

    async def ensure_team(self, name: str, at: datetime) -> Team:
        async with self._write() as tx:
            team = await self._team(tx, name)
            if team is None:
                await tx.execute(insert_sql("teams", TEAM_COLUMNS), *self._codec.encode_team(Team(name, False, at)))
                await self._log(tx, Entity.TEAM, name)
                team = await self._must(self._team(tx, name))
        return team

    async def get_team(self, name: str) -> Team | None:
        async with self._read() as tx:
            return await self._team(tx, name)

    async def list_teams(self) -> list[Team]:
        async with self._read() as tx:
            rows = await tx.fetch("SELECT * FROM teams ORDER BY name")
        return [self._codec.decode_team(r) for r in rows]

    async def set_team_disabled(self, name: str, disabled: bool) -> Team:
        async with self._write() as tx:
            if not await tx.execute("UPDATE teams SET disabled = ? WHERE name = ?", disabled, name):
                raise NotFound(f"There is no team named {name!r}.")
            await self._log(tx, Entity.TEAM, name)
            return await self._must(self._team(tx, name))

    async def _team(self, tx: Tx, name: str) -> Team | None:
        row = await tx.fetchrow("SELECT * FROM teams WHERE name = ?", name)
        return None if row is None else self._codec.decode_team(row)

    # --- principals -----------------------------------------------------------------------

    async def add_principal(self, principal: Principal) -> Principal:
        async with self._write() as tx:
            if await tx.fetchrow("SELECT 1 FROM principals WHERE id = ?", principal.id):
                raise Conflict(f"A principal with id {principal.id!r} exists already.")
            if await tx.fetchrow("SELECT 1 FROM principals WHERE name = ?", principal.name):
                raise Conflict(f"A principal named {principal.name!r} exists already.")
            if not await tx.fetchrow("SELECT 1 FROM teams WHERE name = ?", principal.team):
                raise NotFound(f"There is no team named {principal.team!r}.")
            await tx.execute(insert_sql("principals", PRINCIPAL_COLUMNS), *self._codec.encode_principal(principal))
            await self._log(tx, Entity.PRINCIPAL, principal.id)
            return await self._must(self._principal(tx, principal.id))

    async def get_principal(self, principal_id: str) -> Principal | None:
        async with self._read() as tx:
            return await self._principal(tx, principal_id)

    async def get_principal_by_name(self, name: str) -> Principal | None:
        async with self._read() as tx:
            row = await tx.fetchrow("SELECT * FROM principals WHERE name = ?", name)
        return None if row is None else self._codec.decode_principal(row)

    async def list_principals(self, team: str | None = None) -> list[Principal]:
        async with self._read() as tx:
            if team is None:
                rows = await tx.fetch("SELECT * FROM principals ORDER BY name")
            else:
                rows = await tx.fetch("SELECT * FROM principals WHERE team = ? ORDER BY name", team)
        return [self._codec.decode_principal(r) for r in rows]

    async def set_principal_disabled(self, principal_id: str, disabled: bool) -> Principal:
        async with self._write() as tx:
            if not await tx.execute("UPDATE principals SET disabled = ? WHERE id = ?", disabled, principal_id):
                raise NotFound(f"There is no principal with id {principal_id!r}.")
            await self._log(tx, Entity.PRINCIPAL, principal_id)
            return await self._must(self._principal(tx, principal_id))

    async def update_principal(self, principal: Principal) -> Principal:
        async with self._write() as tx:
            if not await tx.fetchrow("SELECT 1 FROM teams WHERE name = ?", principal.team):
                raise NotFound(f"There is no team named {principal.team!r}.")
            values = dict(zip(PRINCIPAL_COLUMNS, self._codec.encode_principal(principal), strict=True))
            columns = ("kind", "team", "roles", "rate_limit_per_minute")
            if not await _update(tx, "principals", columns, values, "id", principal.id):
                raise NotFound(f"There is no principal with id {principal.id!r}.")
            await self._log(tx, Entity.PRINCIPAL, principal.id)
            return await self._must(self._principal(tx, principal.id))

    async def delete_principal(self, principal_id: str) -> None:
        async with self._write() as tx:
            if not await tx.fetchrow("SELECT 1 FROM principals WHERE id = ?", principal_id):
                raise NotFound(f"There is no principal with id {principal_id!r}.")
            keys = await tx.fetch("SELECT key_id FROM gateway_keys WHERE principal_id = ? ORDER BY key_id", principal_id)
            servers = await tx.fetch("SELECT server FROM overrides WHERE principal_id = ? ORDER BY server", principal_id)
            await tx.execute("DELETE FROM gateway_keys WHERE principal_id = ?", principal_id)
            await tx.execute("DELETE FROM overrides WHERE principal_id = ?", principal_id)
            await tx.execute("DELETE FROM principals WHERE id = ?", principal_id)
            for row in keys:
                await self._log(tx, Entity.KEY, row["key_id"])
            for row in servers:
                await self._log(tx, Entity.OVERRIDE, override_key(principal_id, row["server"]))
            await self._log(tx, Entity.PRINCIPAL, principal_id)

    async def _principal(self, tx: Tx, principal_id: str) -> Principal | None:
        row = await tx.fetchrow("SELECT * FROM principals WHERE id = ?", principal_id)
        return None if row is None else self._codec.decode_principal(row)

    # --- MCP servers ------------------------------------------------------------------------

    async def add_server(self, server: McpServer) -> McpServer:
        async with self._write() as tx:
            if await tx.fetchrow("SELECT 1 FROM servers WHERE name = ?", server.name):
                raise Conflict(f"A server named {server.name!r} exists already.")
            await tx.execute(insert_sql("servers", SERVER_COLUMNS), *self._codec.encode_server(server))
            await self._log(tx, Entity.SERVER, server.name)
            return await self._must(self._server(tx, server.name))

    async def get_server(self, name: str) -> McpServer | None:
        async with self._read() as tx:
            return await self._server(tx, name)

    async def list_servers(self) -> list[McpServer]:
        async with self._read() as tx:
            rows = await tx.fetch("SELECT * FROM servers ORDER BY name")
        return [self._codec.decode_server(r) for r in rows]

    async def update_server(self, server: McpServer) -> McpServer:
        # Every column but the key (name) and created_at, in SERVER_COLUMNS order.
        values = dict(zip(SERVER_COLUMNS, self._codec.encode_server(server), strict=True))
        columns = [c for c in SERVER_COLUMNS if c not in ("name", "created_at")]
        async with self._write() as tx:
            if not await _update(tx, "servers", columns, values, "name", server.name):
                raise NotFound(f"There is no server named {server.name!r}.")
            await self._log(tx, Entity.SERVER, server.name)
            return await self._must(self._server(tx, server.name))

    async def remove_server(self, name: str) -> None:
        async with self._write() as tx:
            if not await tx.fetchrow("SELECT 1 FROM servers WHERE name = ?", name):
                raise NotFound(f"There is no server named {name!r}.")
            rows = await tx.fetch("SELECT principal_id FROM overrides WHERE server = ? ORDER BY principal_id", name)
            await tx.execute("DELETE FROM overrides WHERE server = ?", name)
            await tx.execute("DELETE FROM servers WHERE name = ?", name)
            for row in rows:
                await self._log(tx, Entity.OVERRIDE, override_key(row["principal_id"], name))
            await self._log(tx, Entity.SERVER, name)

    async def _server(self, tx: Tx, name: str) -> McpServer | None:
        row = await tx.fetchrow("SELECT * FROM servers WHERE name = ?", name)
        return None if row is None else self._codec.decode_server(row)

    # --- gateway keys -------------------------------------------------------------------------

    async def add_key(self, key: GatewayKey) -> GatewayKey:
        async with self._write() as tx:
            if await tx.fetchrow("SELECT 1 FROM gateway_keys WHERE key_id = ?", key.key_id):
                raise Conflict(f"A gateway key with id {key.key_id!r} exists already.")
            if not await tx.fetchrow("SELECT 1 FROM principals WHERE id = ?", key.principal_id):
                raise NotFound(f"There is no principal with id {key.principal_id!r}.")
            await tx.execute(insert_sql("gateway_keys", KEY_COLUMNS), *self._codec.encode_key(key))
            await self._log(tx, Entity.KEY, key.key_id)
            return await self._must(self._key(tx, key.key_id))

    async def get_key(self, key_id: str) -> GatewayKey | None:
        async with self._read() as tx:
            return await self._key(tx, key_id)

    async def list_keys(self, principal_id: str | None = None) -> list[GatewayKey]:
        order = "ORDER BY created_at NULLS FIRST, key_id"
        async with self._read() as tx:
            if principal_id is None:
                rows = await tx.fetch(f"SELECT * FROM gateway_keys {order}")
            else:
                rows = await tx.fetch(f"SELECT * FROM gateway_keys WHERE principal_id = ? {order}", principal_id)
        return [self._codec.decode_key(r) for r in rows]

    async def revoke_key(self, key_id: str, at: datetime) -> GatewayKey:
        at = utc(at)
        async with self._write() as tx:
            key = await self._key(tx, key_id)
            if key is None:
                raise NotFound(f"There is no gateway key with id {key_id!r}.")
            revoked_at = at if key.revoked_at is None or at < key.revoked_at else key.revoked_at
            await tx.execute(
                "UPDATE gateway_keys SET revoked_at = ? WHERE key_id = ?", self._codec.time(revoked_at), key_id
            )
            await self._log(tx, Entity.KEY, key_id)
            return await self._must(self._key(tx, key_id))

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        if not last_used:
            return
        # Replicas flush on their own clocks: never move last_used_at backwards.
        args = [(self._codec.time(at), key_id, self._codec.time(at)) for key_id, at in last_used.items()]
        async with self._write(serial=False) as tx:
            await tx.executemany(
                "UPDATE gateway_keys SET last_used_at = ? WHERE key_id = ? "
                "AND (last_used_at IS NULL OR last_used_at < ?)",
                args,
            )

    async def _key(self, tx: Tx, key_id: str) -> GatewayKey | None:
        row = await tx.fetchrow("SELECT * FROM gateway_keys WHERE key_id = ?", key_id)
        return None if row is None else self._codec.decode_key(row)

    # --- auth overrides ---------------------------------------------------------------------------

    async def put_override(self, override: Override) -> Override:
        columns = OVERRIDE_COLUMNS
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in ("principal_id", "server"))
        async with self._write() as tx:
            if not await tx.fetchrow("SELECT 1 FROM principals WHERE id = ?", override.principal_id):
                raise NotFound(f"There is no principal with id {override.principal_id!r}.")
            if not await tx.fetchrow("SELECT 1 FROM servers WHERE name = ?", override.server):
                raise NotFound(f"There is no server named {override.server!r}.")
            await tx.execute(
                f"{insert_sql('overrides', columns)} ON CONFLICT (principal_id, server) DO UPDATE SET {updates}",
                *self._codec.encode_override(override),
            )
            await self._log(tx, Entity.OVERRIDE, override_key(override.principal_id, override.server))
            return await self._must(self._override(tx, override.principal_id, override.server))

    async def get_override(self, principal_id: str, server: str) -> Override | None:
        async with self._read() as tx:
            return await self._override(tx, principal_id, server)

    async def list_overrides(self, server: str | None = None, principal_id: str | None = None) -> list[Override]:
        where, args = [], []
        if server is not None:
            where.append("server = ?")
            args.append(server)
        if principal_id is not None:
            where.append("principal_id = ?")
            args.append(principal_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._read() as tx:
            rows = await tx.fetch(f"SELECT * FROM overrides {clause} ORDER BY server, principal_id", *args)
        return [self._codec.decode_override(r) for r in rows]

    async def delete_override(self, principal_id: str, server: str) -> None:
        async with self._write() as tx:
            deleted = await tx.execute(
                "DELETE FROM overrides WHERE principal_id = ? AND server = ?", principal_id, server
            )
            if not deleted:
                raise NotFound(f"There is no override for principal {principal_id!r} on server {server!r}.")
            await self._log(tx, Entity.OVERRIDE, override_key(principal_id, server))

    async def set_override_status(
        self, principal_id: str, server: str, status: OverrideStatus, reason: str, at: datetime
    ) -> Override:
        async with self._write() as tx:
            changed = await tx.execute(
                "UPDATE overrides SET status = ?, status_reason = ?, status_at = ? WHERE principal_id = ? AND server = ?",
                OverrideStatus(status).value,
                reason,
                self._codec.time(at),
                principal_id,
                server,
            )
            if not changed:
                raise NotFound(f"There is no override for principal {principal_id!r} on server {server!r}.")
            await self._log(tx, Entity.OVERRIDE, override_key(principal_id, server))
            return await self._must(self._override(tx, principal_id, server))

    async def _override(self, tx: Tx, principal_id: str, server: str) -> Override | None:
        row = await tx.fetchrow("SELECT * FROM overrides WHERE principal_id = ? AND server = ?", principal_id, server)
        return None if row is None else self._codec.decode_override(row)

    # --- change log ---------------------------------------------------------------------------------

    async def _log(self, tx: Tx, entity: Entity, key: str) -> None:
        await tx.execute(
            "INSERT INTO change_log (entity, entity_key, at) VALUES (?, ?, ?)",
            entity.value,
            key,
            self._codec.time(now()),
        )
        tx.changed = True

    async def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        if limit <= 0:
            return []
        async with self._read() as tx:
            rows = await tx.fetch("SELECT * FROM change_log WHERE seq > ? ORDER BY seq LIMIT ?", seq, limit)
        return [self._codec.decode_change(r) for r in rows]

    async def trim_changes(self, *, before: datetime | None = None, keep: int | None = None) -> int:
        reasons: list[str] = []
        args: list[Any] = []
        if before is not None:
            reasons.append("at < ?")
            args.append(self._codec.time(before))
        if keep is not None:
            # At or below the seq of the first row past the newest `keep` (none: nothing to cut).
            reasons.append("seq <= (SELECT seq FROM change_log ORDER BY seq DESC LIMIT 1 OFFSET ?)")
            args.append(max(1, keep))
        if not reasons:
            return 0
        async with self._write(serial=False) as tx:
            return await tx.execute(
                f"DELETE FROM change_log WHERE seq < (SELECT MAX(seq) FROM change_log) AND ({' OR '.join(reasons)})",
                *args,
            )

    async def oldest_change_seq(self) -> int:
        async with self._read() as tx:
            row = await tx.fetchrow("SELECT COALESCE(MIN(seq), 0) AS seq FROM change_log")
        return int(row["seq"]) if row else 0

    async def snapshot(self) -> Snapshot:
        codec = self._codec

        async def table(sql: str, decode: Callable[[Row], _T]) -> tuple[_T, ...]:
            # Decoded chunk by chunk: each chunk's rows are freed before the next is read, which keeps
            # the start-up peak (and the fragmentation it leaves behind) down at 100k rows a table.
            out: list[_T] = []
            async for rows in tx.fetch_chunks(sql):
                out.extend(decode(r) for r in rows)
            return tuple(out)

        async with self._read() as tx:
            row = await tx.fetchrow("SELECT COALESCE(MAX(seq), 0) AS seq FROM change_log")
            seq = int(row["seq"]) if row else 0
            return Snapshot(
                seq=seq,
                teams=await table("SELECT * FROM teams ORDER BY name", codec.decode_team),
                principals=await table("SELECT * FROM principals ORDER BY name", codec.decode_principal),
                servers=await table("SELECT * FROM servers ORDER BY name", codec.decode_server),
                keys=await table("SELECT * FROM gateway_keys ORDER BY created_at NULLS FIRST, key_id", codec.decode_key),
                overrides=await table("SELECT * FROM overrides ORDER BY server, principal_id", codec.decode_override),
            )

    # --- audit ------------------------------------------------------------------------------------------

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        rows = [self._codec.encode_audit(e) for e in events]
        async with self._write(serial=False) as tx:
            await tx.insert_many("audit_events", AUDIT_COLUMNS, rows)

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
        if limit <= 0:
            return []
        where: list[str] = []
        args: list[Any] = []
        if actor is not None:
            where.append("actor = ?")
            args.append(actor)
        if action is not None and action.endswith("*"):
            prefix = action[:-1]
            upper = _prefix_upper(prefix) if prefix else None
            if upper is not None:
                # A range rather than LIKE: the action index serves it, and no
                # character in the prefix is a wildcard or case-folded.
                where.append("action >= ? AND action < ?")
                args += [prefix, upper]
            elif prefix:
                where.append("substr(action, 1, ?) = ?")
                args += [len(prefix), prefix]
        elif action is not None:
            where.append("action = ?")
            args.append(action)
        if target is not None:
            where.append("target = ?")
            args.append(target)
        if since is not None:
            where.append("at >= ?")
            args.append(self._codec.time(since))
        if until is not None:
            where.append("at < ?")
            args.append(self._codec.time(until))
        if after_id is not None:
            where.append("id > ?")
            args.append(after_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._read() as tx:
            rows = await tx.fetch(f"SELECT * FROM audit_events {clause} ORDER BY id LIMIT ?", *args, limit)
        return [self._codec.decode_audit(r) for r in rows]

    async def prune_audit(self, before: datetime) -> int:
        async with self._write(serial=False) as tx:
            return await tx.execute("DELETE FROM audit_events WHERE at < ?", self._codec.time(before))

    # --- usage -----------------------------------------------------------------------------------------

    async def append_usage(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        # Checked before the transaction: one bad record refuses the batch, and nothing is written.
        rows = [self._codec.encode_usage(r) for r in check_usage(records)]
        async with self._write(serial=False) as tx:
            await tx.insert_many("usage_records", USAGE_COLUMNS, rows)

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
        # Ordered by (at, id): the oldest request first, and a stable order a pager
        # can resume from with `since` (ids alone follow write order, not request time).
        if limit <= 0:
            return []
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("principal_id", principal_id), ("server", server), ("tool", tool)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("at >= ?")
            args.append(self._codec.time(since))
        if until is not None:
            where.append("at < ?")
            args.append(self._codec.time(until))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._read() as tx:
            rows = await tx.fetch(f"SELECT * FROM usage_records {clause} ORDER BY at, id LIMIT ?", *args, limit)
        return [self._codec.decode_usage(r) for r in rows]

    async def prune_usage(self, before: datetime) -> int:
        async with self._write(serial=False) as tx:
            return await tx.execute("DELETE FROM usage_records WHERE at < ?", self._codec.time(before))

    # --- helpers -------------------------------------------------------------------------------------------

    @staticmethod
    async def _must(pending: Awaitable[_T | None]) -> _T:
        """Await a read of a row this transaction has just written."""
        found = await pending
        if found is None:
            raise StoreError("A row written in this transaction could not be read back.")
        return found
