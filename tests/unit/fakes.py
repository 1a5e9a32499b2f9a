"""The unit tests' shared fakes and helpers, in one place. What one test file alone uses stays in that file.

- the pipeline's `World`: the live tables built directly (no store, no follower), `request`, and
  the standard world of the decision-order tests (`standard_world`, `alice_key`, `bob_key`);
- `CountingHasher`: a real Argon2 hasher that counts verifications and can be held;
- `Served`: a gRPC server whose Check runs on a `CoreLoop`, with `wait_until`;
- `Sink`: a write-behind queue's store; `HeldStore`: a store whose first snapshot waits;
- redaction checks: `real_key`, `redacted`, `assert_no_key`;
- the admin service's worlds (`AdminWorld`, built by `admin_world`; `SelfServiceWorld`, built by
  `self_service_world`; the fixtures in admin/conftest.py), its `Clock`, the upstream fakes
  (`FakeProbe`, `AcceptingProbe`) and the gRPC stub fake (`FakeStub`, `FakeStream`);
- `example`: a file of examples/ loaded as a module (examples/ is not a package).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz_server.admin.probe import ProbeFailed
from authz_server.admin.service import Actor, AdminService
from authz_server.crypto import keys
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import REDACTED, KeyHasher
from authz_server.envoy.core_loop import CoreLoop
from authz_server.envoy.servicer import METHOD
from authz_server.live.tables import AuthState, KeyEntry, OverrideEntry, ServerEntry
from authz_server.live.verified import VerifiedKeys
from authz_server.models import AuthMode, HeaderTemplate, Principal, PrincipalKind, Role, Secret, Snapshot, Team
from authz_server.pipeline.authn import Authenticator, KeyExtractor, NegativeCache, Pending
from authz_server.pipeline.limits import RateLimiter
from authz_server.pipeline.mutate import Mutator
from authz_server.pipeline.pipeline import Pipeline
from authz_server.pipeline.types import CheckInput, Decision
from authz_server.store.memory import MemoryStore

REPO = Path(__file__).resolve().parents[2]
# Cheap Argon2 for tests: the cost parameters are not what is under test.
FAST = keys.Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)
SIGNING = b"signing-secret-for-tests"


# --- the pipeline's world ---------------------------------------------------------------------


@dataclass
class World:
    """A small world for pipeline tests: the live tables built directly, no store, no follower."""

    state: AuthState = field(default_factory=AuthState)
    hasher: keys.KeyHasher = field(default_factory=lambda: keys.KeyHasher(FAST))
    now: float = field(default_factory=time.time)
    verified: VerifiedKeys = field(init=False)

    def __post_init__(self) -> None:
        self.verified = VerifiedKeys(self.state)

    def team(self, name: str, disabled: bool = False) -> None:
        self.state.teams[name] = Team(name, disabled)

    def principal(
        self,
        name: str,
        team: str = "eng",
        roles: tuple[Role, ...] = (Role.USER,),
        kind: PrincipalKind = PrincipalKind.USER,
        disabled: bool = False,
        rate: int | None = None,
    ) -> Principal:
        if team not in self.state.teams:
            self.team(team)
        p = Principal(f"p_{name}", name, kind, team, roles, disabled, rate)
        self.state.principals[p.id] = p
        return p

    def key(self, principal: Principal, *, revoked_in: float | None = None, expires_in: float | None = None,
            scope: tuple[str, ...] = ()) -> str:
        key_id, key = keys.generate()
        self.state.keys[key_id] = KeyEntry(
            key_id,
            principal.id,
            self.hasher.hash(key),
            None if expires_in is None else self.now + expires_in,
            None if revoked_in is None else self.now + revoked_in,
            scope,
        )
        return key.reveal()

    def server(self, name: str, mode: AuthMode, headers: tuple[tuple[str, str], ...] = (("Authorization", "Bearer {{API_KEY}}"),),
               shared: dict[str, str] | None = None, optional: frozenset[str] = frozenset(), corrupt: bool = False) -> None:
        self.state.servers[name] = ServerEntry(
            name,
            mode,
            tuple(HeaderTemplate(n, t) for n, t in headers) if mode is not AuthMode.NONE else (),
            optional,
            {k: Secret(v) for k, v in (shared or {}).items()},
            SIGNING,
            corrupt,
        )

    def override(self, principal: Principal, server: str, values: dict[str, str], expires_in: float | None = None,
                 corrupt: bool = False) -> None:
        self.state.overrides[(principal.id, server)] = OverrideEntry(
            {k: Secret(v) for k, v in values.items()}, None if expires_in is None else self.now + expires_in, corrupt
        )

    def pipeline(self, key_header: str = "x-api-key", queue_limit: int = 64, waits: bool = True) -> Pipeline:
        """`waits`: wait out a key's first use (the WaitingPipeline); otherwise raise Pending, as Check sees it."""
        clock = lambda: self.now  # noqa: E731
        return (WaitingPipeline if waits else Pipeline)(
            self.state,
            KeyExtractor(key_header, path_keys=True),
            Authenticator(self.state, self.hasher, workers=2, queue_limit=queue_limit,
                          negative=NegativeCache(1000, 60), verified=self.verified, clock=clock),
            RateLimiter(clock=clock),
            Mutator(key_header, "x-mcp-authz-signature", "x-mcp-authz-timestamp"),
            clock=clock,
        )


class WaitingPipeline(Pipeline):
    """Decides as Check does, but waits out a key's first-use verification where Check answers later."""

    def decide(self, inp: CheckInput) -> Decision:
        while True:
            try:
                return super().decide(inp)
            except Pending as pending:
                pending.future.exception(timeout=10)


def request(
    *,
    bearer: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/mcp/github",
    server: str | None = "github",
    method: str = "POST",
    mcp_method: str = "",
    tool: str = "",
) -> CheckInput:
    h = dict(headers or {})
    if bearer is not None:
        h["authorization"] = f"Bearer {bearer}"
    return CheckInput(
        method=method,
        path=path,
        headers=h,
        context_extensions={"mcp_server": server} if server else {},
        request_id="req-1",
        source_ip="127.0.0.9",
        mcp_method=mcp_method,
        tool=tool,
    )


def standard_world() -> World:
    """The decision-order tests' world: one server of every mode, one with an optional
    placeholder and one whose stored credential cannot be read."""
    w = World()
    w.server("github", AuthMode.INDIVIDUAL)
    w.server("linear", AuthMode.SHARED, shared={"API_KEY": "shared-linear"})
    w.server("unset", AuthMode.SHARED)
    w.server("open", AuthMode.NONE)
    w.server(
        "multi",
        AuthMode.SHARED,
        headers=(("X-API-Key", "{{API_KEY}}"), ("X-Client-ID", "{{CLIENT_ID}}")),
        shared={"API_KEY": "shared-k"},
        optional=frozenset({"CLIENT_ID"}),
    )
    w.server("broken", AuthMode.SHARED, corrupt=True)
    return w


def alice_key(w: World, **key_args: Any) -> str:
    """A key of alice (user and manager), who has an override for github."""
    alice = w.principal("alice", roles=(Role.USER, Role.MANAGER))
    w.override(alice, "github", {"API_KEY": "alice-gh"})
    return w.key(alice, **key_args)


def bob_key(w: World, **key_args: Any) -> str:
    """A key of bob, a user with no override."""
    return w.key(w.principal("bob"), **key_args)


class CountingHasher(keys.KeyHasher):
    """A real Argon2 hasher that counts verifications and can be slowed down."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(keys.Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1))
        self.calls = 0
        self.delay = delay
        self.gate = threading.Event()  # verifications wait here until released
        self.gate.set()
        self._lock = threading.Lock()

    def verify(self, stored_hash: str, presented: str) -> bool:
        with self._lock:
            self.calls += 1
        self.gate.wait(10)
        time.sleep(self.delay)
        return super().verify(stored_hash, presented)


# --- gRPC core loop -------------------------------------------------------------------------------

STREAM = "/test.Log/Stream"


class Recorder:
    """A Stream that records what it was given."""

    def __init__(self, opened: list[Recorder], fail_on: bytes = b"") -> None:
        opened.append(self)
        self.messages: list[bytes] = []
        self.closed = 0
        self.fail_on = fail_on

    def receive(self, message: bytes) -> None:
        if message == self.fail_on:
            raise RuntimeError("bug")
        self.messages.append(message)

    def close(self) -> None:
        self.closed += 1


class Served:
    """A grpc.server whose Check runs on a CoreLoop calling `check`, plus health on the pool; and a
    client-streaming method whose streams are Recorders."""

    def __init__(
        self,
        check: object,
        fail_on: bytes = b"",
        parse: Callable[[bytes], object] = CheckRequest.FromString,
        stream_parse: Callable[[bytes], object] = bytes,
    ) -> None:
        self.streams: list[Recorder] = []
        self.server = grpc.server(ThreadPoolExecutor(4))
        checker = health.HealthServicer()
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self.server)
        self.loop = CoreLoop(self.server)
        self.loop.unary(METHOD, parse, check)  # type: ignore[arg-type]
        self.loop.client_stream(STREAM, stream_parse, lambda: Recorder(self.streams, fail_on), b"done")
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.loop.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.raw = self.channel.unary_unary(METHOD)  # bytes in, bytes out
        self.stream = self.channel.stream_unary(STREAM)

    def check(self, request: CheckRequest, timeout: float = 5) -> bytes:
        return self.raw(request.SerializeToString(), timeout=timeout)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=1).wait()
        self.loop.close()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


# --- stores ---------------------------------------------------------------------------------------


class Sink:
    """A write-behind queue's store: keeps each batch, or fails as a store that is down."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[object]] = []
        self.fail = fail

    async def write(self, records: Sequence[object]) -> None:
        if self.fail:
            raise ConnectionError("store down")
        self.batches.append(list(records))


class HeldStore(MemoryStore):
    """A store whose first snapshot waits until released: start-up frozen mid-load."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def snapshot(self) -> Snapshot:
        await self.release.wait()
        return await super().snapshot()


# --- redaction checks -----------------------------------------------------------------------------


def real_key() -> tuple[str, str]:
    """(key id, whole key), a real one."""
    key_id, key = keys.generate()
    return key_id, key.reveal()


def redacted(key_id: str) -> str:
    """A key as redaction shows it: its key id, and no more."""
    return f"mgw_{key_id}{REDACTED}"


def assert_no_key(text: str, *whole_keys: str) -> None:
    assert not keys.contains_key(text), text
    for key in whole_keys:
        # Not even the secret part of a key (a caller may have dropped the prefix elsewhere).
        assert key[4 + keys.KEY_ID_LEN :] not in text, text


# --- the admin service ----------------------------------------------------------------------------

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
OP = Actor.operator()
GH_TOKEN = "ghp_abcdefghijklmnopqrstuvwxyz0123456789"
LINEAR_TOKEN = "lin_api_ZYXWVUTSRQPONMLKJIHGFEDCBA9876"
CLIENT_ID = "client-id-42-secretish"
# What FakeProbe's upstream accepts, and a value it rejects.
GOOD = "ghp_goodGOODgood0123456789"
BAD = "ghp_wrongWRONGwrong987654"


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@dataclass
class AdminWorld:
    svc: AdminService
    store: MemoryStore
    keyring: Keyring
    hasher: KeyHasher
    clock: Clock
    admin_key: Secret
    # Every secret this test saw; none may ever show up in an audit event.
    secrets: list[str] = field(default_factory=list)


async def admin_world() -> AdminWorld:
    """An initialised in-memory store and its AdminService, on a clock that stands at T0."""
    store = MemoryStore()
    await store.migrate()
    keyring = Keyring.from_spec(Keyring.generate_spec())
    hasher = KeyHasher(FAST)
    clock = Clock()
    svc = AdminService(store, keyring, hasher, clock)
    _, _, key = await svc.initialize(OP)
    return AdminWorld(svc, store, keyring, hasher, clock, key, [key.reveal()])


async def add_github(w: AdminWorld, mode: str = "individual") -> None:
    _, signing = await w.svc.add_server(OP, "github", mode, ["Authorization: Bearer {{API_KEY}}"])
    w.secrets.append(signing.reveal())


async def add_multi(w: AdminWorld) -> None:
    _, signing = await w.svc.add_server(
        OP,
        "crm",
        "shared",
        ["X-API-Key: {{API_KEY}}", "X-Client-ID: {{CLIENT_ID}}", "X-Trace: t={{TRACE}}"],
        optional={"TRACE"},
    )
    w.secrets.append(signing.reveal())


@dataclass
class FakeProbe:
    """Answers like an upstream that accepts only `Bearer GOOD`, and remembers what it was sent."""

    accept: str = f"Bearer {GOOD}"
    answer: int | None = None  # a fixed status instead, or
    fail: bool = False  # no answer at all
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def initialize(self, url: str, headers: Sequence[tuple[str, str]]) -> int:
        self.calls.append((url, dict(headers)))
        if self.fail:
            raise ProbeFailed("no answer from the upstream (Connection refused)")
        if self.answer is not None:
            return self.answer
        return 200 if dict(headers).get("authorization") == self.accept else 401


class AcceptingProbe:
    """An upstream that accepts any credential: `overrides test` answers ok once allowed."""

    async def initialize(self, url: str, headers: object) -> int:
        return 200


@dataclass
class SelfServiceWorld:
    svc: AdminService
    store: MemoryStore
    clock: Clock
    probe: FakeProbe
    signing: str
    alice: Actor
    mia: Actor  # manager
    bob: Actor


async def self_service_world() -> SelfServiceWorld:
    """Servers of every mode (github has an upstream URL, answered by a FakeProbe), and alice and
    bob (users) and mia (manager) acting with request ids and a source address."""
    store = MemoryStore()
    await store.migrate()
    clock, probe = Clock(), FakeProbe()
    svc = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST), clock, probe)
    await svc.initialize(OP)
    _, signing = await svc.add_server(
        OP, "github", "individual", ["Authorization: Bearer {{API_KEY}}"], upstream_url="http://127.0.0.1:9/mcp/github"
    )
    await svc.add_server(OP, "linear", "shared", ["Authorization: Bearer {{API_KEY}}"])
    await svc.add_server(OP, "open", "none")
    actors = {}
    for name, role in (("alice", Role.USER), ("mia", Role.MANAGER), ("bob", Role.USER)):
        view = await svc.add_principal(OP, name, "eng", [role])
        actors[name] = Actor(view.id, frozenset({role}), request_id=f"req-{name}", source="10.0.0.7")
    return SelfServiceWorld(svc, store, clock, probe, signing.reveal(), actors["alice"], actors["mia"], actors["bob"])


def operations(cls: type) -> dict[str, Any]:
    """The public coroutines of `cls`: on AdminOps, the admin operations."""
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and inspect.iscoroutinefunction(getattr(cls, n))}


class FakeStream:
    """A server stream of canned messages, as a gRPC stub returns it; counts as cancelled once told."""

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        async def rows() -> AsyncIterator[Any]:
            for m in self.messages:
                if self.cancelled:
                    return
                yield m

        return rows()

    def cancel(self) -> None:
        self.cancelled = True


class FakeStub:
    """Records each call's method and request; answers with canned replies."""

    def __init__(self, replies: Mapping[str, Any]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, method: str) -> Any:
        reply = self.replies[method]
        if isinstance(reply, FakeStream):

            def stream(request: Any, metadata: Any = None) -> FakeStream:
                self.calls.append((method, request))
                return reply

            return stream

        async def unary(request: Any, metadata: Any = None, timeout: float | None = None) -> Any:
            self.calls.append((method, request))
            return reply

        return unary


# --- examples/ ------------------------------------------------------------------------------------


def example(name: str) -> ModuleType:
    """examples/<name>.py as a module: examples/ is not a package (its files are meant to be copied)."""
    module_name = f"example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
