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
