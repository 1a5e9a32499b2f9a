"""Readiness, as Envoy's gRPC health check and the HTTP /readyz see it.

NOT_SERVING until the in-memory state is loaded; SERVING while the state is
current; NOT_SERVING again once the store has been unreachable for longer than
`store_outage_limit` seconds (the state may be stale: revocations could be missed),
and SERVING when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time

from grpc_health.v1 import health, health_pb2

from authz_server.live.follower import StateFollower

log = logging.getLogger(__name__)
SERVICES = ("", "envoy.service.auth.v3.Authorization")
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self, store_outage_limit: float) -> None:
        self.servicer = health.HealthServicer()  # thread-safe; served by the gRPC worker threads
        self._limit = store_outage_limit
        self.serving = False
        self.reason = "starting: loading state"

    def start(self) -> None:
        for service in SERVICES:
            self.servicer.set(service, _NOT_SERVING)

    def set(self, serving: bool, reason: str) -> None:
        if serving == self.serving and reason == self.reason:
            return
        self.serving, self.reason = serving, reason
        for service in SERVICES:
            self.servicer.set(service, _SERVING if serving else _NOT_SERVING)
        log.log(logging.INFO if serving else logging.WARNING, "health", extra={"serving": serving, "reason": reason})

    async def watch(self, follower: StateFollower, interval: float = 0.25) -> None:
        """Follow the store's reachability until cancelled."""
        while True:
            stale_for = time.monotonic() - follower.last_success
            if stale_for > self._limit:
                self.set(False, f"store unreachable for {stale_for:.0f}s: {follower.last_error or 'no answer'}")
            else:
                self.set(True, "ok")
            await asyncio.sleep(interval)

    def stop(self) -> None:
        self.serving, self.reason = False, "stopping"
        self.servicer.enter_graceful_shutdown()
