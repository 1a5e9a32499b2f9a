"""Fixtures for the store contract suite: one `store` per backend.

The postgres backend uses the server at 127.0.0.1:5432, database `test`, and a
fresh schema per test, dropped afterwards. When that server is not reachable
the postgres tests are skipped, with the reason, never failed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from authz_server.store import open_store
from authz_server.store.base import Store

from ..postgres import reachable_url

@pytest.fixture(scope="session")
def pg_base_url() -> str:
    """A PostgreSQL URL that answers, or a skip naming why none did."""
    return reachable_url("the postgres store")


async def drop_schema(base_url: str, schema: str) -> None:
    conn = await asyncpg.connect(base_url, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pg_url(pg_base_url: str) -> AsyncIterator[str]:
    """A URL naming a fresh schema, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:20]}"
    yield f"{pg_base_url}?schema={schema}"
    await drop_schema(pg_base_url, schema)


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_url(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
    else:
        base = request.getfixturevalue("pg_base_url")
        schema = f"t_{uuid.uuid4().hex[:20]}"
        yield f"{base}?schema={schema}"
        await drop_schema(base, schema)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url)
    yield opened
    await opened.close()
