"""The grant cache: each (key, server) pair's constant mutations, built once.

Rendering credentials and identity headers (and, in the response translator,
serializing them) is most of an allow decision's cost, and it only changes when
the state does. An entry is reused while the state's `version` is the one it was
built from and its credentials have not expired; any change-log apply bumps the
version, so a revocation, a new override or a disabled team is never served
from here. The cache is bounded: when full it is emptied, and rebuilds as used.
"""

from __future__ import annotations

from authz_server.pipeline.types import Grant

GrantKey = tuple[str, str, bool]  # key id, server, whether Authorization held the key


class GrantCache:
    def __init__(self, max_size: int = 10_000) -> None:
        self._entries: dict[GrantKey, Grant] = {}
        self._max = max_size

    def get(self, key: GrantKey, version: int, now: float) -> Grant | None:
        grant = self._entries.get(key)
        if grant is None or grant.version != version or (grant.expires_at is not None and grant.expires_at <= now):
            return None
        return grant

    def put(self, key: GrantKey, grant: Grant) -> None:
        if len(self._entries) >= self._max:
            self._entries.clear()  # rare; a bounded cache without per-hit bookkeeping
        self._entries[key] = grant
