"""Write-behind of per-key usage: `last_used_at` is recorded on the request path
in memory only, and flushed to the store every few seconds. `mark` is called from
the core loop's thread (and the hashing threads, for a key's first use); the flush
runs on the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime

from authz_server.observability.batch import finish_even_if_cancelled
from authz_server.store.base import Store

log = logging.getLogger(__name__)


class LastUsed:
    def __init__(self, store: Store, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, key_id: str, now: float) -> None:
        with self._lock:
            self._pending[key_id] = now

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                await finish_even_if_cancelled(self.flush())  # a cancel must not drop what is being written
        except asyncio.CancelledError:
            await self.flush()
            raise

    async def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            await self._store.touch_keys({k: datetime.fromtimestamp(t, UTC) for k, t in pending.items()})
        except Exception as exc:  # noqa: BLE001 - retried on the next flush
            with self._lock:
                for key_id, t in pending.items():
                    self._pending.setdefault(key_id, t)
            log.warning("last_used_at flush failed", extra={"error": type(exc).__name__})
