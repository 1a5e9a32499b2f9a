"""Sample records for the store tests: fixed times, recognisable values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from authz_server.models import (
    AuditEvent,
    AuthMode,
    Change,
    Entity,
    GatewayKey,
    HeaderTemplate,
    McpServer,
    Override,
    OverrideStatus,
    Placeholder,
    Principal,
    PrincipalKind,
    Role,
    Sealed,
    UsageRecord,
)
from authz_server.store.base import Store

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def sealed(tag: str, version: int = 1) -> Sealed:
    """Distinct bytes per tag, including bytes that break naive text handling."""
    body = tag.encode()
    return Sealed(version, nonce=b"\x00\xff\n" + body[:9].ljust(9, b"\x01"), ciphertext=b"\x00" + body + b"\xfe\x80")


def principal(pid: str, name: str, team: str = "eng", **kw: object) -> Principal:
    fields: dict[str, object] = {
        "kind": PrincipalKind.USER,
        "roles": (Role.USER,),
        "created_at": T0,
    }
    fields.update(kw)
    return Principal(id=pid, name=name, team=team, **fields)  # type: ignore[arg-type]


def server(name: str, **kw: object) -> McpServer:
    fields: dict[str, object] = {
        "mode": AuthMode.SHARED,
        "headers": (
            HeaderTemplate("Authorization", "Bearer {{API_KEY}}"),
            HeaderTemplate("X-Client-ID", "{{CLIENT_ID}}"),
        ),
        "placeholders": (Placeholder("API_KEY", True), Placeholder("CLIENT_ID", False)),
        "shared_values": {"API_KEY": sealed(f"{name}-api"), "CLIENT_ID": sealed(f"{name}-client", version=2)},
        "shared_masks": {"API_KEY": "…9xQa", "CLIENT_ID": "…"},
        "signing_secret": sealed(f"{name}-signing"),
        "description": f"The {name} MCP server",
        "created_at": T0,
        "updated_at": minutes(1),
        "upstream_url": f"http://127.0.0.1:9100/mcp/{name}",
    }
    fields.update(kw)
    return McpServer(name=name, **fields)  # type: ignore[arg-type]


def key(key_id: str, principal_id: str, **kw: object) -> GatewayKey:
    fields: dict[str, object] = {
        "hash": f"$argon2id$v=19$m=65536,t=3,p=4${key_id}",
        "label": f"label of {key_id}",
        "created_at": T0,
    }
    fields.update(kw)
    return GatewayKey(key_id=key_id, principal_id=principal_id, **fields)  # type: ignore[arg-type]


def override(principal_id: str, server_name: str, **kw: object) -> Override:
    fields: dict[str, object] = {
        "values": {"API_KEY": sealed(f"{principal_id}-{server_name}")},
        "masks": {"API_KEY": "…abcd"},
        "updated_by": principal_id,
        "updated_at": minutes(2),
        "status": OverrideStatus.CONFIGURED,
    }
    fields.update(kw)
    return Override(principal_id=principal_id, server=server_name, **fields)  # type: ignore[arg-type]


def audit(at: datetime, actor: str, action: str, target: str = "", **kw: object) -> AuditEvent:
    fields: dict[str, object] = {"outcome": "ok"}
    fields.update(kw)
    return AuditEvent(at=at, actor=actor, action=action, target=target, **fields)  # type: ignore[arg-type]


def usage(at: datetime, principal_id: str = "p-alice", server_name: str = "github", **kw: object) -> UsageRecord:
    fields: dict[str, object] = {
        "request_id": f"req-{principal_id}-{server_name}-{at.isoformat()}",
        "key_id": f"key-of-{principal_id}",
        "tool": "search",
        "mcp_method": "tools/call",
        "decision": "allow",
        "reason": "",
        "upstream_status": 200,
        "request_bytes": 312,
        "response_bytes": 2048,
        "duration_ms": 12.5,
    }
    fields.update(kw)
    return UsageRecord(at=at, principal_id=principal_id, server=server_name, **fields)  # type: ignore[arg-type]


def entries(changes: list[Change]) -> list[tuple[Entity, str]]:
    return [(c.entity, c.entity_key) for c in changes]


async def seed(store: Store) -> None:
    """Team eng; principals alice (p-alice) and bob (p-bob); servers github and slack."""
    await store.ensure_team("eng", T0)
    await store.add_principal(principal("p-alice", "alice"))
    await store.add_principal(principal("p-bob", "bob"))
    await store.add_server(server("github"))
    await store.add_server(server("slack"))


async def last_seq(store: Store) -> int:
    changes = await store.changes_since(0, limit=1_000_000)
    return changes[-1].seq if changes else 0
