"""Readiness, as Envoy's gRPC health check and the HTTP /readyz see it.

NOT_SERVING until the in-memory state is loaded; SERVING while the state is
current; NOT_SERVING again once the store has been unreachable for longer than
`store_outage_limit` seconds (the state may be stale: revocations could be missed),
and SERVING when it is back.

Draining (on SIGTERM, app.serve): NOT_SERVING for good, at once, so Envoy's health
checks move traffic to other sidecars, while Check still answers whatever still
arrives. So two things are kept apart: `serving` (the state is current: Check
decides) and `ready` (Envoy should send Check here: serving and not draining).
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
        self.serving = False  # the state is loaded and current: Check decides
        self.draining = False  # stopping: Envoy should send nothing more
        self.reason = "starting: loading state"

    @property
    def ready(self) -> bool:
        """What the health checks and /readyz say: Envoy should send Check here."""
        return self.serving and not self.draining

    def start(self) -> None:
        for service in SERVICES:
            self.servicer.set(service, _NOT_SERVING)

    def set(self, serving: bool, reason: str) -> None:
        if serving == self.serving and reason == self.reason:
            return
        self.serving = serving
        if self.draining:  # the health checks say NOT_SERVING from now on, whatever the store does
            return
        self.reason = reason
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

    def drain(self) -> None:
        """NOT_SERVING from now on, to every health check (watchers too); `serving` is left as it is."""
        if self.draining:
            return
        self.draining, self.reason = True, "draining: stopping"
        self.servicer.enter_graceful_shutdown()  # every service NOT_SERVING; later `set`s are ignored
        log.warning("health", extra={"serving": False, "reason": self.reason})
