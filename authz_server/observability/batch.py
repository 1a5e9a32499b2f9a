"""A bounded write-behind queue: records from the request path reach the store in batches.

`put` is called from any thread (the core loop's Check and access-log stream, the hashing threads),
never blocks and never raises; when the queue is full the record is dropped and
counted, so a slow or unreachable store cannot stall Check or the access-log
stream. The writer runs on the event loop and drains the queue every
`interval` seconds: no cross-thread wake-up per record.

A write that fails because the store is unreachable (a StoreError or an OSError) is retried:
the batch is kept in memory and written again after an exponential, capped and jittered backoff,
before anything queued after it (order is kept), while new records go on queueing up to `maxsize`.
Retrying is safe because each write function writes its batch in one transaction (a failed
transaction wrote nothing) or is idempotent (an override's status). A write the store refuses
(StoreRefused, InvalidInput, Conflict, or any other error) would fail again: the batch is then
written one record at a time, and only the records refused alone are dropped. Every drop is
counted (`dropped`) and logged with its count; `retries` counts failed attempts that were retried.

On cancel (a stopping sidecar), the writer goes on retrying for up to `settle` seconds; what is
still unwritten then is counted as dropped and logged.

With `convert`, what is put is raw (an access-log entry as Envoy sent it) and becomes a record
only when the writer takes it, so the conversion costs the event loop's thread, not the caller's.
`convert` returns None for an item that makes no record (counted by whoever converts, not here);
an item it fails on is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from authz_server.errors import StoreError, StoreRefused

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_FIRST = 0.05  # seconds before the first retry; doubled per failure
RETRY_CAP = 5.0  # the longest wait between two attempts
SETTLE = 10.0  # how long a stopping writer goes on retrying before it counts the rest as dropped


def transient(exc: BaseException) -> bool:
    """Whether writing the same again may succeed: the store was unreachable, not refusing."""
    return isinstance(exc, OSError) or (isinstance(exc, StoreError) and not isinstance(exc, StoreRefused))


class BatchWriter(Generic[T]):
    def __init__(
        self,
        name: str,
        write: Callable[[Sequence[T]], Awaitable[None]],
        maxsize: int,
        batch: int = 500,
        interval: float = 0.1,
        convert: Callable[[Any], T | None] | None = None,
        *,
        retry_first: float = RETRY_FIRST,
        retry_cap: float = RETRY_CAP,
        settle: float = SETTLE,
    ) -> None:
        self.name = name
        self._write_batch = write
        self._queue: deque[Any] = deque()  # append and popleft are atomic: safe across threads
        self._pending: list[T] = []  # a batch taken off the queue whose write failed: written first
        self._maxsize = maxsize
        self._batch = batch
        self._interval = interval
        self._convert = convert
        self._retry_first = retry_first
        self._retry_cap = retry_cap
        self._settle = settle
        self._failures = 0  # consecutive failed attempts; 0 when the last write succeeded
        self._failing_since = 0.0
        self._reported_drops = 0
        self.dropped = 0
        self.written = 0
        self.retries = 0

    @property
    def depth(self) -> int:
        """Records not yet written: queued, and held for a retry."""
        return len(self._queue) + len(self._pending)

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def put(self, record: Any) -> None:
        # Two threads racing here may overshoot the bound by one each; the bound is about memory, not exactness.
        if len(self._queue) >= self._maxsize:
            self.dropped += 1
        else:
            self._queue.append(record)

    async def run(self) -> None:
        """Write batches until cancelled; on cancel, finish the batch being written, then go on
        writing (retrying for up to `settle` seconds) what is queued."""
        try:
            while True:
                await asyncio.sleep(self._backoff() if self._failures else self._interval)
                await finish_even_if_cancelled(self.flush())
                self._report_drops()
        except asyncio.CancelledError:
            await self.drain(self._settle)
            raise

    async def flush(self) -> bool:
        """Write everything queued now, in batches; stop at the first failure the store may recover
        from, keeping that batch for the next attempt. True when everything was written."""
        while self._pending or self._queue:
            if not self._pending:
                self._pending = self._take()
                if not self._pending:
                    continue
            if not await self._write():
                return False
        return True

    async def drain(self, seconds: float) -> None:
        """Write everything queued, retrying with backoff for up to `seconds`; then count what is
        left as dropped and log it (a stopping sidecar)."""
        deadline = time.monotonic() + seconds
        while not await self.flush():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(self._backoff(), left))
        lost = self.depth
        if lost:
            self._pending = []
            self._queue.clear()
            self.dropped += lost
            self._reported_drops += lost  # logged here, not again below
            log.error("records dropped: the store stayed unreachable while stopping",
                      extra={"queue": self.name, "count": lost, "seconds": seconds})
        self._report_drops()

    def _backoff(self) -> float:
        """Exponential in the consecutive failures, capped, with full jitter on its upper half."""
        ceiling = min(self._retry_cap, self._retry_first * 2.0 ** min(self._failures - 1, 30))
        return ceiling / 2 + random.random() * ceiling / 2  # noqa: S311 - jitter, not a secret

    def _take(self) -> list[T]:
        items: list[Any] = []
        queue = self._queue
        while queue and len(items) < self._batch:
            items.append(queue.popleft())
        return items if self._convert is None else self._converted(items)

    async def _write(self) -> bool:
        """Write the pending batch; False when it failed and is kept for a retry."""
        records = self._pending
        try:
            await self._write_batch(records)
        except Exception as exc:  # noqa: BLE001 - a store outage must not kill the writer
            if transient(exc):
                return self._failed(exc, len(records))
            return await self._write_each(exc)
        self._written(len(records))
        return True

    async def _write_each(self, refused: Exception) -> bool:
        """The store refused the batch: write its records one by one, dropping only those refused alone."""
        lost = 0
        while self._pending:
            record = self._pending[0]
            try:
                await self._write_batch([record])
            except Exception as exc:  # noqa: BLE001 - as above
                if transient(exc):
                    return self._failed(exc, len(self._pending))
                lost += 1
                refused = exc
            else:
                self.written += 1
            self._pending.pop(0)
        if lost:
            self.dropped += lost
            log.warning("records dropped: the store refused them",
                        extra={"queue": self.name, "count": lost, "error": type(refused).__name__,
                               "detail": str(refused)[:200]})
        self._written(0)
        return True

    def _written(self, count: int) -> None:
        self.written += count
        self._pending = []
        if self._failures:
            log.warning("store writes resumed", extra={"queue": self.name, "retries": self._failures,
                                                        "seconds": round(time.monotonic() - self._failing_since, 3)})
            self._failures = 0

    def _failed(self, exc: Exception, count: int) -> bool:
        if not self._failures:
            self._failing_since = time.monotonic()
            log.warning("batch write failed; kept and retried",
                        extra={"queue": self.name, "count": count, "error": type(exc).__name__})
        self._failures += 1
        self.retries += 1
        return False

    def _report_drops(self) -> None:
        """Log how many records the queue dropped since the last report (`put` drops on the
        callers' threads without a word: logging there would flood)."""
        new = self.dropped - self._reported_drops
        if new:
            self._reported_drops = self.dropped
            log.warning("records dropped", extra={"queue": self.name, "count": new, "total": self.dropped,
                                                  "depth": self.depth})

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


async def finish_even_if_cancelled(work: Awaitable[object]) -> None:
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
