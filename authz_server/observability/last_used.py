"""Write-behind of per-key usage: `last_used_at` is recorded on the request path
in memory only, and flushed to the store every few seconds. `mark` is called from
the core loop's thread (and the hashing threads, for a key's first use); the flush
runs on the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime

from authz_server.observability.batch import WRITE_TIMEOUT, Bounded, finish_even_if_cancelled
from authz_server.store.base import Store

log = logging.getLogger(__name__)


class LastUsed:
    def __init__(self, store: Store, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()
        self._failing = False  # the last flush failed
        self._bounded = Bounded(WRITE_TIMEOUT)

    def mark(self, key_id: str, now: float) -> None:
        with self._lock:
            self._pending[key_id] = now

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                await finish_even_if_cancelled(self.flush())  # a cancel must not drop what is being written
        except asyncio.CancelledError:
            if not self._failing:  # a failing store is not waited on again by a stopping sidecar
                await self.flush()
            if self._pending:
                log.warning("last_used_at not written: the store is unreachable while stopping",
                            extra={"count": len(self._pending)})
            raise

    async def flush(self) -> None:
        """Write what was marked since the last flush; kept for the next one if the store fails or
        does not answer within WRITE_TIMEOUT."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            touched = {k: datetime.fromtimestamp(t, UTC) for k, t in pending.items()}
            await self._bounded(lambda: self._store.touch_keys(touched))
        except Exception as exc:  # noqa: BLE001 - retried on the next flush
            with self._lock:
                for key_id, t in pending.items():
                    self._pending.setdefault(key_id, t)
            if not self._failing:
                log.warning("last_used_at flush failed; kept for the next", extra={"error": type(exc).__name__})
            self._failing = True
        else:
            self._failing = False
