"""observability/batch.py: write-behind queues batch, flush on cancel (finishing the batch being
written), retry a batch the store could not take (in order, with backoff), count what they lose,
and go on after an item or a record that cannot be converted or stored."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from authz_server.errors import Conflict, InvalidInput, StoreError, StoreRefused
from authz_server.observability.batch import BatchWriter, transient

from ..fakes import Sink


async def test_batch_writer_batches_and_flushes_on_cancel() -> None:
    sink = Sink()
    writer: BatchWriter[int] = BatchWriter("t", sink.write, maxsize=100, batch=10)
    for i in range(25):
        writer.put(i)
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.05)
    writer.put(99)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r for b in sink.batches for r in b] == [*range(25), 99]
    assert max(len(b) for b in sink.batches) <= 10
    assert (writer.written, writer.dropped, writer.depth) == (26, 0, 0)


async def test_batch_writer_counts_what_it_loses() -> None:
    sink = Sink(fail=True)
    writer: BatchWriter[int] = BatchWriter("t", sink.write, maxsize=3)
    for i in range(5):
        writer.put(i)  # 2 beyond the bound
    assert writer.dropped == 2
    assert not await writer.flush()  # the store is down: the batch is kept for a retry, not lost
    assert (writer.written, writer.dropped, writer.depth, writer.retries, writer.failing) == (0, 2, 3, 1, True)
    await writer.drain(0.05)  # still down when the bound is up: counted, not silently lost
    assert (writer.written, writer.dropped, writer.depth) == (0, 5, 0)


class Flaky:
    """A store that fails its first `failures` writes as an unreachable one does, then recovers."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionResetError("store down")
        self.calls = 0
        self.written: list[int] = []

    async def write(self, records: Sequence[int]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        self.written.extend(records)


async def test_a_failed_batch_is_retried_with_backoff_in_order_and_nothing_is_lost() -> None:
    store = Flaky(failures=4, error=StoreError("The PostgreSQL store failed: ConnectionDoesNotExistError"))
    writer: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=100, batch=3, interval=0.001,
                                           retry_first=0.01, retry_cap=0.02)
    task = asyncio.create_task(writer.run())
    for i in range(10):
        writer.put(i)
        await asyncio.sleep(0.003)  # records keep arriving while the store is down
    for _ in range(200):
        if writer.depth == 0 and not writer.failing:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.written == list(range(10))
    assert (writer.written, writer.dropped, writer.retries, writer.failing) == (10, 0, 4, False)


async def test_a_stopping_writer_waits_for_the_store_to_come_back() -> None:
    store = Flaky(failures=3)
    writer: BatchWriter[int] = BatchWriter("audit", store.write, maxsize=100, interval=0.001,
                                           retry_first=0.01, retry_cap=0.02, settle=5.0)
    for i in range(7):
        writer.put(i)
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0)
    task.cancel()  # the sidecar stops while the store is down
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.written == list(range(7))
    assert (writer.written, writer.dropped, writer.depth, writer.retries) == (7, 0, 0, 3)


async def test_records_past_the_memory_bound_are_dropped_and_counted_while_the_store_is_down() -> None:
    store = Flaky(failures=1)
    writer: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=4, batch=2)
    for i in range(2):
        writer.put(i)
    assert not await writer.flush()  # 0, 1 held for the retry
    for i in range(2, 9):
        writer.put(i)  # 4 queue, 3 past the bound
    assert (writer.depth, writer.dropped) == (6, 3)
    assert await writer.flush()
    assert store.written == [0, 1, 2, 3, 4, 5]
    assert (writer.written, writer.dropped, writer.retries) == (6, 3, 1)


async def test_a_batch_the_store_refuses_is_not_retried_and_costs_only_the_refused_records() -> None:
    written: list[int] = []

    async def write(records: Sequence[int]) -> None:
        if 3 in records:
            raise StoreRefused("The SQLite store refused a write: CHECK constraint failed.")
        written.extend(records)

    writer: BatchWriter[int] = BatchWriter("usage", write, maxsize=100, batch=5)
    for i in range(7):
        writer.put(i)
    assert await writer.flush()
    assert written == [0, 1, 2, 4, 5, 6]
    assert (writer.written, writer.dropped, writer.retries, writer.depth) == (6, 1, 0, 0)


def test_only_an_unreachable_store_is_retried() -> None:
    assert transient(ConnectionResetError()) and transient(TimeoutError()) and transient(StoreError("down"))
    assert not transient(StoreRefused("no")) and not transient(InvalidInput("bad")) and not transient(Conflict("dup"))
    assert not transient(ValueError("bug"))


async def test_an_item_that_cannot_be_converted_costs_only_itself() -> None:
    sink = Sink()

    def convert(item: int) -> int | None:
        if item == 3:
            raise ValueError("corrupt")
        return None if item == 4 else item * 10

    writer: BatchWriter[int] = BatchWriter("t", sink.write, maxsize=100, batch=4, convert=convert)
    for i in range(8):
        writer.put(i)
    await writer.flush()
    assert [r for b in sink.batches for r in b] == [0, 10, 20, 50, 60, 70]
    assert (writer.written, writer.dropped, writer.depth) == (6, 1, 0)
    writer.put(1)
    await writer.flush()  # the writer goes on after a bad item
    assert writer.written == 7


async def test_a_writer_cancelled_mid_write_finishes_that_batch_first() -> None:
    """A stopping sidecar cancels its writers: the batch being written must still be written (and
    counted), not dropped with the cancelled coroutine."""
    started, release = asyncio.Event(), asyncio.Event()
    written: list[int] = []

    async def slow_write(records: Sequence[int]) -> None:
        started.set()
        await release.wait()
        written.extend(records)

    writer: BatchWriter[int] = BatchWriter("t", slow_write, maxsize=100, batch=3, interval=0.001)
    for i in range(5):
        writer.put(i)
    task = asyncio.create_task(writer.run())
    await started.wait()  # the first batch (0, 1, 2) is off the queue, being written
    task.cancel()
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert written == [0, 1, 2, 3, 4]
    assert (writer.written, writer.dropped, writer.depth) == (5, 0, 0)


async def test_last_used_cancelled_mid_flush_finishes_that_flush() -> None:
    from authz_server.observability.last_used import LastUsed

    started, release = asyncio.Event(), asyncio.Event()
    touched: dict[str, object] = {}

    class SlowStore:
        async def touch_keys(self, keys: dict[str, object]) -> None:
            started.set()
            await release.wait()
            touched.update(keys)

    last_used = LastUsed(SlowStore(), interval=0.001)  # type: ignore[arg-type]
    last_used.mark("k1", 1.0)
    task = asyncio.create_task(last_used.run())
    await started.wait()
    task.cancel()
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(touched) == ["k1"]


class Silent:
    """A store whose first write answers only once released (a partition: no error comes meanwhile);
    it keeps one row per record, as the SQL stores keep one per uid."""

    def __init__(self) -> None:
        self.calls = 0
        self.written: list[int] = []
        self.released = asyncio.Event()

    async def write(self, records: Sequence[int]) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.released.wait()
        self.written.extend(r for r in records if r not in self.written)


async def test_a_write_the_store_never_answers_times_out_and_no_other_starts_until_it_ends() -> None:
    store = Silent()
    writer: BatchWriter[int] = BatchWriter("usage", store.write, maxsize=100, interval=0.001,
                                           retry_first=0.01, retry_cap=0.02, write_timeout=0.05)
    for i in range(5):
        writer.put(i)
    task = asyncio.create_task(writer.run())
    while writer.retries < 3:  # timed out, then retried: each retry fails at once, the first still in flight
        await asyncio.sleep(0.01)
    assert store.calls == 1 and writer.failing and writer.depth == 5
    store.released.set()  # the store answers the first write at last (it commits)
    for _ in range(200):
        if not writer.failing:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.calls == 2  # the retry ran once the abandoned write had ended, and added nothing twice
    assert store.written == list(range(5))
    assert (writer.written, writer.dropped, writer.depth) == (5, 0, 0)


async def test_last_used_gives_up_on_a_silent_store_and_does_not_wait_on_it_again_when_stopping(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from authz_server.observability import last_used as module

    monkeypatch.setattr(module, "WRITE_TIMEOUT", 0.05)
    calls = 0

    class SilentStore:
        async def touch_keys(self, keys: dict[str, object]) -> None:
            nonlocal calls
            calls += 1
            await asyncio.Event().wait()  # never answers

    last_used = module.LastUsed(SilentStore(), interval=0.01)  # type: ignore[arg-type]
    last_used.mark("k1", 1.0)
    task = asyncio.create_task(last_used.run())
    await asyncio.sleep(0.3)  # timed out, kept; later flushes fail at once while the first is unanswered
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1  # one write in flight at most, and no final flush against a failing store
    assert "last_used_at not written" in caplog.text
