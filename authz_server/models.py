"""Plain domain records shared by the store, the pipeline and the admin layer.

Everything here is a frozen dataclass with no I/O and no protobuf. Stored
secrets travel as `Sealed` ciphertext; decrypted values are wrapped in
`Secret` so that a stray repr or log line never shows them.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime

from authz_server.errors import redact
# Defined in rules.py, re-exported for the modules that read them here.
from authz_server.rules import NAME_RE as NAME_RE
from authz_server.rules import PLACEHOLDER_RE as PLACEHOLDER_RE
from authz_server.rules import TOOL_RE as TOOL_RE


class Role(str, enum.Enum):
    ADMIN = "admin"
    MANAGER = "manager"
    USER = "user"


class PrincipalKind(str, enum.Enum):
    USER = "user"
    SERVICE = "service"  # a virtual account: an app or an automation


class AuthMode(str, enum.Enum):
    NONE = "none"
    SHARED = "shared"
    INDIVIDUAL = "individual"


class OverrideStatus(str, enum.Enum):
    CONFIGURED = "configured"
    MISSING = "missing"
    INVALID = "invalid"
    EXPIRED = "expired"


class Secret:
    """A secret string whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def masked(self) -> str:
        """`…9xQa`: enough to recognise a value, never enough to use it (see `mask`)."""
        return mask(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


MASK_MAX_SHOWN = 4  # a mask shows at most this many characters of a value, and at most a quarter of it


def mask(value: str) -> str:
    """The value's last characters after '…': at most a quarter of it and at most 4 (`…9xQa` for a
    value of 16 or more), so a mask is enough to recognise a value, never enough to guess it."""
    shown = min(MASK_MAX_SHOWN, len(value) // 4)
    return f"…{value[-shown:]}" if shown else "…"


def remask(stored: str) -> str:
    """A mask read back from the store, held to `mask`'s rule: one stored by an older version
    (`ghp_…9xQa`, 8 characters of 16) keeps only its last 4 (masks are never recomputed: that
    would mean decrypting)."""
    _, sep, tail = stored.rpartition("…")
    return f"…{tail[-MASK_MAX_SHOWN:]}" if sep else "…"


@dataclass(frozen=True, slots=True)
class Sealed:
    """An AES-256-GCM ciphertext as stored: master key version, nonce and ciphertext+tag."""

    key_version: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    disabled: bool = False
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    name: str
    kind: PrincipalKind
    team: str
    roles: tuple[Role, ...]
    disabled: bool = False
    rate_limit_per_minute: int | None = None  # None: no per-principal limit
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class HeaderTemplate:
    """One upstream header, e.g. name='Authorization', template='Bearer {{API_KEY}}'."""

    name: str
    template: str

    def placeholders(self) -> tuple[str, ...]:
        return tuple(PLACEHOLDER_RE.findall(self.template))


@dataclass(frozen=True, slots=True)
class Placeholder:
    name: str
    required: bool = True


@dataclass(frozen=True, slots=True)
class McpServer:
    name: str
    mode: AuthMode
    headers: tuple[HeaderTemplate, ...] = ()
    placeholders: tuple[Placeholder, ...] = ()
    shared_values: dict[str, Sealed] = field(default_factory=dict)
    # Masks are computed when a value is set, so listings never decrypt anything.
    shared_masks: dict[str, str] = field(default_factory=dict)
    signing_secret: Sealed | None = None
    description: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # Where `overrides test` sends an MCP initialize to validate a credential ("" when unknown).
    upstream_url: str = ""


@dataclass(frozen=True, slots=True)
class GatewayKey:
    """A stored gateway key: never the key itself, only its id and Argon2id hash."""

    key_id: str
    principal_id: str
    hash: str
    label: str = ""
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    # The key stops working at revoked_at; a time in the future is a grace period.
    revoked_at: datetime | None = None
    # Empty: every server. Otherwise entries "server" or "server:tool".
    scope: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Override:
    """A principal's own values for a server's placeholders."""

    principal_id: str
    server: str
    values: dict[str, Sealed]
    masks: dict[str, str]  # placeholder -> mask(value), computed when set
    updated_by: str  # principal id of whoever set it, or "cli" for a local operator
    updated_at: datetime
    status: OverrideStatus = OverrideStatus.CONFIGURED
    status_reason: str = ""
    status_at: datetime | None = None
    expires_at: datetime | None = None


class Entity(str, enum.Enum):
    """What a change-log row names; entity_key identifies the row."""

    TEAM = "team"  # key: team name
    PRINCIPAL = "principal"  # key: principal id
    SERVER = "server"  # key: server name
    KEY = "key"  # key: key id
    OVERRIDE = "override"  # key: "<principal id>/<server name>"


@dataclass(frozen=True, slots=True)
class SealedRow:
    """Every sealed value of one stored row, as master-key rotation reads and replaces them.

    `entity` SERVER: `key` is the server's name, `values` its shared values, `signing` its
    signing secret. OVERRIDE: `key` is `override_key(principal_id, server)`, `values` the
    override's values, `signing` None.
    """

    entity: Entity
    key: str
    values: dict[str, Sealed]
    signing: Sealed | None = None

    def versions(self) -> set[int]:
        """The master key versions this row's values are sealed under."""
        found = {s.key_version for s in self.values.values()}
        if self.signing is not None:
            found.add(self.signing.key_version)
        return found


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    entity: Entity
    entity_key: str
    at: datetime


def new_uid() -> str:
    """A record's unique id (96 random bits, hex): the store keeps one row per uid, so a batch
    written twice (retried after an outage, replayed from the spool) is stored once."""
    return os.urandom(12).hex()


FIELD_MAX = 256  # characters kept of an audit field (each details key and value too) or a usage record's request text
TRUNCATED = "…(truncated)"


def bounded(text: str) -> str:
    """`text`, or its first FIELD_MAX characters and TRUNCATED when longer."""
    return text if len(text) <= FIELD_MAX else text[:FIELD_MAX] + TRUNCATED


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: datetime
    actor: str  # principal id, "cli" for local operator commands, or "-" when unknown
    action: str  # e.g. "keys.revoke", "authn.failure"
    target: str
    outcome: str  # "ok", "denied", "error", or a denial reason
    request_id: str = ""
    details: dict[str, str] = field(default_factory=dict)
    id: int | None = None  # the store's row id, once stored
    uid: str = field(default_factory=new_uid, compare=False)  # made with the event: a retried write stores it once

    def __post_init__(self) -> None:
        # Every writer builds one of these (the admin service, Check's and the admin API's
        # authentication failures, the store reading rows back), so a key-shaped string a
        # caller sent is cut to its key id here, before anything can store or show it.
        # Each field is then bounded, so a huge refused input leaves a small event.
        for name in ("actor", "action", "target", "outcome", "request_id"):
            object.__setattr__(self, name, bounded(redact(getattr(self, name))))
        details = {bounded(redact(k)): bounded(redact(v)) for k, v in self.details.items()}
        if details != self.details:
            object.__setattr__(self, "details", details)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request through Envoy, attributed: Check's decision joined with Envoy's access-log entry."""

    at: datetime  # when Envoy received the request
    request_id: str
    principal_id: str  # "" when the caller was not authenticated
    key_id: str
    server: str
    tool: str  # tools/call tool name, when Envoy's MCP filter saw it
    mcp_method: str
    decision: str  # "allow" or "deny"
    reason: str  # the denial reason, "" when allowed
    upstream_status: int  # HTTP status sent to the client (0: none, e.g. reset)
    request_bytes: int
    response_bytes: int
    duration_ms: float
    id: int | None = None  # the store's row id, once stored
    uid: str = field(default_factory=new_uid, compare=False)  # made with the record: a retried write stores it once

    def __post_init__(self) -> None:
        # The tool, MCP method and request id come from the request: a key-shaped one is cut to its
        # key id, and a long one is bounded as an audit field is.
        for name in ("request_id", "tool", "mcp_method"):
            value = getattr(self, name)
            # (A value that is not text is a bad record: the store's to refuse.)
            if isinstance(value, str) and ("mgw_" in value or len(value) > FIELD_MAX):
                object.__setattr__(self, name, bounded(redact(value)))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every row the sidecar needs in memory, as of change-log sequence `seq`."""

    seq: int
    teams: tuple[Team, ...]
    principals: tuple[Principal, ...]
    servers: tuple[McpServer, ...]
    keys: tuple[GatewayKey, ...]
    overrides: tuple[Override, ...]


def override_key(principal_id: str, server: str) -> str:
    return f"{principal_id}/{server}"


def split_override_key(key: str) -> tuple[str, str]:
    """(principal id, server) of an `override_key` (principal ids hold no '/')."""
    principal_id, _, server = key.partition("/")
    return principal_id, server


# --- the write-behind spool's JSON lines (observability/spool.py): each record's one shape on disk ----


def audit_to_json(e: AuditEvent) -> dict[str, Any]:
    return {"at": e.at.isoformat(), "actor": e.actor, "action": e.action, "target": e.target,
            "outcome": e.outcome, "request_id": e.request_id, "details": dict(e.details), "uid": e.uid}  # fmt: skip


def audit_from_json(d: dict[str, Any]) -> AuditEvent:
    return AuditEvent(datetime.fromisoformat(d["at"]), str(d["actor"]), str(d["action"]), str(d["target"]),
                      str(d["outcome"]), str(d["request_id"]), {str(k): str(v) for k, v in d["details"].items()},
                      uid=str(d.get("uid") or new_uid()))  # fmt: skip


def usage_to_json(r: UsageRecord) -> dict[str, Any]:
    return {"at": r.at.isoformat(), "request_id": r.request_id, "principal_id": r.principal_id, "key_id": r.key_id,
            "server": r.server, "tool": r.tool, "mcp_method": r.mcp_method, "decision": r.decision,
            "reason": r.reason, "upstream_status": r.upstream_status, "request_bytes": r.request_bytes,
            "response_bytes": r.response_bytes, "duration_ms": r.duration_ms, "uid": r.uid}  # fmt: skip


def usage_from_json(d: dict[str, Any]) -> UsageRecord:
    return UsageRecord(datetime.fromisoformat(d["at"]), str(d["request_id"]), str(d["principal_id"]), str(d["key_id"]),
                       str(d["server"]), str(d["tool"]), str(d["mcp_method"]), str(d["decision"]), str(d["reason"]),
                       int(d["upstream_status"]), int(d["request_bytes"]), int(d["response_bytes"]),
                       float(d["duration_ms"]), uid=str(d.get("uid") or new_uid()))  # fmt: skip


def status_to_json(item: tuple[str, str, str, datetime]) -> list[str]:
    """An override an upstream rejected: principal id, server, reason, when."""
    principal_id, server, reason, at = item
    return [principal_id, server, reason, at.isoformat()]


def status_from_json(d: list[str]) -> tuple[str, str, str, datetime]:
    principal_id, server, reason, at = d
    return str(principal_id), str(server), str(reason), datetime.fromisoformat(at)
