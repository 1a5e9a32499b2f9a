"""PostgreSQL specifics: LISTEN/NOTIFY, schema isolation, URL handling, commit-ordered seqs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from authz_server.errors import ConfigError, CorruptRow, StoreError
from authz_server.models import Entity
from authz_server.store import open_store
from authz_server.store.postgres import PostgresStore, parse_url
from authz_server.store.sql import load_migrations
from tests.store.conftest import drop_schema
from tests.store.records import T0, audit, entries, minutes, seed, server, usage

# --- no server needed ---------------------------------------------------------------------


def test_parse_url_strips_the_schema_parameter() -> None:
    assert parse_url("postgresql://u:pw@db.example:5433/authz?schema=tenant_1&sslmode=disable") == (
        "postgresql://u:pw@db.example:5433/authz?sslmode=disable",
        "tenant_1",
    )
    assert parse_url("postgres://127.0.0.1/test") == ("postgres://127.0.0.1/test", None)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://127.0.0.1/test?schema=Bad-Name",
        'postgresql://127.0.0.1/test?schema=x";drop',
        "postgresql://127.0.0.1/test?schema=",
        "postgresql://127.0.0.1/test?schema=a&schema=b",
    ],
)
def test_parse_url_refuses_unsafe_schemas(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(url)


async def test_an_unreachable_server_raises_store_error_without_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        await PostgresStore.connect("postgresql://someone:hunter2@127.0.0.1:1/test", timeout=2)
    assert "127.0.0.1:1/test" in str(caught.value)
    assert "hunter2" not in str(caught.value)


# --- against the server -------------------------------------------------------------------------



@pytest.fixture
async def pair(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one schema: two sidecar replicas, or the CLI and a sidecar."""
    one = await open_store(pg_url)
    two = await open_store(pg_url)
    assert isinstance(one, PostgresStore) and isinstance(two, PostgresStore)
    yield one, two
    await one.close()
    await two.close()


@pytest.mark.postgres
async def test_wait_for_changes_wakes_on_another_instances_mutation(pair: tuple[PostgresStore, PostgresStore]) -> None:
    follower, writer = pair
    await follower.wait_for_changes(0)  # start from a quiet state
    started = time.monotonic()
    waiting = asyncio.create_task(follower.wait_for_changes(10))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await writer.ensure_team("eng", T0)
    await asyncio.wait_for(waiting, timeout=5)
    assert time.monotonic() - started < 2
    assert entries(await follower.changes_since(0)) == [(Entity.TEAM, "eng")]


@pytest.mark.postgres
async def test_a_notification_that_arrived_first_is_not_lost(pair: tuple[PostgresStore, PostgresStore]) -> None:
    follower, writer = pair
    await writer.ensure_team("eng", T0)
    await asyncio.sleep(0.2)  # delivered before anyone waits
    started = time.monotonic()
    await follower.wait_for_changes(5)
    assert time.monotonic() - started < 1


@pytest.mark.postgres
async def test_wait_for_changes_ignores_other_schemas_and_non_changes(
    pair: tuple[PostgresStore, PostgresStore], pg_base_url: str
) -> None:
    follower, writer = pair
    other_schema = f"t_{uuid.uuid4().hex[:20]}"
    other = await open_store(f"{pg_base_url}?schema={other_schema}")
    try:
        await follower.wait_for_changes(0)
        started = time.monotonic()
        waiting = asyncio.create_task(follower.wait_for_changes(0.5))
        await asyncio.sleep(0.05)
        await other.ensure_team("eng", T0)  # another schema's change
        await writer.touch_keys({"k-1": T0})  # not a change
        await writer.append_audit([audit(T0, "cli", "x")])  # not a change
        await waiting
        assert time.monotonic() - started >= 0.45
        assert await follower.changes_since(0) == []
    finally:
        await other.close()
        await drop_schema(pg_base_url, other_schema)


@pytest.mark.postgres
async def test_tables_live_in_the_named_schema(pg_url: str, pg_base_url: str) -> None:
    store = await open_store(pg_url)
    try:
        assert isinstance(store, PostgresStore) and store.schema is not None
        assert await store.schema_version() == len(load_migrations("postgres"))
        conn = await asyncpg.connect(pg_base_url)
        try:
            tables = {
                r["table_name"]
                for r in await conn.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", store.schema
                )
            }
            versions = await conn.fetch(f'SELECT version FROM "{store.schema}".schema_migrations ORDER BY version')
        finally:
            await conn.close()
        assert {"teams", "principals", "servers", "gateway_keys", "overrides", "change_log", "audit_events"} <= tables
        assert [r["version"] for r in versions] == list(range(1, len(load_migrations("postgres")) + 1))
    finally:
        await store.close()


@pytest.mark.postgres
async def test_concurrent_writers_get_commit_ordered_seqs(pair: tuple[PostgresStore, PostgresStore]) -> None:
    one, two = pair
    await asyncio.gather(
        *(one.ensure_team(f"a{i}", T0) for i in range(15)),
        *(two.ensure_team(f"b{i}", T0) for i in range(15)),
    )
    changes = await two.changes_since(0)
    assert len(changes) == 30
    assert [c.seq for c in changes] == sorted({c.seq for c in changes})
    assert (await one.snapshot()).seq == changes[-1].seq


@pytest.mark.postgres
async def test_a_row_that_does_not_decode_raises_corrupt_row(pg_url: str, pg_base_url: str) -> None:
    store = await open_store(pg_url)
    try:
        assert isinstance(store, PostgresStore)
        await seed(store)
        conn = await asyncpg.connect(pg_base_url)
        try:
            await conn.execute(
                f"UPDATE \"{store.schema}\".servers SET headers = '{{\"looks\": \"like-a-secret\"}}' "
                "WHERE name = 'github'"
            )
        finally:
            await conn.close()
        with pytest.raises(CorruptRow) as caught:
            await store.get_server("github")
        assert "servers row github" in str(caught.value) and "like-a-secret" not in str(caught.value)
        assert await store.get_server("slack") == server("slack")
    finally:
        await store.close()


@pytest.mark.postgres
async def test_audit_events_cannot_be_rewritten(pg_url: str, pg_base_url: str) -> None:
    store = await open_store(pg_url)
    try:
        assert isinstance(store, PostgresStore)
        await store.append_audit([audit(T0, "cli", "keys.create")])
        conn = await asyncpg.connect(pg_base_url)
        try:
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await conn.execute(f"UPDATE \"{store.schema}\".audit_events SET actor = 'someone-else'")
        finally:
            await conn.close()
        assert [e.actor for e in await store.query_audit()] == ["cli"]
    finally:
        await store.close()


@pytest.mark.postgres
async def test_postgres_scheme_alias(pg_base_url: str) -> None:
    schema = f"t_{uuid.uuid4().hex[:20]}"
    url = pg_base_url.replace("postgresql://", "postgres://", 1) + f"?schema={schema}"
    store = await open_store(url)
    try:
        assert isinstance(store, PostgresStore)
        assert await store.ensure_team("eng", T0)
    finally:
        await store.close()
        await drop_schema(pg_base_url, schema)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("column", "garbage"),
    [("decision", "'maybe-secretish'"), ("upstream_status", "1234567"), ("request_bytes", "-7")],
)
async def test_a_usage_row_that_does_not_decode_raises_corrupt_row(
    pg_url: str, pg_base_url: str, column: str, garbage: str
) -> None:
    store = await open_store(pg_url)
    try:
        assert isinstance(store, PostgresStore)
        await store.append_usage([usage(T0, request_id="fine")])
        values = {"decision": "'allow'", "upstream_status": "200", "request_bytes": "10"}
        values[column] = garbage
        conn = await asyncpg.connect(pg_base_url)
        try:
            bad_id = await conn.fetchval(
                f'INSERT INTO "{store.schema}".usage_records (at, decision, upstream_status, request_bytes) '
                f"VALUES ('2025-03-01T13:00:00Z', {values['decision']}, {values['upstream_status']}, "
                f"{values['request_bytes']}) RETURNING id"
            )
        finally:
            await conn.close()
        with pytest.raises(CorruptRow) as caught:
            await store.query_usage()
        message = str(caught.value)
        assert f"usage_records row {bad_id}" in message and "secretish" not in message and garbage not in message
        assert [r.request_id for r in await store.query_usage(limit=1)] == ["fine"]
    finally:
        await store.close()


@pytest.mark.postgres
async def test_usage_records_cannot_be_rewritten(pg_url: str, pg_base_url: str) -> None:
    store = await open_store(pg_url)
    try:
        assert isinstance(store, PostgresStore)
        await store.append_usage([usage(T0)])
        conn = await asyncpg.connect(pg_base_url)
        try:
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await conn.execute(f"UPDATE \"{store.schema}\".usage_records SET principal_id = 'someone-else'")
        finally:
            await conn.close()
        assert [r.principal_id for r in await store.query_usage()] == ["p-alice"]
        assert await store.prune_usage(minutes(1)) == 1
    finally:
        await store.close()


@pytest.mark.postgres
async def test_usage_writes_send_no_notification(pair: tuple[PostgresStore, PostgresStore]) -> None:
    follower, writer = pair
    await follower.wait_for_changes(0)
    started = time.monotonic()
    waiting = asyncio.create_task(follower.wait_for_changes(0.25))
    await asyncio.sleep(0.05)
    await writer.append_usage([usage(T0), usage(minutes(1))])
    await writer.prune_usage(minutes(1))
    await waiting
    assert time.monotonic() - started >= 0.2


# --- create=False: what the sidecar opens ------------------------------------------------------------


async def _schema_state(base_url: str, schema: str) -> tuple[bool, list[str]]:
    conn = await asyncpg.connect(base_url, timeout=5)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema) is not None
        tables = [r[0] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", schema)]
    finally:
        await conn.close()
    return exists, tables


@pytest.mark.postgres
async def test_without_create_a_missing_schema_is_refused_not_created(pg_url: str, pg_base_url: str) -> None:
    _, schema = parse_url(pg_url)
    assert schema is not None
    with pytest.raises(ConfigError, match=f"schema '{schema}' does not exist .*run 'mcp-authz init' first"):
        await open_store(pg_url, create=False)
    assert await _schema_state(pg_base_url, schema) == (False, [])


@pytest.mark.postgres
async def test_without_create_an_empty_schema_is_refused_and_left_empty(pg_url: str, pg_base_url: str) -> None:
    _, schema = parse_url(pg_url)
    assert schema is not None
    conn = await asyncpg.connect(pg_base_url, timeout=5)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    with pytest.raises(ConfigError, match="not initialised: run 'mcp-authz init' first"):
        await open_store(pg_url, create=False)
    assert await _schema_state(pg_base_url, schema) == (True, [])


@pytest.mark.postgres
async def test_without_create_an_initialised_schema_opens_without_migrating(pg_url: str) -> None:
    store = await open_store(pg_url)
    latest = await store.schema_version()
    await store.close()
    opened = await open_store(pg_url, create=False)
    try:
        assert await opened.schema_version() == latest
        assert isinstance(opened, PostgresStore)
    finally:
        await opened.close()
