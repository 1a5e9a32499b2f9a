"""Persistence: the `Store` Protocol (base.py) and `open_store`, which picks an implementation by URL."""

from __future__ import annotations

import re

from authz_server.errors import ConfigError
from authz_server.store.base import Store
from authz_server.store.memory import MemoryStore
from authz_server.store.postgres import PostgresStore
from authz_server.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "PostgresStore", "SqliteStore", "Store", "open_store"]

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


async def open_store(url: str, *, create: bool = True) -> Store:
    """Connect to the store at `url` and migrate it to the newest schema.

    `sqlite:///relative.db`, `sqlite:////abs/path.db`, `memory://`,
    `postgresql://host/db` or `postgres://…` (optionally `?schema=NAME`).
    Messages name the scheme only: a URL may hold a password.

    `create=False` (the sidecar): open an existing, initialised store and change nothing.
    No file, schema or table is created and nothing is migrated (the caller calls `migrate()`
    once it has checked the master key, to upgrade an older schema); a missing or empty store
    is a ConfigError saying to run 'mcp-authz init'. A `memory://` store is always new.
    """
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    store: Store
    if scheme == "memory":
        store = MemoryStore()
    elif scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError("A SQLite store URL needs a path: sqlite:///relative.db or sqlite:////abs/path.db.")
        store = await SqliteStore.connect(path, create=create)
    elif scheme in ("postgresql", "postgres"):
        store = await PostgresStore.connect(url, create=create)
    else:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ConfigError(
            f"The store URL has {shown}: use sqlite:///PATH, postgresql://HOST/DATABASE or memory://."
        )
    try:
        if create or isinstance(store, MemoryStore):
            await store.migrate()
        elif await store.schema_version() == 0:
            where = store.where if isinstance(store, SqliteStore | PostgresStore) else url
            raise ConfigError(f"The store at {where} is not initialised: run 'mcp-authz init' first.")
    except BaseException:
        await store.close()
        raise
    return store
