"""envoy/health.py: readiness follows whether the store can be reached."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from authz_server.envoy.health import Health


async def test_health_follows_store_reachability() -> None:
    health = Health(store_outage_limit=0.2)
    health.start()
    assert not health.serving and "starting" in health.reason
    follower = SimpleNamespace(last_success=time.monotonic(), last_error="")
    watch = asyncio.create_task(health.watch(follower, interval=0.02))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert health.serving
    follower.last_error = "StoreError"
    await asyncio.sleep(0.3)
    assert not health.serving and "store unreachable" in health.reason and "StoreError" in health.reason
    follower.last_success = time.monotonic()
    await asyncio.sleep(0.05)
    assert health.serving
    watch.cancel()


async def test_draining_says_not_serving_for_good_while_check_still_decides() -> None:
    from grpc_health.v1 import health_pb2

    def status(health: Health) -> int:
        request = health_pb2.HealthCheckRequest(service="")
        return int(health.servicer.Check(request, None).status)  # type: ignore[no-untyped-call]

    health = Health(store_outage_limit=30)
    health.start()
    health.set(True, "ok")
    assert health.ready and status(health) == health_pb2.HealthCheckResponse.SERVING
    health.drain()
    assert health.serving and not health.ready and health.reason.startswith("draining")
    assert status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    # The store watcher goes on: Check follows the store, the health checks stay NOT_SERVING.
    health.set(False, "store unreachable for 31s")
    assert not health.serving and health.reason.startswith("draining")
    health.set(True, "ok")
    assert health.serving and not health.ready
    assert status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    health.drain()  # idempotent
    assert not health.ready
