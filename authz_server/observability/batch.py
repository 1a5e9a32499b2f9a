"""A bounded write-behind queue: records from the request path reach the store in batches.

`put` is called from any thread (the core loop's Check and access-log stream, the hashing threads),
never blocks and never raises; when the queue is full the record is dropped and
counted, so a slow or unreachable store cannot stall Check or the access-log
stream. The writer runs on the event loop and drains the queue every
`interval` seconds: no cross-thread wake-up per record.

A write that fails because the store is unreachable (a StoreError or an OSError) is retried:
the batch is kept in memory and written again after an exponential, capped and jittered backoff,
before anything queued after it (order is kept), while new records go on queueing up to `maxsize`.
A write the store does not answer within `write_timeout` (a partition sends no error) fails too.
Retrying is safe because each write is idempotent: an audit event or usage record carries a uid
made with it and the store keeps one row per uid (so a batch whose commit reply was lost, or whose
abandoned attempt finished late, is not stored twice); an override's status is set, not added.
A write the store refuses (StoreRefused, InvalidInput, Conflict, or any other error) would fail
again: the batch is then written one record at a time, and only the records refused alone are
dropped. Every drop is counted (`dropped`) and logged with its count; `retries` counts failed attempts that were retried.

With a `spool` (observability/spool.py), what is in memory while the store is down moves to a
local file every `interval` (the batch being retried first), and is written back, before anything
newer, when the store answers; past the spool's bound records are dropped, counted and logged.
A file that cannot be written keeps the records in memory, as without a spool.

On cancel (a stopping sidecar), the writer goes on retrying for up to `settle` seconds, or, with a
spool, until nothing is left in memory (the next start replays the file); what is still in memory
then is counted as dropped and logged.

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
from authz_server.observability.spool import Spool

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_FIRST = 0.05  # seconds before the first retry; doubled per failure
RETRY_CAP = 5.0  # the longest wait between two attempts
SETTLE = 5.0  # how long a stopping writer goes on retrying before it counts the rest as dropped
WRITE_TIMEOUT = 5.0  # a write not answered by then counts as failed (a partition sends no error)


class WriteTimeout(StoreError):
    """The store did not answer a write in time: treated as unreachable, so the batch is retried."""


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
        write_timeout: float = WRITE_TIMEOUT,
        spool: Spool[T] | None = None,
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
        self._bounded = Bounded(write_timeout)
        self._spool = spool
        self._spill_failed = False
        self._next_attempt = 0.0
        self._unreadable_seen = 0
        self._failures = 0  # consecutive failed attempts; 0 when the last write succeeded
        self._failing_since = 0.0
        self._reported_drops = 0
        self.dropped = 0
        self.written = 0
        self.retries = 0
        self.spilled = 0  # records written to the spool (each is also counted in `written` once in the store)

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
        writing what is queued (`drain`). With a spool, first adopt what earlier runs left on disk."""
        try:
            if self._spool is not None:
                await finish_even_if_cancelled(asyncio.to_thread(self._spool.adopt))  # replayed by the first flush
                self._count_unreadable(self._spool)
            while True:
                await asyncio.sleep(self._interval)
                if self._failures and time.monotonic() < self._next_attempt:
                    if self._spool is not None:  # not yet time to retry: move what is in memory to disk
                        await finish_even_if_cancelled(self._spill())
                    continue
                await finish_even_if_cancelled(self.flush())
                self._report_drops()
        except asyncio.CancelledError:
            await self.drain(self._settle)
            if self._spool is not None:
                self._spool.close()  # what it holds stays on disk, for the next start
            raise

    async def flush(self) -> bool:
        """Write everything queued now (after what is spooled), in batches; stop at the first failure
        the store may recover from, keeping that batch (in memory, or on disk with a spool) for the
        next attempt. True when everything was written."""
        spool = self._spool
        while True:
            if spool is not None and spool.pending:
                await self._spill()  # what is in memory goes after what is on disk
                if not await self._replay(spool):
                    return False
                continue
            if not self._pending:
                if not self._queue:
                    return True
                self._pending = self._take()
                continue
            if not await self._write():
                if spool is not None:
                    await self._spill()
                return False

    async def drain(self, seconds: float) -> None:
        """Write everything queued, retrying with backoff for up to `seconds` (a stopping sidecar).
        With a spool, stop as soon as nothing is left in memory: the rest is on disk, for the next
        start; when the last write had failed, it goes to disk without trying the store again. What
        is still in memory at the end is counted as dropped and logged."""
        deadline = time.monotonic() + seconds
        done = False
        if self._spool is not None and self._failures:
            await self._spill()  # the store is failing now: straight to disk, without waiting on it again
            done = not self.depth
        while not done and not await self.flush():
            left = deadline - time.monotonic()
            if left <= 0 or (self._spool is not None and not self.depth):
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
        if self._spool is not None and self._spool.pending:
            log.warning("records left on disk for the next start: the store is unreachable",
                        extra={"queue": self.name, "bytes": self._spool.bytes, "spool": str(self._spool.directory)})
        self._report_drops()

    @property
    def spooled_bytes(self) -> int:
        return 0 if self._spool is None else self._spool.bytes

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

    async def _spill(self) -> None:
        """Move what is in memory (the batch held for a retry first) to the spool, batch by batch.
        Past the spool's bound the batch is dropped, counted and logged; when the disk cannot be
        written at all, the records stay in memory."""
        spool = self._spool
        assert spool is not None
        while self._pending or self._queue:
            if not self._pending:
                self._pending = self._take()
                continue
            records = self._pending
            try:
                kept = await asyncio.to_thread(spool.append, records)
            except OSError as exc:
                if not self._spill_failed:
                    self._spill_failed = True
                    log.error("cannot spill to disk; records stay in memory",
                              extra={"queue": self.name, "spool": str(spool.directory), "error": str(exc)})
                return
            self._spill_failed = False
            self._pending = []
            if kept:
                self.spilled += kept
            else:
                self.dropped += len(records)
                self._reported_drops += len(records)
                log.error("records dropped: the spool is full",
                          extra={"queue": self.name, "count": len(records), "max_bytes": spool.max_bytes})

    async def _replay(self, spool: Spool[T]) -> bool:
        """Write what is spooled to the store, oldest first; False when the store failed again."""
        while spool.pending:
            records, ends = await asyncio.to_thread(spool.read, self._batch)
            self._count_unreadable(spool)
            if not records:
                continue  # unreadable lines were skipped
            left = await self._store(records)
            done = len(records) - len(left)
            if done:
                await asyncio.to_thread(spool.consumed, ends[done - 1])
            if left:
                return False
        return True

    def _count_unreadable(self, spool: Spool[T]) -> None:
        """Records the spool could not read back (a torn write before a crash) are drops too."""
        lost = spool.unreadable - self._unreadable_seen
        if lost:
            self._unreadable_seen = spool.unreadable
            self.dropped += lost
            self._reported_drops += lost
            log.error("records dropped: unreadable in the spool", extra={"queue": self.name, "count": lost})

    async def _write(self) -> bool:
        """Write the pending batch; False when it failed and is kept for a retry."""
        self._pending = await self._store(self._pending)
        return not self._pending

    async def _store(self, records: list[T]) -> list[T]:
        """Write `records`; return those left unwritten because the store is unreachable."""
        try:
            await self._attempt(records)
        except Exception as exc:  # noqa: BLE001 - a store outage must not kill the writer
            if transient(exc):
                self._failed(exc, len(records))
                return records
            return await self._store_each(records, exc)
        self._written(len(records))
        return []

    async def _store_each(self, records: list[T], refused: Exception) -> list[T]:
        """The store refused the batch: write its records one by one, dropping only those refused alone."""
        lost = 0
        for i, record in enumerate(records):
            try:
                await self._attempt([record])
            except Exception as exc:  # noqa: BLE001 - as above
                if transient(exc):
                    self._refused(lost, refused)
                    self._failed(exc, len(records) - i)
                    return records[i:]
                lost += 1
                refused = exc
            else:
                self.written += 1
        self._refused(lost, refused)
        self._written(0)
        return []

    async def _attempt(self, records: list[T]) -> None:
        """One write, bounded in time (`Bounded`): a store that does not answer fails the attempt."""
        await self._bounded(lambda: self._write_batch(records))

    def _refused(self, lost: int, exc: Exception) -> None:
        if lost:
            self.dropped += lost
            self._reported_drops += lost
            log.warning("records dropped: the store refused them",
                        extra={"queue": self.name, "count": lost, "error": type(exc).__name__, "detail": str(exc)[:200]})

    def _written(self, count: int) -> None:
        self.written += count
        if self._failures:
            log.warning("store writes resumed", extra={"queue": self.name, "retries": self._failures,
                                                        "seconds": round(time.monotonic() - self._failing_since, 3)})
            self._failures = 0

    def _failed(self, exc: Exception, count: int) -> None:
        if not self._failures:
            self._failing_since = time.monotonic()
            log.warning("batch write failed; kept and retried",
                        extra={"queue": self.name, "count": count, "error": type(exc).__name__})
        self._failures += 1
        self.retries += 1
        self._next_attempt = time.monotonic() + self._backoff()

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


class Bounded:
    """Store writes awaited for at most `timeout` seconds each, and at most one in flight.

    A write not answered in time (a partition sends no error) fails with WriteTimeout, but is left
    running: cancelling it could leave the connection inside a transaction (SQLite's), and awaiting
    its end could hang as long as the store is silent. Until it ends, every further write fails at
    once without starting, so a long outage piles up no attempts. Should the abandoned write commit
    after all, a retry adds nothing twice: records carry uids (models.new_uid)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._abandoned: asyncio.Future[None] | None = None

    async def __call__(self, write: Callable[[], Awaitable[None]]) -> None:
        if self._abandoned is not None:
            if not self._abandoned.done():
                raise WriteTimeout("The store has not yet answered an earlier write.")
            self._abandoned = None
        attempt = asyncio.ensure_future(write())
        done, _ = await asyncio.wait({attempt}, timeout=self.timeout)
        if not done:
            self._abandoned = attempt
            attempt.add_done_callback(_consume)
            raise WriteTimeout(f"The store did not answer a write within {self.timeout:g} s.")
        attempt.result()


def _consume(task: asyncio.Future[None]) -> None:
    """Collect an abandoned attempt's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


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
