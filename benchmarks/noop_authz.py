"""A no-op ext_authz server: every Check is a constant OK. The floor for any Python sidecar.

    python -m benchmarks.noop_authz --port 9001 --mode aio|sync|uvloop|loop [--threads 4]

- `aio`: grpc.aio on asyncio's default loop (what mcp-authz uses);
- `uvloop`: the same grpc.aio server with uvloop as the event loop;
- `sync`: the classic grpc.server with a ThreadPoolExecutor of `--threads` workers;
- `loop`: Check on mcp-authz's core loop (authz_server/envoy/core_loop.py), one thread straight off
  gRPC core's completion queue; health on the `sync` server's threads, as in mcp-authz.

It serves `envoy.service.auth.v3.Authorization/Check` and `grpc.health.v1.Health` (SERVING), as
Envoy's health checks need. The request is parsed (as any real servicer's is); the response is
one prebuilt message. No access-log service: configurations that use this have none.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from authz_server.envoy.core_loop import CoreLoop

OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
)
SERVING = health_pb2.HealthCheckResponse.SERVING
CHECK = "/envoy.service.auth.v3.Authorization/Check"


class AioNoop(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request: external_auth_pb2.CheckRequest, context: object) -> external_auth_pb2.CheckResponse:  # noqa: N802
        return OK


class SyncNoop(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(self, request: external_auth_pb2.CheckRequest, context: object) -> external_auth_pb2.CheckResponse:  # noqa: N802
        return OK


async def serve_aio(address: str) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AioNoop(), server)
    checker = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"cannot listen on {address}")
    await checker.set("", SERVING)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def serve_sync(address: str, threads: int, loop: bool = False) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    check_loop = None
    if loop:  # Check on mcp-authz's core loop, the rest on the thread pool, as mcp-authz does
        ok = OK.SerializeToString()
        check_loop = CoreLoop(server)
        check_loop.unary(CHECK, external_auth_pb2.CheckRequest.FromString, lambda _request, respond: respond(ok))
    else:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(SyncNoop(), server)
    checker = health.HealthServicer()
    checker.set("", SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"cannot listen on {address}")
    server.start()
    if check_loop is not None:
        check_loop.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=0.5).wait()
    if check_loop is not None:
        check_loop.close()


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("aio", "sync", "uvloop", "loop"), default="aio")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    address = f"127.0.0.1:{args.port}"
    if args.mode == "sync":
        serve_sync(address, args.threads)
    elif args.mode == "loop":
        serve_sync(address, args.threads, loop=True)
    elif args.mode == "uvloop":
        import uvloop

        uvloop.run(serve_aio(address))
    else:
        asyncio.run(serve_aio(address))


if __name__ == "__main__":
    main()
