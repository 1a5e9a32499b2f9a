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
