"""SqliteStore: the embedded default, over aiosqlite.

Several processes share the file (the CLI writes while the sidecar reads and
follows the change log), so the database runs in WAL mode with a busy timeout,
and every write transaction starts with BEGIN IMMEDIATE: it takes the write
lock up front, where the busy timeout applies, instead of failing on a
read-to-write upgrade. One connection per store; an asyncio lock keeps
coroutines from interleaving their transactions on it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiosqlite

from authz_server.errors import ConfigError, Conflict, StoreError, StoreRefused
from authz_server.store.codec import Row, TextTime
from authz_server.store.sql import SqlStore, Tx, append_once


_MAX_VARIABLES = 2000  # well under SQLite's limit on bound parameters per statement


class _SqliteTx:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self.changed = False

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._conn.execute(sql, args) as cursor:
            return list(await cursor.fetchall())

    async def fetch_chunks(self, sql: str, *args: Any, size: int = 1000) -> AsyncIterator[list[Row]]:
        async with self._conn.execute(sql, args) as cursor:
            while True:
                rows: list[Row] = list(await cursor.fetchmany(size))
                if not rows:
                    return
                yield rows

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._conn.execute(sql, args) as cursor:
            row: Row | None = await cursor.fetchone()
            return row

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._conn.execute(sql, args) as cursor:
            return cursor.rowcount

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, args)

    async def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        # Multi-row VALUES, not executemany: sqlite3 lets go of the GIL around every statement step, and
        # one step per row means one GIL hand-off per row to Check's thread, which costs far more than the row.
        per_statement = max(1, _MAX_VARIABLES // len(columns))
        placeholder = "(" + ", ".join("?" * len(columns)) + ")"
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            values = ", ".join([placeholder] * len(chunk))
            await self._conn.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values} {append_once(columns)}",
                [v for row in chunk for v in row],
            )

    async def script(self, sql: str) -> None:
        # Not executescript(): it commits first, and the migration must stay in our transaction.
        for statement in split_statements(sql):
            await self._conn.execute(statement)


def split_statements(script: str) -> Iterator[str]:
    """Split a SQL script into statements, keeping CREATE TRIGGER … END; whole."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    leftover = [ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise StoreError("A SQLite migration ends with an incomplete statement.")


async def _has_migrations(conn: aiosqlite.Connection) -> bool:
    async with conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'") as cur:
        return await cur.fetchone() is not None


FILE_MODE = 0o600  # the database holds sealed credentials and key hashes


def _keep_private(where: str, create: bool) -> None:
    """Create the database file 0600 before SQLite opens it: SQLite gives its -wal and -shm files
    the database's mode, so they are 0600 too. Files an older version left open to others are
    tightened (when this user owns them)."""
    if create:
        with suppress(FileExistsError):
            os.close(os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    for name in (where, f"{where}-wal", f"{where}-shm"):
        with suppress(FileNotFoundError, PermissionError):
            if stat.S_IMODE(os.stat(name).st_mode) & ~FILE_MODE:
                os.chmod(name, FILE_MODE)


class SqliteStore(SqlStore):
    """The Store over one SQLite file. Open it with `await SqliteStore.connect(path)`."""

    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        super().__init__(TextTime())
        self._conn = conn
        self._path = path
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(cls, path: str | Path, *, busy_timeout: float = 5.0, create: bool = True) -> SqliteStore:
        """Open the database file at `path`, creating it if needed. Call `migrate()` next.

        `create=False` (the sidecar): only an existing file that `init` set up; a missing file or
        one without the schema is refused (ConfigError) before anything is written to it, and
        the file is opened read-write without ever creating it.
        """
        where = str(path)
        # Checked here for a clearer message, and because a failed aiosqlite.connect
        # leaves its worker thread calling back into the event loop.
        if not Path(where).parent.is_dir():
            raise StoreError(f"Cannot open the SQLite store at {where}: its directory does not exist.")
        if not create and not Path(where).is_file():
            raise ConfigError(f"No store at {where}: run 'mcp-authz init' first.")
        try:
            _keep_private(where, create)
            if create:
                conn = await aiosqlite.connect(where, isolation_level=None)
            else:  # mode=rw: should the file go away meanwhile, SQLite refuses instead of creating it
                conn = await aiosqlite.connect(f"{Path(where).absolute().as_uri()}?mode=rw", isolation_level=None,
                                               uri=True)  # fmt: skip
        except sqlite3.Error as exc:
            raise StoreError(f"Cannot open the SQLite store at {where}: {exc}.") from exc
        except OSError as exc:
            raise StoreError(f"Cannot open the SQLite store at {where}: {exc.strerror}.") from exc
        try:
            conn.row_factory = sqlite3.Row
            # busy_timeout first: switching to WAL itself may wait on another process.
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            # Looked at before switching to WAL, which would write to an empty file.
            if not create and not await _has_migrations(conn):
                raise ConfigError(f"The store at {where} is not initialised: run 'mcp-authz init' first.")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"Cannot open the SQLite store at {where}: {exc}.") from exc
            raise
        return cls(conn, where)

    @property
    def where(self) -> str:
        """The database file, for messages."""
        return self._path

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            async with self._lock:
                await self._conn.close()

    async def wait_for_changes(self, timeout: float) -> None:
        # SQLite cannot notify another process; the follower simply polls.
        await asyncio.sleep(max(0.0, timeout))

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                raise Conflict("That would duplicate an existing row.") from exc
            raise StoreRefused(f"The SQLite store at {self._path} refused a write: {exc}.") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"The SQLite store at {self._path} failed: {exc}.") from exc

    @asynccontextmanager
    async def _transaction(self, begin: str) -> AsyncIterator[Tx]:
        if self._closed:
            raise StoreError("The SQLite store is closed.")
        async with self._lock:
            with self._errors():
                await self._conn.execute(begin)
                try:
                    yield _SqliteTx(self._conn)
                    await self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:  # also after a failed COMMIT
                        await self._conn.execute("ROLLBACK")
                    raise

    def _read(self) -> AbstractAsyncContextManager[Tx]:
        # A deferred transaction: in WAL mode every read in it sees one snapshot.
        return self._transaction("BEGIN")

    def _write(self, *, serial: bool = True) -> AbstractAsyncContextManager[Tx]:
        # SQLite has one writer at a time anyway, so every write is serial.
        return self._transaction("BEGIN IMMEDIATE")

    async def _bootstrap(self, tx: Tx) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )

    async def _has_table(self, tx: Tx, name: str) -> bool:
        return await tx.fetchrow("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", name) is not None
