"""The decision pipeline, in DESIGN.md's order:
authenticate -> server -> scope -> credentials -> usage limit -> mutate.

Pure logic over the in-memory state: no protobuf, no store, no I/O. The only
await is first-use Argon2 verification inside the authenticator.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from authz_server.errors import Denied
from authz_server.pipeline.authn import Authenticate, KeyExtractor
from authz_server.pipeline.limits import RateLimiter
from authz_server.pipeline.mutate import Mutator
from authz_server.pipeline.resolve import check_scope, find_server, resolve_credentials
from authz_server.pipeline.types import CheckInput, Decision
from authz_server.state import AuthState


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

    async def decide(self, inp: CheckInput) -> Decision:
        """Return the allow decision, or raise Denied with principal/key/server filled in when known."""
        identity = await self._authn.authenticate(self._extractor.extract(inp))
        server_name = inp.context_extensions.get("mcp_server", "")
        try:
            server = find_server(inp, self._state)
            check_scope(identity, server.name, inp)
            now = self._clock()
            credentials = resolve_credentials(identity, server, self._state, now)
            self._limiter.check(identity.principal)
            return self._mutator.allow(inp, identity, server, credentials, now)
        except Denied as denied:
            denied.key_id = identity.key_id
            denied.principal_id = identity.principal.id
            denied.server = server_name
            raise
