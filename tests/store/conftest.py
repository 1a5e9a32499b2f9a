"""Fixtures for the store contract suite: one `store` per backend.

The postgres backend uses the server at 127.0.0.1:5432, database `test`, and a
fresh schema per test, dropped afterwards. When that server is not reachable
the postgres tests are skipped, with the reason, never failed.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from authz_server.store import open_store
from authz_server.store.base import Store

PG_CANDIDATES = (
    "postgresql://127.0.0.1:5432/test",
    "postgresql://postgres@127.0.0.1:5432/test",
)


async def _probe(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=3)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def _run_in_thread(coro: object) -> None:
    """Run a coroutine to completion even when called from inside a running loop."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    """A PostgreSQL URL that answers, or a skip naming why none did."""
    candidates = [os.environ["MCP_AUTHZ_TEST_POSTGRES"]] if os.environ.get("MCP_AUTHZ_TEST_POSTGRES") else PG_CANDIDATES
    reasons = []
    for url in candidates:
        try:
            _run_in_thread(_probe(url))
            return url
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            reasons.append(f"{url}: {type(exc).__name__}: {exc}")
    pytest.skip(f"PostgreSQL is not reachable, so the postgres store is not tested ({'; '.join(reasons)})")


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
