"""observability/spool.py with the write-behind queue: past a failing store, records go to a local
file (0600, fsynced) instead of being dropped; they reach the store, in order and once, when it
is back or at the next start; past the disk bound they are dropped and counted."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from authz_server.models import (
    AuditEvent,
    UsageRecord,
    audit_from_json,
    audit_to_json,
    status_from_json,
    status_to_json,
    usage_from_json,
    usage_to_json,
)
from authz_server.observability.batch import BatchWriter
from authz_server.observability.spool import Spool


def _spool(path: Path, max_bytes: int = 1 << 20) -> Spool[int]:
    return Spool(path, "usage", lambda r: r, int, max_bytes)


class Store:
    """Fails while `down`, as an unreachable store does."""

    def __init__(self) -> None:
        self.down = False
        self.written: list[int] = []

    async def write(self, records: Sequence[int]) -> None:
        if self.down:
            raise ConnectionResetError("store down")
        self.written.extend(records)


async def test_past_a_failing_store_records_are_spilled_then_replayed_in_order_once(tmp_path: Path) -> None:
    store = Store()
    store.down = True
    writer: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=100, batch=2, interval=0.001,
                                           retry_first=0.01, retry_cap=0.02, spool=_spool(tmp_path / "spool"))
    task = asyncio.create_task(writer.run())
    for i in range(40):
        writer.put(i)
        await asyncio.sleep(0.002)
    assert writer.spilled > 0 and writer.dropped == 0
    files = list((tmp_path / "spool").glob("usage.*.jsonl"))
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    store.down = False
    for _ in range(300):
        if writer.depth == 0 and not writer.spooled_bytes and not writer.failing:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.written == list(range(40))
    assert (writer.written, writer.dropped) == (40, 0)
    assert list((tmp_path / "spool").iterdir()) == []  # replayed files are deleted


async def test_a_stop_during_an_outage_leaves_the_records_on_disk_for_the_next_start(tmp_path: Path) -> None:
    store = Store()
    store.down = True
    first: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=100, batch=3, interval=0.001,
                                          retry_first=0.01, spool=_spool(tmp_path))
    task = asyncio.create_task(first.run())
    for i in range(10):
        first.put(i)
    await asyncio.sleep(0.02)
    task.cancel()  # SIGTERM while the store is down: nothing is lost, nothing waits for the settle bound
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (first.written, first.dropped, first.depth) == (0, 0, 0) and first.spilled == 10

    store.down = False
    second: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=100, batch=3, interval=0.001,
                                           spool=_spool(tmp_path))
    second.put(10)  # queued by the new process before the old records are replayed: still after them
    task = asyncio.create_task(second.run())
    for _ in range(200):
        if store.written == list(range(11)):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.written == list(range(11))
    assert list(tmp_path.iterdir()) == []


def test_replay_resumes_where_the_store_stopped_and_a_torn_line_is_cut(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    assert spool.append([1, 2, 3, 4]) == 4
    records, ends = spool.read(2)
    assert records == [1, 2]
    spool.consumed(ends[-1])  # the store took 1 and 2, then the process died
    (own,) = tmp_path.glob("usage.*.jsonl")
    with own.open("ab") as f:
        f.write(b"5")  # a crash in the middle of an append
    spool.close()

    later = _spool(tmp_path)
    later.adopt()
    assert later.unreadable == 1  # the torn line, counted
    records, ends = later.read(10)
    assert records == [3, 4]  # not 1 and 2 again, and not the torn line
    later.consumed(ends[-1])
    assert not later.pending and list(tmp_path.iterdir()) == []


def test_a_live_sidecars_spool_is_not_adopted(tmp_path: Path) -> None:
    live = _spool(tmp_path)
    live.append([1])
    other = _spool(tmp_path)
    assert other.adopt() == 0 and not other.pending
    live.close()
    assert other.adopt() > 0 and other.read(10)[0] == [1]


async def test_past_the_disk_bound_records_are_dropped_and_counted(tmp_path: Path) -> None:
    store = Store()
    store.down = True
    writer: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=100, batch=10, spool=_spool(tmp_path, 30))
    for i in range(30):
        writer.put(i)
    assert not await writer.flush()
    assert writer.spilled + writer.dropped == 30 and writer.dropped > 0 and writer.spilled > 0
    assert writer.depth == 0


def test_each_record_has_one_shape_on_disk() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    usage = UsageRecord(at, "req-1", "p_alice", "K1", "github", "search", "tools/call", "allow", "", 200, 10, 20, 1.5)
    audit = AuditEvent(at, "p_alice", "keys.revoke", "K1", "ok", "req-2", {"why": "lost"})
    status = ("p_alice", "github", "upstream 401", at)
    assert usage_from_json(json.loads(json.dumps(usage_to_json(usage)))) == usage
    assert audit_from_json(json.loads(json.dumps(audit_to_json(audit)))) == audit
    assert status_from_json(json.loads(json.dumps(status_to_json(status)))) == status


async def test_a_spool_that_cannot_be_written_keeps_the_records_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = Store()
    store.down = True
    writer: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=100, batch=2,
                                           spool=_spool(blocker / "spool"))  # under a file: cannot be created
    for i in range(5):
        writer.put(i)
    assert not await writer.flush()
    assert (writer.depth, writer.spilled, writer.dropped) == (5, 0, 0)
    store.down = False
    assert await writer.flush()
    assert store.written == list(range(5))


def test_the_spool_defaults_beside_a_sqlite_store_and_per_database_for_postgresql(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from authz_server.config import Settings

    def where(url: str) -> Path | None:
        return Settings(store_url=url).spool_directory()

    assert where("sqlite:////var/lib/mcp/authz.db") == Path("/var/lib/mcp/authz.db.spool")
    assert where("memory://") is None
    assert Settings(store_url="postgresql://db/authz", spool_dir="/spool").spool_directory() == Path("/spool")
    monkeypatch.setenv("XDG_STATE_HOME", "/state")
    pg = where("postgresql://app:s3cret-pw@db:5432/authz?schema=tenant_a")
    assert pg is not None and pg.parent == Path("/state/mcp-authz/spool") and "s3cret" not in str(pg)
    # The same database gives the same directory whoever connects; another database or schema, another.
    assert where("postgresql://other:pw@db:5432/authz?schema=tenant_a") == pg
    others = {where("postgresql://db:5432/authz?schema=tenant_b"), where("postgresql://db:5432/other?schema=tenant_a"),
              where("postgresql://db2:5432/authz?schema=tenant_a")}  # fmt: skip
    assert len(others) == 3 and pg not in others
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", "/home/ops")
    assert str(where("postgresql://db/authz")).startswith("/home/ops/.local/state/mcp-authz/spool/postgres-")


async def test_a_line_that_cannot_be_read_back_is_dropped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "usage.1-dead.jsonl").write_bytes(b"1\n{not json\n2\n")  # left by a sidecar that is gone
    store = Store()
    writer: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=100, interval=0.001, spool=_spool(tmp_path))
    task = asyncio.create_task(writer.run())
    for _ in range(200):
        if store.written == [1, 2]:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.written == [1, 2]
    assert (writer.written, writer.dropped) == (2, 1)
    assert list(tmp_path.iterdir()) == []
