"""Stage 1: find the gateway key in the request and authenticate its owner.

Costs, cheapest first, so garbage never reaches Argon2:
  format and CRC32 checksum  -> 401 key_malformed / key_checksum
  key id lookup (a dict)      -> 401 key_unknown, key_revoked, key_expired
  verified-key cache          -> hit: done, no hashing (live/verified.py)
  negative cache              -> 401 key_invalid, no hashing
  Argon2id in a bounded pool, single-flight per presented key; beyond the
  queue bound -> 503 overloaded, so a flood cannot pile up work.
Principal and team checks come after, against the live tables (live/tables.py).

`authenticate` never blocks: on first use it raises `Pending` with the running
verification, and Check answers once that is done (envoy/core_loop.py). The
admin API awaits it through `authenticate_async`. Both share the caches and the
single-flight table.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol
from urllib.parse import unquote_plus

from authz_server.crypto import keys
from authz_server.crypto.keys import KeyHasher, ParsedKey
from authz_server.errors import Denied, Reason
from authz_server.live.tables import AuthState, KeyEntry
from authz_server.live.verified import VerifiedKeys
from authz_server.models import Principal
from authz_server.pipeline.types import CheckInput, Identity, PresentedKey

_BEARER = "bearer "


class KeyExtractor:
    """Finds the key: `Authorization: Bearer`, then the custom header, then a path segment.

    A gateway key never goes upstream from the URL. A path segment that is exactly
    key-shaped is the path key, and every such segment is stripped (the path is
    rewritten), whichever key authenticates. A key-shaped string anywhere else in
    the URL (the query string, inside a segment, percent-encoded) is refused with
    400 `key_in_url`: the gateway cannot rewrite it away without guessing, and a
    key that travelled in a query string is already in logs. `/files/mgw_notes.txt`
    is not key-shaped and is left alone.

    Only ASCII spaces and tabs around a key are ignored; anything else (a no-break
    space, an em space) makes the key malformed.
    """

    def __init__(self, key_header: str, path_keys: bool) -> None:
        self.key_header = key_header
        self.path_keys = path_keys

    def extract(self, inp: CheckInput) -> PresentedKey:
        path_key, stripped = scan_url(inp.path, self.path_keys)
        auth = inp.headers.get("authorization", "")
        is_bearer = auth[: len(_BEARER)].lower() == _BEARER
        bearer_value = auth[len(_BEARER) :].strip(keys.SPACE) if is_bearer else ""
        if bearer_value.startswith(keys.PREFIX):
            return PresentedKey(bearer_value, "bearer", stripped)
        custom = inp.headers.get(self.key_header, "").strip(keys.SPACE)
        if custom:
            return PresentedKey(custom, "header", stripped)
        if path_key:
            return PresentedKey(path_key, "path", stripped)
        if bearer_value or (not is_bearer and keys.PREFIX in auth):
            # A bearer token that is not a gateway key, or a key under another scheme: say so, not "missing".
            raise Denied(Reason.KEY_MALFORMED)
        raise Denied(Reason.KEY_MISSING)


def scan_url(path: str, path_keys: bool = True) -> tuple[str, str | None]:
    """`/mcp/github/mgw_…/x?q` -> (the key, `/mcp/github/x?q`); (``""``, None) when the URL holds no key.

    Only the first key-shaped segment is the key, but every one is removed. Raises
    Denied(KEY_IN_URL) for a key-shaped string anywhere else in the URL, or for a
    path key when path keys are turned off.
    """
    if keys.PREFIX not in path and "%" not in path:  # the common case: nothing to look at
        return "", None
    raw_path, sep, query = path.partition("?")
    segments = raw_path.split("/")
    found = [s for s in segments if keys.looks_like_key(s)]
    rest = "/".join(s for s in segments if s not in found) if found else raw_path
    if (found and not path_keys) or _hides_key(rest) or _hides_key(query):
        raise Denied(Reason.KEY_IN_URL, key_id=_key_id_in(path))
    if not found:
        return "", None
    return found[0], (rest or "/") + sep + query


_DECODE_ROUNDS = 3  # an upstream (or a proxy before it) may decode more than once


def _hides_key(text: str) -> bool:
    """Whether `text` holds a key-shaped string, as sent or once percent-decoded up to three times."""
    for _ in range(_DECODE_ROUNDS + 1):
        if keys.contains_key(text):
            return True
        if "%" not in text and "+" not in text:
            return False
        decoded = unquote_plus(text)
        if decoded == text:
            return False
        text = decoded
    return keys.contains_key(text)


def _key_id_in(path: str) -> str:
    """The key id of the first key-shaped string in the URL, for the audit trail ("" if encoded away)."""
    match = keys.KEY_SHAPE.search(path)
    return match.group(0)[keys.KEY_ID_SLICE] if match else ""


class NegativeCache:
    """Digests of presented keys that failed Argon2, each remembered for `ttl` seconds (LRU-bounded)."""

    def __init__(self, max_size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._max = max_size
        self._ttl = ttl
        self._clock = clock

    def __contains__(self, digest: bytes) -> bool:
        expires = self._entries.get(digest)
        if expires is None:
            return False
        if expires < self._clock():
            del self._entries[digest]
            return False
        return True

    def add(self, digest: bytes) -> None:
        self._entries[digest] = self._clock() + self._ttl
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Pending(Exception):  # noqa: N818 - control flow, not an error
    """A first-use verification of the presented key is running. Not a denial: decide again once
    `future` is done, when its outcome is cached (in the verified keys, or the negative cache)."""

    def __init__(self, future: Future[bool]) -> None:
        super().__init__("key verification pending")
        self.future = future


class Authenticate(Protocol):
    def authenticate(self, presented: PresentedKey) -> Identity:
        """Return the caller's identity, or raise Denied (401, or 503 when overloaded), or Pending."""

    async def authenticate_async(self, presented: PresentedKey) -> Identity:
        """`authenticate` for callers on the event loop: a first-use verification is awaited."""


class Authenticator:
    """The one authenticator, used by Check and by the admin API."""

    def __init__(
        self,
        state: AuthState,
        hasher: KeyHasher,
        *,
        workers: int,
        queue_limit: int,
        negative: NegativeCache,
        verified: VerifiedKeys,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._hasher = hasher
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._queue_limit = queue_limit
        self._inflight: dict[bytes, Future[bool]] = {}
        self._lock = threading.Lock()  # guards _inflight and the negative cache across threads
        self.negative = negative
        self.verified = verified  # shared with the follower, which evicts from it
        self._verified_digest = verified.get  # bound once: a cache hit is this one dict lookup
        self._clock = clock
        # Read by the metrics collector. Plain ints: `+= 1` on an int attribute is not
        # interrupted by another thread in CPython, and a scrape tolerates a stale read.
        self.cache_hits = 0
        self.cache_misses = 0
        self.negative_hits = 0
        self.argon2_runs = 0

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def authenticate(self, presented: PresentedKey) -> Identity:
        entry = self._cached(presented.key)
        if entry is None:
            parsed = keys.parse(presented.key)
            entry = self._usable_entry(parsed.key_id)
            if self._verified_digest(parsed.key_id) != parsed.digest:
                self.cache_misses += 1
                raise Pending(self._start_verify(entry, parsed, presented.key))
        self.cache_hits += 1
        return self._identity(entry, presented)

    def _cached(self, key: str) -> KeyEntry | None:
        """The usable entry when this exact key was verified before: the common case, decided
        without the checksum (a digest match proves the key is the one verified). Revoked and
        expired keys return an entry too; `_usable_entry` refuses them."""
        key_id = key[keys.KEY_ID_SLICE]
        verified = self._verified_digest(key_id)
        if verified is None or len(key) != keys.KEY_LEN or verified != keys.digest(key):
            return None
        return self._usable_entry(key_id)

    async def authenticate_async(self, presented: PresentedKey) -> Identity:
        """`authenticate` for callers on the event loop: a first-use verification is awaited."""
        while True:
            try:
                return self.authenticate(presented)
            except Pending as pending:
                await asyncio.wrap_future(pending.future)  # re-raises a verification that failed to run

    def _identity(self, entry: KeyEntry, presented: PresentedKey) -> Identity:
        return Identity(self._owner(entry), entry.key_id, entry.scope, presented)

    def _owner(self, entry: KeyEntry) -> Principal:
        principal = self._state.principals.get(entry.principal_id)
        if principal is None:
            raise Denied(Reason.KEY_UNKNOWN, key_id=entry.key_id)
        if principal.disabled:
            raise Denied(Reason.PRINCIPAL_DISABLED, key_id=entry.key_id)
        team = self._state.teams.get(principal.team)
        if team is not None and team.disabled:
            raise Denied(Reason.TEAM_DISABLED, key_id=entry.key_id)
        return principal

    def still_valid(self, key_id: str) -> Principal:
        """The owner of a key authenticated earlier (the console's session), as Check would judge the key now:
        Denied once it is revoked, expired or gone, or its principal or team disabled. No hashing."""
        return self._owner(self._usable_entry(key_id))

    def _usable_entry(self, key_id: str) -> KeyEntry:
        entry = self._state.keys.get(key_id)
        if entry is None:
            raise Denied(Reason.KEY_UNKNOWN, key_id=key_id)
        now = self._clock()
        if entry.revoked_at is not None and entry.revoked_at <= now:
            raise Denied(Reason.KEY_REVOKED, key_id=key_id)
        if entry.expires_at is not None and entry.expires_at <= now:
            raise Denied(Reason.KEY_EXPIRED, key_id=key_id)
        return entry

    def _start_verify(self, entry: KeyEntry, parsed: ParsedKey, presented: str) -> Future[bool]:
        """The running (or a new) Argon2 verification of this presented key; single-flight by digest."""
        digest = parsed.digest
        with self._lock:
            if digest in self.negative:
                self.negative_hits += 1
                raise Denied(Reason.KEY_INVALID, key_id=parsed.key_id)
            future = self._inflight.get(digest)
            if future is not None:
                return future
            if len(self._inflight) >= self._queue_limit:
                raise Denied(Reason.OVERLOADED, key_id=parsed.key_id)
            self.argon2_runs += 1
            future = self._pool.submit(self._hasher.verify, entry.hash, presented)
            self._inflight[digest] = future
        # Outside the lock: a future already done runs its callback right here, and the callback takes the lock.
        # Registered first, so the outcome is cached before any waiter's own callback decides again.
        future.add_done_callback(lambda f: self._settle(f, entry, digest))
        return future

    def _settle(self, future: Future[bool], entry: KeyEntry, digest: bytes) -> None:
        """Cache a finished verification's outcome, then let the next request for this key start its own."""
        ran = not future.cancelled() and future.exception() is None  # else: shut down, or the hasher broke
        if ran and future.result():
            self.verified.record(entry, digest)  # unless re-keyed or removed meanwhile
        with self._lock:
            if ran and not future.result():
                self.negative.add(digest)
            self._inflight.pop(digest, None)
