"""Stage 5: per-principal usage limits (a token bucket per principal, per replica)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from authz_server.errors import Denied, Reason
from authz_server.models import Principal


class RateLimiter:
    """`rate_limit_per_minute` requests a minute, with a burst of the same size."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # principal id -> (tokens, last refill)
        self._clock = clock

    def check(self, principal: Principal) -> None:
        limit = principal.rate_limit_per_minute
        if not limit:
            return
        now = self._clock()
        rate = limit / 60.0
        tokens, last = self._buckets.get(principal.id, (float(limit), now))
        tokens = min(float(limit), tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[principal.id] = (tokens, now)
            raise Denied(Reason.RATE_LIMITED, retry_after=max(1, math.ceil((1.0 - tokens) / rate)))
        self._buckets[principal.id] = (tokens - 1.0, now)
