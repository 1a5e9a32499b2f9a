"""The verified-key cache: which presented key last passed Argon2 for each key id.

Argon2id runs on a key's first use in a process only; afterwards Check recognises
the key by the SHA-256 of what was presented, a dict lookup and a digest compare.
It sits beside the negative cache (`pipeline/authn.py`), which remembers failures.

Contract (every rule that makes a digest stop counting lives in this module):
- `record`, on the Argon2 thread after a successful verification, stores the digest
  only while the tables still hold the entry it was verified against, with the same
  hash. If the follower replaces that entry while the digest is being written, the
  digest is dropped again, so a re-key or revocation applied meanwhile is never
  undone by a late verification. The next use simply verifies again.
- `replaced`, on the event loop after the follower put a key's new row in the table
  (or removed it), keeps the digest only when the secret is unchanged (same hash)
  and the key is not revoked (not even with a grace period); otherwise the digest is
  evicted and counted in `evictions` (the `mcp_authz_key_cache_evictions` metric).
- `clear`, after a full load replaced the key table, forgets every digest, uncounted.

Threads: one dict, written by single stores and pops, so a reader sees a digest or
none. A cache hit still goes through the table entry's revocation and expiry checks.
"""

from __future__ import annotations

from collections.abc import Callable

from authz_server.live.tables import AuthState, KeyEntry


class VerifiedKeys:
    """Key id -> SHA-256 of the presented key verified against that key id's current hash."""

    __slots__ = ("_digests", "_state", "evictions", "get")

    def __init__(self, state: AuthState) -> None:
        self._state = state
        self._digests: dict[str, bytes] = {}
        # The hit path's one lookup: the dict's own bound `get`, no Python frame in between.
        self.get: Callable[[str], bytes | None] = self._digests.get
        self.evictions = 0  # digests dropped by `replaced`: the key was revoked, re-keyed or removed

    def record(self, verified: KeyEntry, digest: bytes) -> bool:
        """Remember that the key whose SHA-256 is `digest` passed Argon2 against `verified.hash`.
        Returns False (nothing kept) when the tables no longer hold that hash for the key id."""
        key_id = verified.key_id
        current = self._state.keys.get(key_id)
        if current is None or current.hash != verified.hash:  # re-keyed or removed while hashing
            return False
        self._digests[key_id] = digest
        if self._state.keys.get(key_id) is not current:
            # Replaced between the check and the write: the follower's `replaced` may have run before
            # the write and found nothing to evict. Drop it; the next use verifies against the new entry.
            self._digests.pop(key_id, None)
            return False
        return True

    def replaced(self, old: KeyEntry | None, new: KeyEntry | None) -> None:
        """The follower has just put `new` in the table in place of `old` (None: absent). Call it
        after the table write, so a concurrent `record` sees the new entry or is undone here."""
        if old is not None and new is not None and old.hash == new.hash and new.revoked_at is None:
            return  # same secret, still valid: stay verified
        entry = new if new is not None else old
        if entry is not None and self._digests.pop(entry.key_id, None) is not None:
            self.evictions += 1

    def clear(self) -> None:
        """Forget every digest: the key table was loaded anew. In place, so `get` stays bound."""
        self._digests.clear()

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._digests

    def __len__(self) -> int:
        return len(self._digests)
