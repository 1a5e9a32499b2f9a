"""The console's sign-in sessions, held in the sidecar's memory.

A session is found by its cookie: a random 256-bit token, of which only a SHA-256
digest is kept, so a memory dump does not hand out sessions. It records which
gateway key signed in (its id, never the key), whose it is, and its CSRF token.
It ends after `idle` seconds unused (8 h, sliding), `max_age` after sign-in
(12 h) whatever the use, at sign-out, or when the store is full and it is the
least recently used. Whether its key and principal are still good is not kept
here: the console asks the live tables on every request (console/web.py).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

IDLE_SECONDS = 8 * 3600
MAX_AGE_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000


@dataclass(slots=True)
class Session:
    key_id: str
    principal_id: str
    csrf_token: str
    started: float
    last_used: float


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


class Sessions:
    """Token digest → Session, bounded, least recently used first."""

    def __init__(self, *, limit: int = MAX_SESSIONS, idle: float = IDLE_SECONDS, max_age: float = MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._by_digest: OrderedDict[bytes, Session] = OrderedDict()
        self._limit = limit
        self._idle = idle
        self._max_age = max_age
        self._clock = clock

    def __len__(self) -> int:
        return len(self._by_digest)

    def start(self, key_id: str, principal_id: str) -> tuple[str, Session]:
        """A new session and its token (for the cookie; not kept here)."""
        now = self._clock()
        token = secrets.token_urlsafe(32)
        session = Session(key_id, principal_id, secrets.token_urlsafe(32), now, now)
        while len(self._by_digest) >= self._limit:
            self._by_digest.popitem(last=False)
        self._by_digest[_digest(token)] = session
        return token, session

    def find(self, token: str) -> Session | None:
        """The live session of a token, its idle clock restarted; None (and forgotten) once expired."""
        digest = _digest(token)
        session = self._by_digest.get(digest)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_used >= self._idle or now - session.started >= self._max_age:
            del self._by_digest[digest]
            return None
        session.last_used = now
        self._by_digest.move_to_end(digest)
        return session

    def end(self, token: str) -> None:
        self._by_digest.pop(_digest(token), None)
