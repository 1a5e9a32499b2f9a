"""A bounded write-behind queue: records from the request path reach the store in batches.

`put` is called from any thread (the core loop's Check and access-log stream, the hashing threads),
never blocks and never raises; when the queue is full the record is dropped and
counted, so a slow or unreachable store cannot stall Check or the access-log
stream. The writer runs on the event loop and drains the queue every
`interval` seconds: no cross-thread wake-up per record. Failed writes are
counted as dropped too: the counters say exactly what was lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

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
    ) -> None:
        self.name = name
        self._write_batch = write
        self._queue: deque[T] = deque()  # append and popleft are atomic: safe across threads
        self._maxsize = maxsize
        self._batch = batch
        self._interval = interval
        self.dropped = 0
        self.written = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def put(self, record: T) -> None:
        # Two threads racing here may overshoot the bound by one each; the bound is about memory, not exactness.
        if len(self._queue) >= self._maxsize:
            self.dropped += 1
        else:
            self._queue.append(record)

    async def run(self) -> None:
        """Write batches until cancelled; on cancel, flush what is queued."""
        try:
            while True:
                await asyncio.sleep(self._interval)
                await self.flush()
        except asyncio.CancelledError:
            await self.flush()
            raise

    async def flush(self) -> None:
        """Write everything queued now, in batches."""
        while self._queue:
            await self._write()

    async def _write(self) -> None:
        records: list[T] = []
        queue = self._queue
        while queue and len(records) < self._batch:
            records.append(queue.popleft())
        if not records:
            return
        try:
            await self._write_batch(records)
            self.written += len(records)
        except Exception as exc:  # noqa: BLE001 - a store outage must not kill the writer
            self.dropped += len(records)
            log.warning("batch write failed; records dropped",
                        extra={"queue": self.name, "count": len(records), "error": type(exc).__name__})
