"""A bounded write-behind queue: records from the request path reach the store in batches.

`put` is called from any thread (the core loop's Check and access-log stream, the hashing threads),
never blocks and never raises; when the queue is full the record is dropped and
counted, so a slow or unreachable store cannot stall Check or the access-log
stream. The writer runs on the event loop and drains the queue every
`interval` seconds: no cross-thread wake-up per record. Failed writes are
counted as dropped too: the counters say exactly what was lost.

With `convert`, what is put is raw (an access-log entry as Envoy sent it) and becomes a record
only when the writer takes it, so the conversion costs the event loop's thread, not the caller's.
`convert` returns None for an item that makes no record (counted by whoever converts, not here);
an item it fails on is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchWriter(Generic[T]):
    def __init__(
        self,
        name: str,
        write: Callable[[Sequence[T]], Awaitable[None]],
        maxsize: int,
        batch: int = 500,
        interval: float = 0.1,
        convert: Callable[[Any], T | None] | None = None,
    ) -> None:
        self.name = name
        self._write_batch = write
        self._queue: deque[Any] = deque()  # append and popleft are atomic: safe across threads
        self._maxsize = maxsize
        self._batch = batch
        self._interval = interval
        self._convert = convert
        self.dropped = 0
        self.written = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def put(self, record: Any) -> None:
        # Two threads racing here may overshoot the bound by one each; the bound is about memory, not exactness.
        if len(self._queue) >= self._maxsize:
            self.dropped += 1
        else:
            self._queue.append(record)

    async def run(self) -> None:
        """Write batches until cancelled; on cancel, finish the batch being written, then flush what is queued."""
        try:
            while True:
                await asyncio.sleep(self._interval)
                await finish_even_if_cancelled(self.flush())
        except asyncio.CancelledError:
            await self.flush()
            raise

    async def flush(self) -> None:
        """Write everything queued now, in batches."""
        while self._queue:
            await self._write()

    async def _write(self) -> None:
        items: list[Any] = []
        queue = self._queue
        while queue and len(items) < self._batch:
            items.append(queue.popleft())
        records = items if self._convert is None else self._converted(items)
        if not records:
            return
        try:
            await self._write_batch(records)
            self.written += len(records)
        except Exception as exc:  # noqa: BLE001 - a store outage must not kill the writer
            self.dropped += len(records)
            log.warning("batch write failed; records dropped",
                        extra={"queue": self.name, "count": len(records), "error": type(exc).__name__})

    def _converted(self, items: list[Any]) -> list[T]:
        convert = self._convert
        assert convert is not None
        records: list[T] = []
        failed: Exception | None = None
        for item in items:
            try:
                record = convert(item)
            except Exception as exc:  # noqa: BLE001 - one bad item must not cost the batch or the writer
                self.dropped += 1
                failed = exc
                continue
            if record is not None:
                records.append(record)
        if failed is not None:
            log.warning("items dropped: cannot convert", extra={"queue": self.name, "error": type(failed).__name__})
        return records


async def finish_even_if_cancelled(work: Awaitable[None]) -> None:
    """Await `work` to its end, even when the caller is cancelled meanwhile (then re-raise the cancel).

    A writer cancelled in the middle of a write would otherwise abandon the records it had taken
    off its queue: neither written nor counted as dropped (a stopping sidecar cancels its writers).
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
