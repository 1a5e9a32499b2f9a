"""A bounded write-behind queue: records from the request path reach the store in batches.

`put` never awaits and never raises; when the queue is full the record is
dropped and counted, so a slow or unreachable store cannot stall Check or the
access-log stream. Failed writes are counted as dropped too: the counters say
exactly what was lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchWriter(Generic[T]):
    def __init__(self, name: str, write: Callable[[Sequence[T]], Awaitable[None]], maxsize: int, batch: int = 500) -> None:
        self.name = name
        self._write_batch = write
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self._batch = batch
        self.dropped = 0
        self.written = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def put(self, record: T) -> None:
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        """Write batches until cancelled; on cancel, flush what is queued."""
        try:
            while True:
                await self._write([await self._queue.get()])
        except asyncio.CancelledError:
            await self.flush()
            raise

    async def flush(self) -> None:
        while not self._queue.empty():
            await self._write([])

    async def _write(self, records: list[T]) -> None:
        while not self._queue.empty() and len(records) < self._batch:
            records.append(self._queue.get_nowait())
        if not records:
            return
        try:
            await self._write_batch(records)
            self.written += len(records)
        except Exception as exc:  # noqa: BLE001 - a store outage must not kill the writer
            self.dropped += len(records)
            log.warning("batch write failed; records dropped",
                        extra={"queue": self.name, "count": len(records), "error": type(exc).__name__})
