"""The decision pipeline, in DESIGN.md's order:
authenticate -> server -> scope -> credentials -> usage limit -> mutate.
Credentials and the constant mutations come from the grant cache when current.

Pure logic over the live tables (live/tables.py): no protobuf, no store, no I/O. The only
wait is a key's first-use Argon2 verification inside the authenticator.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from authz_server.errors import Denied
from authz_server.live.tables import AuthState
from authz_server.pipeline.authn import Authenticate, KeyExtractor
from authz_server.pipeline.grants import GrantCache
from authz_server.pipeline.limits import RateLimiter
from authz_server.pipeline.mutate import Mutator, strips_authorization
from authz_server.pipeline.resolve import check_scope, find_server, resolve_credentials
from authz_server.pipeline.types import CheckInput, Decision


class Pipeline:
    def __init__(
        self,
        state: AuthState,
        extractor: KeyExtractor,
        authenticator: Authenticate,
        limiter: RateLimiter,
        mutator: Mutator,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._extractor = extractor
        self._authn = authenticator
        self._limiter = limiter
        self._mutator = mutator
        self._clock = clock
        self._grants = GrantCache()

    def serves(self, server: str) -> bool:
        """Whether `server` is a registered MCP server (its protected resource metadata exists)."""
        return server in self._state.servers

    def decide(self, inp: CheckInput) -> Decision:
        """Return the allow decision, or raise Denied with principal/key/server filled in when known."""
        version = self._state.version  # read first: a change while deciding leaves the grant stale, not wrong
        identity = self._authn.authenticate(self._extractor.extract(inp))
        server_name = inp.context_extensions.get("mcp_server", "")
        try:
            server = find_server(inp, self._state)
            check_scope(identity, server.name, inp)
            now = self._clock()
            strip = strips_authorization(inp, identity)
            cache_key = (identity.key_id, server.name, strip)
            grant = self._grants.get(cache_key, version, now)
            if grant is None:
                credentials = resolve_credentials(identity, server, self._state, now)
                grant = self._mutator.grant(identity, server, credentials, strip, version)
                self._grants.put(cache_key, grant)
            self._limiter.check(identity.principal)
            return self._mutator.allow(grant, inp, identity, now)
        except Denied as denied:
            denied.key_id = identity.key_id
            denied.principal_id = identity.principal.id
            denied.server = server_name
            raise
