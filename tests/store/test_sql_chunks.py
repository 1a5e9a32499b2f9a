"""`fetch_chunks`, which the snapshot reads every table through: every row, in order, `size` at a time."""

from __future__ import annotations

import pytest

from authz_server.store.base import Store
from authz_server.store.memory import MemoryStore

TEN_ROWS = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 10) SELECT x FROM n ORDER BY x"


async def test_rows_come_in_chunks_and_none_is_lost(store: Store) -> None:
    if isinstance(store, MemoryStore):
        pytest.skip("the memory store has no SQL transactions")
    async with store._read() as tx:  # type: ignore[attr-defined]
        chunks = [[row["x"] for row in rows] async for rows in tx.fetch_chunks(TEN_ROWS, size=3)]
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert [x for c in chunks for x in c] == list(range(1, 11))
