"""observability/batch.py: write-behind queues batch, flush on cancel (finishing the batch being
written), count what they lose, and go on after an item that cannot be converted."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from authz_server.observability.batch import BatchWriter

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
    await writer.flush()  # the store fails: the 3 queued are counted, not silently lost
    assert (writer.written, writer.dropped) == (0, 5)


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
