"""A small world for pipeline tests: the live tables built directly, no store, no follower."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from authz_server.crypto import keys
from authz_server.live.tables import AuthState, KeyEntry, OverrideEntry, ServerEntry
from authz_server.live.verified import VerifiedKeys
from authz_server.models import AuthMode, HeaderTemplate, Principal, PrincipalKind, Role, Secret, Team
from authz_server.pipeline.authn import Authenticator, KeyExtractor, NegativeCache, Pending
from authz_server.pipeline.limits import RateLimiter
from authz_server.pipeline.mutate import Mutator
from authz_server.pipeline.pipeline import Pipeline
from authz_server.pipeline.types import CheckInput, Decision

FAST = keys.Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)
SIGNING = b"signing-secret-for-tests"


@dataclass
class World:
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
