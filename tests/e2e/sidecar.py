"""Run the real sidecar (`mcp-authz serve`) and the real CLI as subprocesses, on a SQLite store.

`seed_world` prepares a store with the same use-case layer the CLI uses (faster than
one CLI process per step); tests then change it live through the CLI itself.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_server.admin.service import Actor, AdminService
from authz_server.crypto.cipher import ENV_KEY_FILE, Keyring, load_keyring, write_key_file
from authz_server.crypto.keys import KeyHasher
from authz_server.models import AuthMode, Role
from authz_server.store import open_store

from .harness import (
    LOOPBACK,
    EnvoyProcess,
    ExampleServer,
    ManagedProcess,
    _spawn,
    free_port,
    run_envoy,
    run_example_server,
    wait_until,
)

BIN = Path(sys.executable).parent
CLI = str(BIN / "mcp-authz")


@dataclass
class World:
    """What `seed_world` created: gateway keys by principal, signing secrets by server."""

    dir: Path
    store_url: str
    key_file: Path
    keys: dict[str, str] = field(default_factory=dict)
    key_ids: dict[str, str] = field(default_factory=dict)
    signing: dict[str, str] = field(default_factory=dict)
    credentials: list[str] = field(default_factory=list)  # every upstream credential value used

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_AUTHZ_")}
        # No console unless a test asks (run_sidecar gives each sidecar a port): its default port is one for all.
        env.update({ENV_KEY_FILE: str(self.key_file), "MCP_AUTHZ_STORE": self.store_url, "MCP_AUTHZ_CONSOLE_LISTEN": ""})
        return env

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `mcp-authz ARGS` against this store; output is kept for the secret scan."""
        done = subprocess.run(
            [CLI, *args], input=stdin, capture_output=True, text=True, env=self.env, timeout=30, cwd=self.dir
        )
        with open(self.dir / "cli-output.log", "a", encoding="utf-8") as log:
            log.write(f"$ mcp-authz {' '.join(args)}\n{done.stdout}{done.stderr}")
        return done


GITHUB_ALICE = "ghp_alice_personal_token_0001"
LINEAR_SHARED = "lin_shared_team_token_0002"


async def _seed(world: World, keyring: Keyring) -> None:
    store = await open_store(world.store_url)
    try:
        admin = AdminService(store, keyring, KeyHasher())
        op = Actor.operator()
        await admin.initialize(op)
        for name, mode in (("github", AuthMode.INDIVIDUAL), ("linear", AuthMode.SHARED), ("open", AuthMode.NONE)):
            headers = () if mode is AuthMode.NONE else ("Authorization: Bearer {{API_KEY}}",)
            _, secret = await admin.add_server(op, name, mode, headers=headers)
            world.signing[name] = secret.reveal()
        await admin.set_shared(op, "linear", {"API_KEY": LINEAR_SHARED})
        for name, team in (("alice", "eng"), ("bob", "eng"), ("carol", "ops"), ("dave", "eng")):
            await admin.add_principal(op, name, team, (Role.USER,))
            view, key = await admin.create_key(op, name, label="e2e")
            world.keys[name] = key.reveal()
            world.key_ids[name] = view.key_id
        await admin.set_override(op, "alice", "github", {"API_KEY": GITHUB_ALICE})
        world.credentials += [GITHUB_ALICE, LINEAR_SHARED]
    finally:
        await store.close()


async def seed(directory: Path, store_url: str | None = None) -> World:
    """A fresh store (SQLite in `directory` unless `store_url`), with a 0600 master key file there."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = Keyring.generate_spec()
    key_file = directory / "master.key"
    write_key_file(key_file, spec)
    world = World(directory, store_url or f"sqlite:///{directory / 'authz.db'}", key_file)
    await _seed(world, Keyring.from_spec(spec))
    return world


@asynccontextmanager
async def admin_service(world: World) -> AsyncIterator[AdminService]:
    """The use cases on `world`'s store, with its master key, as the CLI runs them; closed on exit."""
    store = await open_store(world.store_url)
    try:
        yield AdminService(store, load_keyring({ENV_KEY_FILE: str(world.key_file)}), KeyHasher())
    finally:
        await store.close()


async def add_key(svc: AdminService, world: World, principal: str, name: str = "", *, label: str = "e2e",
                  scope: Sequence[str] = ()) -> str:  # fmt: skip
    """Create a key for `principal` (as the operator) and keep it in `world` under `name` (default:
    the principal's name); returns the key."""
    view, key = await svc.create_key(Actor.operator(), principal, label=label, scope=scope)
    world.keys[name or principal], world.key_ids[name or principal] = key.reveal(), view.key_id
    return key.reveal()


def seed_world(directory: Path) -> World:
    """`seed` for synchronous fixtures."""
    return asyncio.run(seed(directory))


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class Sidecar:
    process: ManagedProcess
    port: int  # the Check listener: Check, access log, health
    metrics_port: int
    admin_port: int  # the admin listener: the admin API, health
    console_port: int = 0  # the console's HTTP listener

    @property
    def admin_target(self) -> str:
        return f"{LOOPBACK}:{self.admin_port}"

    def http(self, path: str) -> httpx.Response:
        """GET /metrics, /healthz or /readyz on the operator port."""
        return httpx.get(f"http://{LOOPBACK}:{self.metrics_port}{path}", timeout=5)

    def logs(self) -> str:
        return self.process.stdout_path.read_text() + self.process.stderr_path.read_text()


@contextmanager
def run_sidecar(
    world: World,
    *,
    port: int | None = None,
    extra: Sequence[str] = (),
    name: str = "sidecar",
    env: dict[str, str] | None = None,
    wait: bool = True,
    listen: str = LOOPBACK,
) -> Iterator[Sidecar]:
    """`listen`: the Check listener's host (with `port`), or a whole `unix:/path`."""
    port = port or free_port()
    metrics_port, admin_port, console_port = free_port(), free_port(), free_port()
    check_address = listen if listen.startswith("unix:") else f"{listen}:{port}"
    argv = [CLI, "serve", "--listen", check_address, "--admin-listen", f"{LOOPBACK}:{admin_port}",
            "--poll-interval", "0.05", *extra]  # fmt: skip
    full_env = {**world.env, "MCP_AUTHZ_METRICS_LISTEN": f"{LOOPBACK}:{metrics_port}",
                "MCP_AUTHZ_CONSOLE_LISTEN": f"{LOOPBACK}:{console_port}", **(env or {})}  # fmt: skip
    process = _spawn(name, argv, world.dir, env=full_env)
    try:
        if wait:
            wait_until(lambda: serving(port), timeout=20, what="sidecar", process=process)
        yield Sidecar(process, port, metrics_port, admin_port, console_port)
    finally:
        process.stop()


@dataclass
class Gateway:
    """A running stack: the seeded world, the sidecar, the example MCP server and Envoy in front."""

    world: World
    sidecar: Sidecar
    upstream: ExampleServer
    envoy: EnvoyProcess

    def key(self, who: str) -> str:
        return self.world.keys[who]

    def bearer(self, who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.world.keys[who]}"}


G = TypeVar("G", bound=Gateway)


@contextmanager
def run_gateway(tmp: Path, servers: Sequence[str], kind: type[G] = Gateway) -> Iterator[G]:  # type: ignore[assignment]
    """A seeded world in `tmp`, its sidecar, the example MCP server, and Envoy routing `servers`
    (the admin API and the console aimed at the sidecar too), as a `kind` (Gateway or a test's own
    subclass); all stopped on exit."""
    world = seed_world(tmp / "world")
    with ExitStack() as stop:
        sidecar = stop.enter_context(run_sidecar(world))
        upstream = stop.enter_context(run_example_server(tmp))
        envoy = stop.enter_context(run_envoy(tmp, authz_port=sidecar.port, upstream_port=upstream.port,
                                             authz_admin_port=sidecar.admin_port, console_port=sidecar.console_port,
                                             servers=servers))  # fmt: skip
        yield kind(world, sidecar, upstream, envoy)
