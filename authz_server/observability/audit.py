"""The audit queue: security events from Check reach the store without blocking it.

`record` never awaits and never raises; when the bounded queue is full the
event is dropped and counted (`dropped`), so a store outage cannot stall Check.
"""

from __future__ import annotations

import asyncio
import logging

from authz_server.models import AuditEvent
from authz_server.store.base import Store

log = logging.getLogger(__name__)


class AuditQueue:
    def __init__(self, store: Store, maxsize: int, batch: int = 500) -> None:
        self._store = store
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(maxsize)
        self._batch = batch
        self.dropped = 0
        self.written = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def record(self, event: AuditEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        """Write batches until cancelled; on cancel, flush what is queued."""
        try:
            while True:
                events = [await self._queue.get()]
                await self._write(events)
        except asyncio.CancelledError:
            await self.flush()
            raise

    async def flush(self) -> None:
        await self._write([])

    async def _write(self, events: list[AuditEvent]) -> None:
        while not self._queue.empty() and len(events) < self._batch:
            events.append(self._queue.get_nowait())
        if not events:
            return
        try:
            await self._store.append_audit(events)
            self.written += len(events)
        except Exception as exc:  # noqa: BLE001 - a store outage must not kill the writer
            self.dropped += len(events)
            log.warning("audit write failed; events dropped", extra={"count": len(events), "error": type(exc).__name__})
