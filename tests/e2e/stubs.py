"""In-process stand-ins for the sidecar's gRPC services, on one grpc.aio server (as the real one).

`StubSidecar` serves, on one 127.0.0.1 port:

- ``envoy.service.auth.v3.Authorization/Check`` (`RecordingAuthz`): records every
  ``CheckRequest``; allows ``authorization: Bearer ok`` and denies anything else with 401,
  and, like the sidecar, returns ``dynamic_metadata`` for both (``principal``, ``principal_id``,
  ``key_id``, ``server``, ``tool``, ``decision``, ``reason``);
- ``envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`` (`RecordingALS`): records
  every ``StreamAccessLogsMessage`` and can abort the open streams (`kill_streams`);
- ``grpc.health.v1.Health`` (grpcio-health-checking's aio servicer): `set_serving`.

Use it as an async context manager (``async with StubSidecar() as stub: ...``); it always stops.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from .harness import LOOPBACK, free_port

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
ALLOW_HEADERS = {"authorization": "Bearer ok"}
MCP_NAMESPACE = "envoy.filters.http.mcp"
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A protobuf Struct as plain Python (numbers become floats, as in JSON)."""
    return dict(json_format.MessageToDict(struct))


# --------------------------------------------------------------------------- ext_authz


@dataclass
class RecordingAuthz(external_auth_pb2_grpc.AuthorizationServicer):
    """Records CheckRequests; allows ``Bearer ok``, denies the rest with 401; sets dynamic metadata."""

    checks: list[external_auth_pb2.CheckRequest] = field(default_factory=list)

    def mcp_metadata(self, index: int = -1) -> dict[str, Any] | None:
        """``metadata_context.filter_metadata["envoy.filters.http.mcp"]`` of one Check, or None."""
        filter_metadata = self.checks[index].attributes.metadata_context.filter_metadata
        if MCP_NAMESPACE not in filter_metadata:
            return None
        return struct_to_dict(filter_metadata[MCP_NAMESPACE])

    async def Check(  # noqa: N802 (gRPC method name)
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        self.checks.append(request)
        http = request.attributes.request.http
        mcp = self._mcp(request)
        allowed = http.headers.get("authorization") == ALLOW_HEADERS["authorization"]
        metadata = struct_pb2.Struct()
        metadata.update(
            {
                "principal": "alice" if allowed else "",
                "principal_id": "p_alice" if allowed else "",
                "key_id": "k_1" if allowed else "",
                "server": request.attributes.context_extensions.get("mcp_server", ""),
                "tool": mcp.get("params", {}).get("name", "") if isinstance(mcp.get("params"), dict) else "",
                "decision": "allow" if allowed else "deny",
                "reason": "ok" if allowed else "invalid_key",
            }
        )
        if allowed:
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(headers_to_remove=["authorization"]),
                dynamic_metadata=metadata,
            )
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="application/json"), append_action=OVERWRITE
                )
            ],
            body=json.dumps({"error": "invalid_key"}),
        )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.UNAUTHENTICATED), denied_response=denied, dynamic_metadata=metadata
        )

    @staticmethod
    def _mcp(request: external_auth_pb2.CheckRequest) -> dict[str, Any]:
        filter_metadata = request.attributes.metadata_context.filter_metadata
        return struct_to_dict(filter_metadata[MCP_NAMESPACE]) if MCP_NAMESPACE in filter_metadata else {}


# --------------------------------------------------------------------------- access-log service


@dataclass
class AlsStream:
    """One StreamAccessLogs call as the stub saw it."""

    opened_at: float
    messages: list[als_pb2.StreamAccessLogsMessage] = field(default_factory=list)
    kill: asyncio.Event = field(default_factory=asyncio.Event)
    closed_by: str = ""  # "client" (Envoy half-closed), "killed", or "" while open


@dataclass
class RecordingALS(als_pb2_grpc.AccessLogServiceServicer):
    """Records every StreamAccessLogsMessage, stream by stream."""

    streams: list[AlsStream] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def entries(self) -> list[accesslog_pb2.HTTPAccessLogEntry]:
        """Every HTTP entry received so far, over all streams, in arrival order."""
        return [entry for stream in self.streams for msg in stream.messages for entry in msg.http_logs.log_entry]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds (re-checked on every message); TimeoutError otherwise."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(predicate)

    async def kill_streams(self) -> int:
        """Abort every open stream with UNAVAILABLE; returns how many were open."""
        open_streams = [s for s in self.streams if not s.closed_by]
        for stream in open_streams:
            stream.kill.set()
        return len(open_streams)

    async def StreamAccessLogs(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        stream = AlsStream(opened_at=time.monotonic())
        self.streams.append(stream)

        async def read() -> None:
            async for message in request_iterator:
                stream.messages.append(message)
                async with self.changed:
                    self.changed.notify_all()

        reader = asyncio.create_task(read())
        killer = asyncio.create_task(stream.kill.wait())
        try:
            done, _ = await asyncio.wait({reader, killer}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the server stops and cancels this handler
            reader.cancel()
            killer.cancel()
        if reader in done:
            stream.closed_by = "client"
            reader.result()
            return als_pb2.StreamAccessLogsResponse()
        stream.closed_by = "killed"
        await context.abort(grpc.StatusCode.UNAVAILABLE, "stub: stream killed")
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------- the server


class StubSidecar:
    """Authorization + AccessLogService + Health on one grpc.aio server at 127.0.0.1:`port`."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.authz = RecordingAuthz()
        self.als = RecordingALS()
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None

    async def start(self) -> StubSidecar:
        """Serve on `port` (again, after `stop`: same port, same recorders)."""
        # No SO_REUSEPORT (gRPC's default): with it, a port another test process also got from
        # free_port() would be shared silently, and Envoy's health checks could land elsewhere.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.authz, server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.als, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if server.add_insecure_port(f"{LOOPBACK}:{self.port}") == 0:
            raise RuntimeError(f"cannot bind {LOOPBACK}:{self.port}")
        await server.start()
        self.server = server
        await self.set_serving(True)
        return self

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server ("") and for Authorization."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "envoy.service.auth.v3.Authorization"):
            await self.health.set(service, status)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)
            self.server = None

    async def __aenter__(self) -> StubSidecar:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

