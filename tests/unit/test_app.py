"""app.py, the composed sidecar in process: health before and after the state loads, the operator
port, retention, and TLS files that cannot be used."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import httpx
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authz_server import app
from authz_server.admin.service import Actor, AdminService
from authz_server.config import Settings
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.store.memory import MemoryStore

from ..e2e.harness import free_port
from .fakes import FAST, HeldStore


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=2)
        return reply.status


async def _check(port: int) -> external_auth_pb2.CheckResponse:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method, request.attributes.request.http.path = "POST", "/mcp/x"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply: external_auth_pb2.CheckResponse = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            request, timeout=2)  # fmt: skip
        return reply


async def test_not_serving_until_loaded_then_serving() -> None:
    keyring = Keyring.from_spec(Keyring.generate_spec())
    store = HeldStore()
    await store.migrate()
    await AdminService(store, keyring, KeyHasher(FAST)).initialize(Actor.operator())
    grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
    console_port = free_port()
    settings = Settings.from_env({}, listen=f"127.0.0.1:{grpc_port}", metrics_listen=f"127.0.0.1:{http_port}",
                                 admin_listen=f"127.0.0.1:{admin_port}", console_listen=f"127.0.0.1:{console_port}",
                                 store_url="memory://")
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(settings, keyring, stop=stop, store=store))
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(100):  # the port opens before the state loads
                try:
                    status = await _health(grpc_port)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Check while loading: UNAVAILABLE, which Envoy's retry policy takes to another sidecar.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _check(grpc_port)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            ready = await http.get(f"http://127.0.0.1:{http_port}/readyz")
            assert ready.status_code == 503 and "loading" in ready.json()["reason"]
            # The console serves its pages at once; a sign-in waits for the state, like the admin API.
            console = f"http://127.0.0.1:{console_port}/console"
            assert (await http.get(f"{console}/")).status_code == 200
            early = await http.post(f"{console}/api/session", json={"key": "mgw_x"})
            assert early.status_code == 503 and early.json()["error"]["reason"] == "not_ready"
            assert (await http.get(f"http://127.0.0.1:{http_port}/healthz")).status_code == 200

            store.release.set()
            for _ in range(100):
                if await _health(grpc_port) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            assert await _health(grpc_port) == health_pb2.HealthCheckResponse.SERVING
            assert (await _check(grpc_port)).status.code == 16  # loaded: Check decides (no key: UNAUTHENTICATED)
            assert await _health(admin_port) == health_pb2.HealthCheckResponse.SERVING  # the admin listener's
            assert (await http.get(f"http://127.0.0.1:{http_port}/readyz")).status_code == 200
            assert (await http.post(f"{console}/api/session", json={"key": "mgw_x"})).status_code == 401
            text = (await http.get(f"http://127.0.0.1:{http_port}/metrics")).text
            names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
            assert {"mcp_authz_ready", "mcp_authz_entities", "mcp_authz_key_cache_total"} <= names
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_stopped_while_loading_it_never_says_serving_and_does_not_drain() -> None:
    keyring = Keyring.from_spec(Keyring.generate_spec())
    store = HeldStore()
    await store.migrate()
    await AdminService(store, keyring, KeyHasher(FAST)).initialize(Actor.operator())
    grpc_port = free_port()
    settings = Settings.from_env({}, listen=f"127.0.0.1:{grpc_port}", admin_listen=f"127.0.0.1:{free_port()}",
                                 console_listen="",
                                 store_url="memory://", drain_seconds=30)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(settings, keyring, stop=stop, store=store))
    seen = []
    for _ in range(100):  # the port opens before the state loads
        try:
            seen.append(await _health(grpc_port))
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)
    stop.set()  # SIGTERM while the state is still loading
    store.release.set()
    watcher = asyncio.create_task(_watch_health(grpc_port, seen))
    await asyncio.wait_for(task, 5)  # no 30 s drain: Envoy never saw it ready
    watcher.cancel()
    assert seen and health_pb2.HealthCheckResponse.SERVING not in seen, seen


async def _watch_health(port: int, seen: list[int]) -> None:
    while True:
        try:
            seen.append(await _health(port))
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.005)


async def test_retention_prunes_old_audit_and_usage_only() -> None:
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from authz_server.models import AuditEvent, UsageRecord

    store = MemoryStore()
    await store.migrate()
    now = datetime.now(UTC)

    def usage(days: float) -> UsageRecord:
        return UsageRecord(now - timedelta(days=days), "r", "p", "k", "s", "", "", "allow", "", 200, 1, 1, 1.0)

    await store.append_usage([usage(100), usage(1)])
    await store.append_audit([AuditEvent(now - timedelta(days=400), "cli", "keys.revoke", "key:x", "ok"),
                              AuditEvent(now - timedelta(days=2), "cli", "keys.revoke", "key:y", "ok")])
    settings = Settings.from_env({}, store_url="memory://")  # defaults: audit 365 days, usage 90 days
    task = asyncio.create_task(app._retention(SimpleNamespace(settings=settings, store=store)))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    assert [r.at for r in await store.query_usage()] == [now - timedelta(days=1)]
    assert [e.target for e in await store.query_audit()] == ["key:y"]


def test_unusable_tls_files_stop_the_start_with_a_clear_error(tmp_path: Path) -> None:
    from authz_server.config import TlsFiles
    from authz_server.crypto import certs
    from authz_server.errors import ConfigError

    made = certs.write_cert_set(tmp_path / "pki")
    d = made.directory
    good = TlsFiles(str(d / "server.crt"), str(d / "server.key"), str(d / "ca.crt"))
    assert app._credentials(good, "Check listener") is not None
    cases = [
        (TlsFiles(str(d / "missing.crt"), str(d / "server.key"), str(d / "ca.crt")), "Cannot read"),
        (TlsFiles(str(d / "server.crt"), str(d / "server.key"), str(tmp_path / "notes.txt")), "not a PEM file"),
    ]
    (tmp_path / "notes.txt").write_text("hello")
    for tls, says in cases:
        with pytest.raises(ConfigError) as refused:
            app._credentials(tls, "Check listener")
        assert says in refused.value.message
    (d / "server.key").chmod(0o644)
    with pytest.raises(ConfigError) as refused:
        app._credentials(good, "Check listener")
    assert "readable by other users" in refused.value.message and "BEGIN" not in refused.value.message


class _RecordingStore(MemoryStore):
    """Counts migrations and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.migrations = 0
        self.closes = 0

    async def migrate(self) -> None:
        self.migrations += 1
        await super().migrate()

    async def close(self) -> None:
        self.closes += 1
        await super().close()


async def _initialised(keyring: Keyring) -> _RecordingStore:
    store = _RecordingStore()
    await store.migrate()
    await AdminService(store, keyring, KeyHasher(FAST)).initialize(Actor.operator())
    store.migrations = 0
    return store


async def test_build_refuses_before_upgrading_anything_and_closes_the_store() -> None:
    """A refused start changes nothing in the store (the schema is upgraded only once the master key
    matches) and closes it, so the process can exit."""
    from authz_server.errors import ConfigError, MasterKeyError

    settings = Settings.from_env({}, store_url="memory://")
    right, wrong = (Keyring.from_spec(Keyring.generate_spec()) for _ in range(2))
    store = await _initialised(right)
    with pytest.raises(MasterKeyError):
        await app.build(settings, wrong, store)
    assert (store.migrations, store.closes) == (0, 1)

    empty = _RecordingStore()
    with pytest.raises(ConfigError, match="not initialised"):
        await app.build(settings, right, empty)
    assert (empty.migrations, empty.closes) == (0, 1)

    store = await _initialised(right)
    sidecar = await app.build(settings, right, store)
    try:
        assert (store.migrations, store.closes) == (1, 0)
    finally:
        sidecar.authenticator.close()
        await sidecar.store.close()


async def test_the_change_log_is_trimmed_to_its_bounds_periodically() -> None:
    store = MemoryStore()
    await store.migrate()
    for i in range(1500):
        await store.ensure_team(f"t{i}", datetime.now(UTC))
    settings = Settings.from_env({"MCP_AUTHZ_CHANGE_LOG_MAX_ROWS": "1000"})
    task = asyncio.create_task(app.trim_change_log(settings, store, every=0.01))
    try:
        for _ in range(200):
            if len(await store.changes_since(0, limit=10_000)) == 1000:
                break
            await asyncio.sleep(0.01)
        assert len(await store.changes_since(0, limit=10_000)) == 1000
        assert await store.oldest_change_seq() == 501
    finally:
        task.cancel()
    off = Settings.from_env({"MCP_AUTHZ_CHANGE_LOG_RETENTION_HOURS": "0", "MCP_AUTHZ_CHANGE_LOG_MAX_ROWS": "0"})
    await asyncio.wait_for(app.trim_change_log(off, store), 1)  # no bounds: returns at once, trims nothing
    assert await store.oldest_change_seq() == 501
