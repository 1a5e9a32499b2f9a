"""open_store: one URL picks, connects and migrates a store."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz_server.errors import ConfigError
from authz_server.store import MemoryStore, SqliteStore, open_store
from tests.store.records import T0


async def test_memory_url() -> None:
    store = await open_store("memory://")
    assert isinstance(store, MemoryStore)
    assert await store.schema_version() == MemoryStore.SCHEMA_VERSION
    await store.close()


async def test_sqlite_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    store = await open_store("sqlite:///data/authz.db")
    try:
        assert isinstance(store, SqliteStore)
        await store.ensure_team("eng", T0)
    finally:
        await store.close()
    assert (tmp_path / "data" / "authz.db").is_file()


async def test_sqlite_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "abs.db"
    url = f"sqlite:///{path}"
    assert url.startswith("sqlite:////")
    store = await open_store(url)
    try:
        assert await store.schema_version() >= 1
    finally:
        await store.close()
    assert path.is_file()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mysql://admin:hunter2@db/authz", "'mysql'"),
        ("hunter2-without-a-scheme.db", "no scheme"),
        ("", "no scheme"),
    ],
)
async def test_an_unknown_scheme_is_a_config_error(url: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await open_store(url)
    assert named in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "sqlite:///" in str(caught.value)  # says what would work


async def test_a_sqlite_url_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="needs a path"):
        await open_store("sqlite://")


# --- create=False: what the sidecar opens, which must exist and is never created ---------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_without_create_a_missing_sqlite_file_is_refused_not_created(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No store at .*run 'mcp-authz init' first"):
        await open_store(f"sqlite:///{tmp_path}/authz.db", create=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("contents", [b"", None], ids=["empty file", "database without tables"])
async def test_without_create_an_uninitialised_sqlite_file_is_refused_untouched(
    tmp_path: Path, contents: bytes | None
) -> None:
    db = tmp_path / "authz.db"
    if contents is None:
        import sqlite3

        sqlite3.connect(db).close()
    else:
        db.write_bytes(contents)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match="not initialised: run 'mcp-authz init' first"):
        await open_store(f"sqlite:///{db}", create=False)
    assert _files(tmp_path) == before  # not switched to WAL, no -wal or -shm


async def test_without_create_an_initialised_sqlite_store_opens_and_closes_leaving_it_as_it_was(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/authz.db"
    await (await open_store(url)).close()
    before = _files(tmp_path)
    store = await open_store(url, create=False)
    try:
        assert await store.schema_version() >= 1
        await store.get_key_checks()
    finally:
        await store.close()
    assert _files(tmp_path) == before


async def test_without_create_memory_is_a_new_store() -> None:
    store = await open_store("memory://", create=False)
    assert await store.schema_version() == MemoryStore.SCHEMA_VERSION and await store.get_key_checks() == {}
    await store.close()
