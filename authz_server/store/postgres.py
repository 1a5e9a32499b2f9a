"""PostgresStore: the Store over asyncpg, for several sidecar replicas.

Writers that log changes take a per-schema advisory lock for the rest of
their transaction. The change_log seq is drawn after the lock, so seq order is
commit order, and a follower reading `changes_since(n)` can never see seq n+2
and later find a late-committing n+1 behind it.

Each change-logging transaction also sends NOTIFY on `mcp_authz_changes`, its
payload naming the schema; `wait_for_changes` listens on a dedicated
connection and wakes early on a notification for its own schema.

The URL may carry `?schema=NAME`: tables then live in that schema (created by
`migrate` if missing; the sidecar opens with `create=False` and refuses a missing
one instead), and the parameter is removed before the DSN reaches asyncpg.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from authz_server.errors import ConfigError, Conflict, StoreError, StoreRefused
from authz_server.store.codec import NativeTime, Row
from authz_server.store.sql import SqlStore, Tx, append_once, insert_sql

CHANNEL = "mcp_authz_changes"
CLOSE_TIMEOUT = 2.0  # seconds a graceful close may take before connections are cut
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_PLACEHOLDER = re.compile(r"\?")
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def parse_url(url: str) -> tuple[str, str | None]:
    """Split `postgresql://…?schema=NAME` into the DSN for asyncpg and the schema."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in query if name == "schema"]
    if len(schemas) > 1:
        raise ConfigError("The PostgreSQL store URL names more than one schema.")
    schema = schemas[0] if schemas else None
    if schema is not None and not _SCHEMA_RE.match(schema):
        raise ConfigError(
            f"The PostgreSQL schema {schema!r} is not allowed: use lowercase letters, digits and underscores."
        )
    rest = urlencode([(name, value) for name, value in query if name != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


def _where(dsn: str) -> str:
    """host:port/database, without user or password, for messages."""
    parts = urlsplit(dsn)
    return parts.netloc.rpartition("@")[2] + parts.path


def _numbered(sql: str) -> str:
    """`?` placeholders to asyncpg's `$1, $2, …` (our queries hold no `?` literals)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _PgTx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.changed = False

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(_numbered(sql), *args))

    async def fetch_chunks(self, sql: str, *args: Any, size: int = 1000) -> AsyncIterator[list[Row]]:
        cursor = await self._conn.cursor(_numbered(sql), *args)  # server-side: needs the open transaction
        while rows := list(await cursor.fetch(size)):
            yield rows

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = await self._conn.fetchrow(_numbered(sql), *args)
        return row

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self._conn.execute(_numbered(sql), *args)
        count = status.rpartition(" ")[2]  # "UPDATE 3", "INSERT 0 1", …
        return int(count) if count.isdigit() else 0

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(_numbered(sql), args)

    async def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        # asyncpg pipelines executemany in one round trip, with no GIL hand-off per row.
        await self.executemany(f"{insert_sql(table, columns)} {append_once(columns)}", rows)

    async def script(self, sql: str) -> None:
        await self._conn.execute(sql)  # no arguments: the simple protocol runs several statements


class PostgresStore(SqlStore):
    """The Store over a PostgreSQL database. Open it with `await PostgresStore.connect(url)`."""

    dialect = "postgres"

    def __init__(self, pool: asyncpg.Pool, dsn: str, schema: str | None, connect_kwargs: dict[str, Any]) -> None:
        super().__init__(NativeTime())
        self._pool = pool
        self._dsn = dsn
        self._schema = schema
        self._connect_kwargs = connect_kwargs
        self._tag = schema or ""  # NOTIFY payload: wake only followers of this schema
        digest = hashlib.sha256(f"mcp-authz:changes:{self._tag}".encode()).digest()
        self._lock_key = int.from_bytes(digest[:8], "big", signed=True)
        self._listener: asyncpg.Connection | None = None
        self._notified = asyncio.Event()
        self._closed = False

    @property
    def schema(self) -> str | None:
        return self._schema

    @property
    def where(self) -> str:
        """host:port/database and the schema, without user or password, for messages."""
        return _where(self._dsn) + (f" (schema {self._schema!r})" if self._schema else "")

    @classmethod
    async def connect(
        cls, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0, create: bool = True
    ) -> PostgresStore:
        """Connect a pool and the notification listener. Call `migrate()` next.

        `create=False` (the sidecar): a schema named in the URL must exist already; a missing
        one is refused (ConfigError) rather than left for `migrate` to create.
        """
        dsn, schema = parse_url(url)
        settings = {"application_name": "mcp-authz"}
        if schema:
            settings["search_path"] = f'"{schema}"'
        kwargs: dict[str, Any] = {"timeout": timeout, "server_settings": settings}
        try:
            pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, **kwargs)
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"Cannot connect to PostgreSQL at {_where(dsn)}: {type(exc).__name__}: {exc}") from exc
        store = cls(pool, dsn, schema, kwargs)
        try:
            if not create and schema and not await store._schema_exists():
                raise ConfigError(
                    f"The PostgreSQL schema {schema!r} does not exist at {_where(dsn)}: run 'mcp-authz init' first."
                )
            await store._listen()
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Bounded: a server that does not answer (a partition) would hold a graceful close for ever.
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            try:
                await listener.close(timeout=CLOSE_TIMEOUT)
            except (*_DRIVER_ERRORS, TimeoutError):
                listener.terminate()  # the server is gone: nothing to close gracefully
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            self._pool.terminate()

    async def _schema_exists(self) -> bool:
        try:
            found = await self._pool.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self._schema)
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"Cannot read from PostgreSQL at {_where(self._dsn)}: {type(exc).__name__}: {exc}") from exc
        return found is not None

    # --- notifications -------------------------------------------------------------

    async def _listen(self) -> None:
        try:
            listener = await asyncpg.connect(self._dsn, **self._connect_kwargs)
            await listener.add_listener(CHANNEL, self._on_notify)
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"Cannot listen for changes on PostgreSQL at {_where(self._dsn)}: {exc}") from exc
        self._listener = listener

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload == self._tag:
            self._notified.set()

    async def wait_for_changes(self, timeout: float) -> None:
        if self._closed:
            raise StoreError("The PostgreSQL store is closed.")
        if self._listener is None or self._listener.is_closed():
            try:
                await self._listen()
            except StoreError:
                await asyncio.sleep(max(0.0, timeout))  # the follower's poll still catches up
                return
            return  # notifications may have been lost while disconnected: poll now
        try:
            await asyncio.wait_for(self._notified.wait(), max(0.0, timeout))
        except TimeoutError:
            pass
        self._notified.clear()

    # --- transactions --------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except asyncpg.UniqueViolationError as exc:
            raise Conflict("That would duplicate an existing row.") from exc
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
            raise StoreRefused(f"The PostgreSQL store refused a write: {type(exc).__name__}: {exc}") from exc
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"The PostgreSQL store failed: {type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def _transaction(self, *, write: bool, serial: bool) -> AsyncIterator[Tx]:
        if self._closed:
            raise StoreError("The PostgreSQL store is closed.")
        with self._errors():
            async with self._pool.acquire() as conn:
                if write:
                    transaction = conn.transaction()
                else:
                    transaction = conn.transaction(isolation="repeatable_read", readonly=True)
                async with transaction:
                    if serial:
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
                    tx = _PgTx(conn)
                    yield tx
                    if tx.changed:
                        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self._tag)

    def _read(self) -> AbstractAsyncContextManager[Tx]:
        return self._transaction(write=False, serial=False)

    def _write(self, *, serial: bool = True) -> AbstractAsyncContextManager[Tx]:
        return self._transaction(write=True, serial=serial)

    async def _bootstrap(self, tx: Tx) -> None:
        # Look before creating: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege.
        if self._schema and not await tx.fetchrow("SELECT 1 FROM pg_namespace WHERE nspname = ?", self._schema):
            await tx.script(f'CREATE SCHEMA "{self._schema}"')
        await tx.script(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
        )

    async def _has_table(self, tx: Tx, name: str) -> bool:
        row = await tx.fetchrow("SELECT to_regclass(?) IS NOT NULL AS present", name)
        return bool(row and row["present"])
