"""The pieces a benchmark configuration is made of: Envoy, the real sidecar, no-op sidecars,
the example MCP server; plus warm-up and sanity checks. All on 127.0.0.1 free ports, all
owned by a `ProcessGroup` (so stopped at the end, failure included).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from benchmarks import envoy_config
from benchmarks.procs import (
    BIN,
    LOOPBACK,
    REPO_ROOT,
    BenchError,
    Proc,
    ProcessGroup,
    envoy_binary,
    free_port,
    grpc_serving,
    http_ok,
    wait_until,
)
from benchmarks.seed import World

EXAMPLE_SERVER = REPO_ROOT / "examples" / "mcp_server.py"


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child Python processes: they import this checkout's code."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class Envoy:
    """A running Envoy (one worker) and its admin interface."""

    proc: Proc
    listen_port: int
    admin_port: int
    config_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.listen_port}"

    def stats(self) -> dict[str, int]:
        """Every counter and gauge from /stats (histograms skipped)."""
        text = httpx.get(f"http://{LOOPBACK}:{self.admin_port}/stats", timeout=5).text
        out: dict[str, int] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[key] = int(value)
        return out

    def healthy(self, cluster: str = envoy_config.AUTHZ_CLUSTER) -> bool:
        """True when every endpoint of `cluster` passes Envoy's active health checks."""
        text = httpx.get(f"http://{LOOPBACK}:{self.admin_port}/clusters", timeout=5).text
        flags = [ln.split("::")[3] for ln in text.splitlines()
                 if ln.startswith(cluster + "::") and ln.split("::")[2] == "health_flags"]  # fmt: skip
        return bool(flags) and all(f == "healthy" for f in flags)


def start_envoy(group: ProcessGroup, name: str, config: dict[str, Any], listen_port: int, admin_port: int,
                work_dir: Path, wait_healthy: bool) -> Envoy:
    """Write `config`, start Envoy with one worker (as DESIGN.md's figures), wait for /ready
    and, if `wait_healthy`, for its sidecar cluster to pass health checks."""
    path = envoy_config.write(config, work_dir / "envoy" / f"{name}.yaml")
    argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]
    # stdout carries the shipped stdout access log: one line a request, discarded here.
    proc = group.spawn(f"envoy-{name}", argv, stdout_devnull=True)
    wait_until(lambda: http_ok(f"http://{LOOPBACK}:{admin_port}/ready"), timeout=30, what=f"envoy {name}", proc=proc)
    envoy = Envoy(proc, listen_port, admin_port, path)
    if wait_healthy:
        wait_until(envoy.healthy, timeout=30, what=f"envoy {name} sidecar health", proc=proc, interval=0.1)
    return envoy


@dataclass
class Sidecar:
    """A real `mcp-authz serve` (or a no-op stand-in: `metrics_port` 0)."""

    proc: Proc
    port: int
    metrics_port: int = 0
    ready_seconds: float = 0.0  # from spawn to the gRPC health service answering SERVING

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples from /metrics, by their full text name."""
        if not self.metrics_port:
            return {}
        text = httpx.get(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=5).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out


def start_sidecar(group: ProcessGroup, name: str, world: World, *, uvloop: bool = False, code: Path | None = None,
                  timeout: float = 60.0) -> Sidecar:
    """`mcp-authz serve` on the world's store, with metrics on (as in production).
    `uvloop`: the same CLI, run with uvloop's event loop policy (benchmarks/uvloop_serve.py).
    `code`: another checkout whose `authz_server` is run instead of this one's (same virtualenv)."""
    port, metrics_port = free_port(), free_port()
    env = child_env(world.env(dict(os.environ)))
    env["MCP_AUTHZ_METRICS_LISTEN"] = f"{LOOPBACK}:{metrics_port}"
    env["MCP_AUTHZ_ADMIN_LISTEN"] = f"{LOOPBACK}:{free_port()}"  # several sidecars run at once; older checkouts ignore it
    env["MCP_AUTHZ_CONSOLE_LISTEN"] = f"{LOOPBACK}:{free_port()}"
    if code is not None:
        env["PYTHONPATH"] = str(code)
        argv = [sys.executable, "-m", "authz_server", "serve", "--listen", f"{LOOPBACK}:{port}"]
    elif uvloop:
        argv = [sys.executable, "-m", "benchmarks.uvloop_serve", "--listen", f"{LOOPBACK}:{port}"]
    else:
        argv = [str(BIN / "mcp-authz"), "serve", "--listen", f"{LOOPBACK}:{port}"]
    started = time.monotonic()
    proc = group.spawn(name, argv, env=env)
    wait_until(lambda: grpc_serving(port), timeout=timeout, what=name, proc=proc, interval=0.02)
    return Sidecar(proc, port, metrics_port, time.monotonic() - started)


def start_noop(group: ProcessGroup, name: str, mode: str, threads: int = 4) -> Sidecar:
    """benchmarks/noop_authz.py: constant-OK ext_authz (`aio`, `sync` or `uvloop`)."""
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.noop_authz", "--port", str(port), "--mode", mode,
            "--threads", str(threads)]  # fmt: skip
    proc = group.spawn(name, argv, env=child_env())
    wait_until(lambda: grpc_serving(port), timeout=30, what=name, proc=proc)
    return Sidecar(proc, port)


@dataclass
class ExampleServer:
    proc: Proc
    port: int

    def url(self, server: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/mcp/{server}"

    def reset_stats(self) -> None:
        httpx.post(f"http://{LOOPBACK}:{self.port}/_stats/reset", timeout=5).raise_for_status()


def start_example_server(group: ProcessGroup) -> ExampleServer:
    """examples/mcp_server.py without signature or token checks, so the same server answers
    the direct and the gateway calls of configuration D."""
    port = free_port()
    argv = [sys.executable, str(EXAMPLE_SERVER), "--host", LOOPBACK, "--port", str(port)]
    proc = group.spawn("example-mcp-server", argv, env=child_env())
    wait_until(lambda: http_ok(f"http://{LOOPBACK}:{port}/_stats"), timeout=30, what="example MCP server", proc=proc)
    return ExampleServer(proc, port)


def check_request(key: str, server: str) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it for `GET /mcp/<server>` with `Authorization: Bearer key`."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host = "GET", f"/mcp/{server}", "127.0.0.1"
    http.headers["authorization"] = f"Bearer {key}"
    http.headers["x-request-id"] = str(uuid.uuid4())
    request.attributes.context_extensions["mcp_server"] = server
    return request


def warm_direct(sidecar: Sidecar, keys: Sequence[str], server: str) -> float:
    """The warm-up pass: one Check per key straight to the sidecar's gRPC port (so each key's
    Argon2 verification is done and cached in that process). Raises unless every one is OK.
    Returns the seconds it took."""
    started = time.monotonic()
    with grpc.insecure_channel(f"{LOOPBACK}:{sidecar.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for i, key in enumerate(keys):
            reply = stub.Check(check_request(key, server), timeout=30)
            if reply.status.code != 0 or not reply.HasField("ok_response"):
                raise BenchError(f"warm-up: key #{i} was refused: {reply.status.message}")
    return time.monotonic() - started


@dataclass
class Sanity:
    """What one valid and one invalid request got through a configuration."""

    valid: int
    invalid: int


def sanity(envoy: Envoy, path: str, good_key: str, bad_key: str) -> Sanity:
    headers = {"authorization": f"Bearer {good_key}"}
    valid = httpx.get(envoy.base_url + path, headers=headers, timeout=10).status_code
    invalid = httpx.get(envoy.base_url + path, headers={"authorization": f"Bearer {bad_key}"}, timeout=10).status_code
    return Sanity(valid, invalid)
