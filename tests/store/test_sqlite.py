"""SQLite specifics: the file shared by the CLI and the sidecar, pragmas, corrupt rows, migrations."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authz_server.errors import CorruptRow, StoreError
from authz_server.models import Entity
from authz_server.store import open_store
from authz_server.store.sql import load_migrations
from authz_server.store.sqlite import SqliteStore, split_statements
from tests.store.records import T0, audit, entries, key, minutes, override, principal, seed, server, usage


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "authz.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await open_store(f"sqlite:///{db_path}")
    assert isinstance(opened, SqliteStore)
    yield opened
    await opened.close()


def raw(db_path: Path, sql: str, *args: object) -> list[tuple]:
    """Reach past the store, as an operator with the sqlite3 shell would."""
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def test_pragmas_wal_busy_timeout_and_foreign_keys(store: SqliteStore, db_path: Path) -> None:
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    async with store._read() as tx:  # per-connection settings: ask the store's own connection
        foreign_keys = await tx.fetchrow("PRAGMA foreign_keys")
        busy_timeout = await tx.fetchrow("PRAGMA busy_timeout")
    assert foreign_keys is not None and foreign_keys[0] == 1
    assert busy_timeout is not None and busy_timeout[0] == 5000


async def test_migrate_records_each_version_once(db_path: Path) -> None:
    fresh = await SqliteStore.connect(db_path)
    try:
        assert await fresh.schema_version() == 0
        await fresh.migrate()
        await fresh.migrate()
        latest = len(load_migrations("sqlite"))
        assert await fresh.schema_version() == latest
        assert [v for (v,) in raw(db_path, "SELECT version FROM schema_migrations")] == list(range(1, latest + 1))
        tables = {name for (name,) in raw(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"teams", "principals", "servers", "gateway_keys", "overrides", "change_log", "audit_events"} <= tables
    finally:
        await fresh.close()


async def test_a_newer_schema_is_refused(store: SqliteStore, db_path: Path) -> None:
    raw(db_path, "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 'x')")
    with pytest.raises(StoreError, match="newer"):
        await store.migrate()


def test_split_statements_keeps_triggers_whole() -> None:
    script = """
    -- a comment
    CREATE TABLE a (x INTEGER);
    CREATE TRIGGER t BEFORE UPDATE ON a BEGIN SELECT RAISE(ABORT, 'no; really'); END;
    -- trailing comment
    """
    statements = list(split_statements(script))
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")


async def test_two_stores_on_one_file_see_each_others_changes(db_path: Path) -> None:
    cli = await open_store(f"sqlite:///{db_path}")
    sidecar = await open_store(f"sqlite:///{db_path}")
    try:
        await seed(cli)
        seen = await sidecar.changes_since(0)
        assert (Entity.SERVER, "slack") in entries(seen)
        assert await sidecar.get_principal("p-alice") == principal("p-alice", "alice")

        await cli.add_key(key("k-1", "p-alice"))
        await cli.revoke_key("k-1", T0)
        news = await sidecar.changes_since(seen[-1].seq)
        assert entries(news) == [(Entity.KEY, "k-1"), (Entity.KEY, "k-1")]
        got = await sidecar.get_key("k-1")
        assert got is not None and got.revoked_at == T0

        await sidecar.touch_keys({"k-1": T0})
        await sidecar.append_audit([audit(T0, "-", "authn.failure")])
        assert [e.action for e in await cli.query_audit()] == ["authn.failure"]
        assert (await cli.snapshot()).seq == (await sidecar.snapshot()).seq == news[-1].seq
    finally:
        await cli.close()
        await sidecar.close()


async def test_concurrent_writers_on_one_file_get_distinct_increasing_seqs(db_path: Path) -> None:
    one = await open_store(f"sqlite:///{db_path}")
    two = await open_store(f"sqlite:///{db_path}")
    try:
        await asyncio.gather(
            *(one.ensure_team(f"a{i}", T0) for i in range(20)),
            *(two.ensure_team(f"b{i}", T0) for i in range(20)),
        )
        changes = await one.changes_since(0)
        assert len(changes) == 40
        assert [c.seq for c in changes] == sorted({c.seq for c in changes})
        assert {c.entity_key for c in changes} == {f"a{i}" for i in range(20)} | {f"b{i}" for i in range(20)}
        assert len(await two.list_teams()) == 40
    finally:
        await one.close()
        await two.close()


@pytest.mark.parametrize(
    ("sql", "table", "row", "garbage"),
    [
        ("UPDATE servers SET headers = '{not json' WHERE name = 'github'", "servers", "github", "{not json"),
        (
            "UPDATE overrides SET sealed_values = '{\"API_KEY\": {\"v\": 1, \"n\": \"!!!!\", \"c\": \"QQ==\"}}'",
            "overrides",
            "p-alice/github",
            "!!!!",
        ),
        ("UPDATE principals SET roles = 'user,superuser' WHERE id = 'p-bob'", "principals", "p-bob", "superuser"),
        ("UPDATE gateway_keys SET created_at = 'yesterday'", "gateway_keys", "k-1", "yesterday"),
        ("UPDATE teams SET created_at = '2025-01-01T00:00:00'", "teams", "eng", "2025-01-01"),  # naive
        ("UPDATE servers SET signing_secret = '[1, 2]' WHERE name = 'slack'", "servers", "slack", "[1, 2]"),
    ],
)
async def test_a_row_that_does_not_decode_raises_corrupt_row(
    store: SqliteStore, db_path: Path, sql: str, table: str, row: str, garbage: str
) -> None:
    await seed(store)
    await store.add_key(key("k-1", "p-alice"))
    await store.put_override(override("p-alice", "github"))
    raw(db_path, sql)

    with pytest.raises(CorruptRow) as caught:
        await store.snapshot()
    message = str(caught.value)
    assert table in message and row in message
    assert garbage not in message
    assert caught.value.__cause__ is None  # a JSON error would quote the column


async def test_corrupt_server_row_fails_reads_of_that_row_only(store: SqliteStore, db_path: Path) -> None:
    await store.add_server(server("github"))
    await store.add_server(server("slack"))
    raw(db_path, "UPDATE servers SET shared_values = 'secret-looking-garbage' WHERE name = 'github'")
    with pytest.raises(CorruptRow, match="servers row github"):
        await store.get_server("github")
    with pytest.raises(CorruptRow):
        await store.list_servers()
    assert await store.get_server("slack") == server("slack")


async def test_audit_events_cannot_be_rewritten(store: SqliteStore, db_path: Path) -> None:
    await store.append_audit([audit(T0, "cli", "keys.create")])
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw(db_path, "UPDATE audit_events SET actor = 'someone-else'")
    assert [e.actor for e in await store.query_audit()] == ["cli"]


async def test_datetimes_are_stored_as_fixed_width_utc_text(store: SqliteStore, db_path: Path) -> None:
    await store.ensure_team("eng", T0)
    assert raw(db_path, "SELECT created_at FROM teams") == [("2025-03-01T12:00:00.123456+00:00",)]


async def test_an_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="Cannot open the SQLite store"):
        await open_store(f"sqlite:///{tmp_path}/missing-dir/authz.db")


_USAGE_INSERT = (
    "INSERT INTO usage_records (at, principal_id, server, decision, upstream_status, request_bytes, duration_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


@pytest.mark.parametrize(
    ("column", "garbage"),
    [
        ("at", "last-tuesday-secretish"),
        ("at", "2025-03-01T12:09:00.000001"),  # naive
        ("decision", "maybe-secretish"),
        ("upstream_status", "two-hundred-secretish"),
        ("request_bytes", -7),
        ("duration_ms", "slow-secretish"),
    ],
)
async def test_a_usage_row_that_does_not_decode_raises_corrupt_row(
    store: SqliteStore, db_path: Path, column: str, garbage: object
) -> None:
    await store.append_usage([usage(T0, request_id="fine")])
    values = {
        "at": "2025-03-01T12:05:00.000000+00:00",
        "principal_id": "p-alice",
        "server": "github",
        "decision": "allow",
        "upstream_status": 200,
        "request_bytes": 10,
        "duration_ms": 1.5,
    }
    values[column] = garbage
    raw(db_path, _USAGE_INSERT, *values.values())
    (bad_id,) = raw(db_path, "SELECT MAX(id) FROM usage_records")[0]

    with pytest.raises(CorruptRow) as caught:
        await store.query_usage()
    message = str(caught.value)
    assert f"usage_records row {bad_id}" in message
    assert str(garbage) not in message and "secretish" not in message
    assert caught.value.__cause__ is None
    # Queries that do not reach the bad row still work.
    assert [r.request_id for r in await store.query_usage(server="github", limit=1)] == ["fine"]


async def test_usage_records_cannot_be_rewritten(store: SqliteStore, db_path: Path) -> None:
    await store.append_usage([usage(T0)])
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw(db_path, "UPDATE usage_records SET principal_id = 'someone-else'")
    assert [r.principal_id for r in await store.query_usage()] == ["p-alice"]
    assert await store.prune_usage(minutes(1)) == 1  # retention still deletes


async def test_usage_indexes_serve_the_filters(store: SqliteStore, db_path: Path) -> None:
    indexes = {name for (name,) in raw(db_path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"usage_records_by_at", "usage_records_by_principal", "usage_records_by_server"} <= indexes
    plan = " ".join(
        str(row[-1])
        for row in raw(
            db_path,
            "EXPLAIN QUERY PLAN SELECT * FROM usage_records WHERE principal_id = ? AND at >= ? ORDER BY at, id",
            "p-alice",
            "2025",
        )
    )
    assert "usage_records_by_principal" in plan and "TEMP B-TREE" not in plan


async def test_the_database_and_its_wal_and_shm_files_are_0600(tmp_path: Path) -> None:
    import os
    import stat

    old_umask = os.umask(0o022)  # the usual umask, which made them 0644
    try:
        fresh = tmp_path / "fresh.db"
        store = await SqliteStore.connect(fresh)
        await store.migrate()
        await store.append_audit([audit(T0, "cli", "init")])  # a write: SQLite has made its -wal and -shm files
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert modes == {"fresh.db": 0o600, "fresh.db-wal": 0o600, "fresh.db-shm": 0o600}
        await store.close()
        # Files an older version left 0644 are tightened when the store is next opened.
        for p in tmp_path.iterdir():
            p.chmod(0o644)
        store = await SqliteStore.connect(fresh, create=False)
        await store.append_audit([audit(T0, "cli", "init")])
        assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o600}
        await store.close()
    finally:
        os.umask(old_umask)


async def test_masks_stored_by_an_older_version_read_back_held_to_the_rule(store: SqliteStore) -> None:
    await seed(store)
    await store.add_server(server("legacy", shared_masks={"API_KEY": "ghp_…9xQa", "CLIENT_ID": "…"}))
    await store.put_override(override("p-alice", "legacy", masks={"API_KEY": "sk-l…abcd"}))
    got = await store.get_server("legacy")
    assert got is not None and got.shared_masks == {"API_KEY": "…9xQa", "CLIENT_ID": "…"}
    found = await store.get_override("p-alice", "legacy")
    assert found is not None and found.masks == {"API_KEY": "…abcd"}


async def test_an_oversized_event_stored_by_an_older_version_reads_back_bounded(store: SqliteStore, db_path: Path) -> None:
    from authz_server.models import FIELD_MAX, TRUNCATED

    huge = "n" * (1 << 20)
    raw(db_path, "INSERT INTO audit_events (at, actor, action, target, outcome, details) VALUES (?, ?, ?, ?, ?, ?)",
        "2026-03-01T12:00:00.000000Z", "cli", "principals.add", f"principal:{huge}", "error", f'{{"name": "{huge}"}}')  # fmt: skip
    (event,) = await store.query_audit(action="principals.add")
    assert event.target == f"principal:{huge}"[:FIELD_MAX] + TRUNCATED
    assert event.details == {"name": huge[:FIELD_MAX] + TRUNCATED}


async def test_a_backup_is_a_consistent_private_copy_taken_while_another_connection_writes(
    store: SqliteStore, db_path: Path, tmp_path: Path
) -> None:
    import os
    import stat as stat_module

    from authz_server.errors import ConfigError
    from authz_server.store.sqlite import backup

    await seed(store)
    await store.append_usage([usage(T0)])
    copy = tmp_path / "copy.db"
    size = await asyncio.to_thread(backup, str(db_path), str(copy))  # the store's connection stays open
    assert size == copy.stat().st_size > 0 and stat_module.S_IMODE(copy.stat().st_mode) == 0o600
    assert not os.path.exists(f"{copy}-wal")  # one self-contained file
    restored = await open_store(f"sqlite:///{copy}", create=False)
    try:
        assert await restored.snapshot() == await store.snapshot()
        assert len(await restored.query_usage()) == 1
    finally:
        await restored.close()
    with pytest.raises(ConfigError, match="exists already"):
        backup(str(db_path), str(copy))
    assert copy.stat().st_size == size  # left as it was
    with pytest.raises(StoreError, match="backup"):
        backup(str(tmp_path / "missing.db"), str(tmp_path / "other.db"))
    assert not (tmp_path / "other.db").exists()  # nothing left behind
