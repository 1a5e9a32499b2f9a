"""The live tables Check reads: plain dicts of frozen entries, credentials decrypted, times as epoch floats.

Pure data, no I/O. `live/follower.py` fills them and replaces each entry whole (one
dict store), so a reader on another thread sees the old entry or the new one, never
half of one. This is not a Store: `store/memory.py` is the in-memory Store for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from authz_server.models import AuthMode, HeaderTemplate, Principal, Secret, Team


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A gateway key as Check needs it. Whether it was verified lives in `live/verified.py`."""

    key_id: str
    principal_id: str
    hash: str
    expires_at: float | None
    revoked_at: float | None
    scope: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ServerEntry:
    name: str
    mode: AuthMode
    headers: tuple[HeaderTemplate, ...]
    optional: frozenset[str]
    shared: dict[str, Secret]
    signing_secret: bytes
    corrupt: bool = False  # a sealed value did not open: deny with 503 rather than inject less


@dataclass(frozen=True, slots=True)
class OverrideEntry:
    values: dict[str, Secret]
    expires_at: float | None
    corrupt: bool = False


@dataclass(slots=True)
class AuthState:
    """Every table Check reads, keyed as Check looks things up."""

    seq: int = 0
    version: int = 0  # bumped on every applied change: cached grants built from an older one are rebuilt
    loaded: bool = False
    teams: dict[str, Team] = field(default_factory=dict)
    principals: dict[str, Principal] = field(default_factory=dict)
    servers: dict[str, ServerEntry] = field(default_factory=dict)
    keys: dict[str, KeyEntry] = field(default_factory=dict)
    overrides: dict[tuple[str, str], OverrideEntry] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "teams": len(self.teams),
            "principals": len(self.principals),
            "servers": len(self.servers),
            "keys": len(self.keys),
            "overrides": len(self.overrides),
        }
