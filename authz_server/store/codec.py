"""Row encoding shared by the SQL stores: domain records <-> column values.

One place decides how a `Sealed`, a datetime, a role list or a key scope is
written to a column, so SQLite and PostgreSQL never disagree. JSON columns hold
text on both (PostgreSQL stores it as jsonb). Only datetimes differ by backend,
which `TimeCodec` captures: SQLite keeps fixed-width ISO 8601 text (so text
order is time order), PostgreSQL a native timestamptz.

Decoding is strict: a row that does not decode raises `CorruptRow` naming the
table and the row's key, never a column's contents.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

from authz_server.errors import CorruptRow, InvalidInput
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
    SealedRow,
    Team,
    UsageRecord,
    remask,
)

TEAM_COLUMNS = ("name", "disabled", "created_at")
PRINCIPAL_COLUMNS = ("id", "name", "kind", "team", "roles", "disabled", "rate_limit_per_minute", "created_at")
SERVER_COLUMNS = (
    "name",
    "mode",
    "headers",
    "placeholders",
    "shared_values",
    "shared_masks",
    "signing_secret",
    "description",
    "created_at",
    "updated_at",
    "upstream_url",
)
KEY_COLUMNS = (
    "key_id",
    "principal_id",
    "hash",
    "label",
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked_at",
    "scope",
)
OVERRIDE_COLUMNS = (
    "principal_id",
    "server",
    "sealed_values",
    "masks",
    "updated_by",
    "updated_at",
    "status",
    "status_reason",
    "status_at",
    "expires_at",
)
AUDIT_COLUMNS = ("at", "actor", "action", "target", "outcome", "request_id", "details", "uid")
USAGE_COLUMNS = (
    "at",
    "request_id",
    "principal_id",
    "key_id",
    "server",
    "tool",
    "mcp_method",
    "decision",
    "reason",
    "upstream_status",
    "request_bytes",
    "response_bytes",
    "duration_ms",
    "uid",
)
USAGE_DECISIONS = frozenset({"allow", "deny"})
# The sealed columns of each table that holds any, with the row's key: what rotation re-encrypts.
SEALED_SELECT = {
    Entity.SERVER: "SELECT name, shared_values, signing_secret FROM servers",
    Entity.OVERRIDE: "SELECT principal_id, server, sealed_values FROM overrides",
}


class Row(Protocol):
    """What both sqlite3.Row and asyncpg.Record offer: access by column name."""

    def __getitem__(self, key: str) -> Any: ...


def utc(value: datetime) -> datetime:
    """The same instant in UTC. Naive datetimes are refused: their zone is a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput("Datetimes given to the store must be timezone-aware.")
    return value.astimezone(UTC)


def utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def _stored_utc(value: datetime) -> datetime:
    # A naive value in a row is corruption (ValueError), not bad input from a caller.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("stored datetime has no time zone")
    return value.astimezone(UTC)


def now() -> datetime:
    return datetime.now(UTC)


class TimeCodec(Protocol):
    def encode(self, value: datetime | None) -> Any: ...

    def decode(self, value: Any) -> datetime | None: ...


class TextTime:
    """SQLite: '2024-05-01T12:00:00.000001+00:00', always UTC and always 32 characters."""

    def encode(self, value: datetime | None) -> str | None:
        return None if value is None else utc(value).isoformat(timespec="microseconds")

    def decode(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise TypeError("datetime column is not text")
        return _stored_utc(datetime.fromisoformat(value))


class NativeTime:
    """PostgreSQL timestamptz: the driver converts; we only pin the zone to UTC."""

    def encode(self, value: datetime | None) -> datetime | None:
        return utc_or_none(value)

    def decode(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError("datetime column is not a timestamp")
        return _stored_utc(value)


@contextmanager
def decoding(table: str, key: object) -> Iterator[None]:
    """Turn any decoding failure into CorruptRow naming the row, not its contents."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        # The cause is dropped: a JSON or base64 error message may quote the column.
        raise CorruptRow(
            f"The {table} row {key!s} cannot be decoded ({type(exc).__name__}). Repair or delete it."
        ) from None


# --- JSON pieces ---------------------------------------------------------------


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError("expected an object of strings")
    return dict(value)


def sealed_to_obj(sealed: Sealed) -> dict[str, object]:
    return {
        "v": sealed.key_version,
        "n": base64.b64encode(sealed.nonce).decode("ascii"),
        "c": base64.b64encode(sealed.ciphertext).decode("ascii"),
    }


def sealed_from_obj(obj: object) -> Sealed:
    if not isinstance(obj, dict):
        raise TypeError("sealed value is not an object")
    version, nonce, ciphertext = obj["v"], obj["n"], obj["c"]
    if type(version) is not int or not isinstance(nonce, str) or not isinstance(ciphertext, str):
        raise TypeError("sealed value has the wrong field types")
    return Sealed(version, base64.b64decode(nonce, validate=True), base64.b64decode(ciphertext, validate=True))


def encode_sealed(sealed: Sealed | None) -> str | None:
    return None if sealed is None else _dumps(sealed_to_obj(sealed))


def decode_sealed(text: str | None) -> Sealed | None:
    return None if text is None else sealed_from_obj(json.loads(text))


def encode_sealed_map(values: Mapping[str, Sealed]) -> str:
    return _dumps({name: sealed_to_obj(s) for name, s in values.items()})


def decode_sealed_map(text: str) -> dict[str, Sealed]:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise TypeError("expected an object of sealed values")
    return {str(name): sealed_from_obj(s) for name, s in obj.items()}


def encode_roles(roles: tuple[Role, ...]) -> str:
    return ",".join(Role(r).value for r in roles)


def decode_roles(text: str) -> tuple[Role, ...]:
    return tuple(Role(r) for r in text.split(",")) if text else ()


def encode_scope(scope: tuple[str, ...]) -> str:
    return _dumps(list(scope))


def decode_scope(text: str) -> tuple[str, ...]:
    obj = json.loads(text)
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise TypeError("scope is not a list of strings")
    return tuple(obj)


def encode_headers(headers: tuple[HeaderTemplate, ...]) -> str:
    return _dumps([{"name": h.name, "template": h.template} for h in headers])


def decode_headers(text: str) -> tuple[HeaderTemplate, ...]:
    obj = json.loads(text)
    if not isinstance(obj, list):
        raise TypeError("headers is not a list")
    out = []
    for item in obj:
        name, template = item["name"], item["template"]
        if not isinstance(name, str) or not isinstance(template, str):
            raise TypeError("header fields are not strings")
        out.append(HeaderTemplate(name, template))
    return tuple(out)


def encode_placeholders(placeholders: tuple[Placeholder, ...]) -> str:
    return _dumps([{"name": p.name, "required": p.required} for p in placeholders])


def decode_placeholders(text: str) -> tuple[Placeholder, ...]:
    obj = json.loads(text)
    if not isinstance(obj, list):
        raise TypeError("placeholders is not a list")
    out = []
    for item in obj:
        name, required = item["name"], item["required"]
        if not isinstance(name, str) or not isinstance(required, bool):
            raise TypeError("placeholder fields have the wrong types")
        out.append(Placeholder(name, required))
    return tuple(out)


def encode_str_map(values: Mapping[str, str]) -> str:
    return _dumps(dict(values))


def decode_str_map(text: str) -> dict[str, str]:
    return _str_map(json.loads(text))


def decode_masks(text: str) -> dict[str, str]:
    """Stored masks, each held to today's rule (`models.remask`)."""
    return {name: remask(shown) for name, shown in decode_str_map(text).items()}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):  # SQLite has no boolean type
        return bool(value)
    raise TypeError("flag column is not a boolean")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("text column is not text")
    return value


# --- usage records: one set of rules for writing, reading and the memory store ---------


def usage_problem(record: UsageRecord) -> str | None:
    """What makes a usage record unstorable, naming the field (never its value), or None.

    The same rules decide whether a stored row decodes, so the store never
    accepts a record it could not read back.
    """
    for name in ("request_id", "principal_id", "key_id", "server", "tool", "mcp_method", "decision", "reason"):
        if not isinstance(getattr(record, name), str):
            return f"{name} is not text"
    if record.decision not in USAGE_DECISIONS:
        return "decision is not allow or deny"
    if type(record.upstream_status) is not int or not 0 <= record.upstream_status <= 999:
        return "upstream_status is not an HTTP status (0 to 999)"
    for name in ("request_bytes", "response_bytes"):
        value = getattr(record, name)
        if type(value) is not int or not 0 <= value < 2**63:
            return f"{name} is not a non-negative integer"
    duration = record.duration_ms
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 <= duration < math.inf:
        return "duration_ms is not a finite non-negative number"
    return None


def check_usage(records: Sequence[UsageRecord]) -> list[UsageRecord]:
    """The records as stored (`at` in UTC, `duration_ms` a float), or InvalidInput
    naming the first one that cannot be stored."""
    out = []
    for i, record in enumerate(records, 1):
        problem = usage_problem(record)
        if problem is not None:
            raise InvalidInput(f"Usage record {i} of {len(records)} cannot be stored: its {problem}.")
        at = record.at
        if not isinstance(at, datetime):
            raise InvalidInput(f"Usage record {i} of {len(records)} cannot be stored: its at is not a datetime.")
        if at.tzinfo is not UTC or type(record.duration_ms) is not float:
            record = dataclasses.replace(record, at=utc(at), duration_ms=float(record.duration_ms))
        out.append(record)
    return out


# --- whole rows ------------------------------------------------------------------


class RowCodec:
    """Encode records to column tuples (in the *_COLUMNS order) and decode rows back."""

    def __init__(self, times: TimeCodec) -> None:
        self.times = times

    def time(self, value: datetime | None) -> Any:
        return self.times.encode(value)

    def _required_time(self, value: Any) -> datetime:
        decoded = self.times.decode(value)
        if decoded is None:
            raise TypeError("required datetime column is null")
        return decoded

    def encode_team(self, team: Team) -> tuple[Any, ...]:
        return (team.name, team.disabled, self.time(team.created_at))

    def decode_team(self, row: Row) -> Team:
        with decoding("teams", row["name"]):
            return Team(
                name=_text(row["name"]),
                disabled=_bool(row["disabled"]),
                created_at=self.times.decode(row["created_at"]),
            )

    def encode_principal(self, p: Principal) -> tuple[Any, ...]:
        return (
            p.id,
            p.name,
            PrincipalKind(p.kind).value,
            p.team,
            encode_roles(p.roles),
            p.disabled,
            p.rate_limit_per_minute,
            self.time(p.created_at),
        )

    def decode_principal(self, row: Row) -> Principal:
        with decoding("principals", row["id"]):
            limit = row["rate_limit_per_minute"]
            if limit is not None and type(limit) is not int:
                raise TypeError("rate limit is not an integer")
            return Principal(
                id=_text(row["id"]),
                name=_text(row["name"]),
                kind=PrincipalKind(row["kind"]),
                team=_text(row["team"]),
                roles=decode_roles(_text(row["roles"])),
                disabled=_bool(row["disabled"]),
                rate_limit_per_minute=limit,
                created_at=self.times.decode(row["created_at"]),
            )

    def encode_server(self, s: McpServer) -> tuple[Any, ...]:
        return (
            s.name,
            AuthMode(s.mode).value,
            encode_headers(s.headers),
            encode_placeholders(s.placeholders),
            encode_sealed_map(s.shared_values),
            encode_str_map(s.shared_masks),
            encode_sealed(s.signing_secret),
            s.description,
            self.time(s.created_at),
            self.time(s.updated_at),
            s.upstream_url,
        )

    def decode_server(self, row: Row) -> McpServer:
        with decoding("servers", row["name"]):
            return McpServer(
                name=_text(row["name"]),
                mode=AuthMode(row["mode"]),
                headers=decode_headers(row["headers"]),
                placeholders=decode_placeholders(row["placeholders"]),
                shared_values=decode_sealed_map(row["shared_values"]),
                shared_masks=decode_masks(row["shared_masks"]),
                signing_secret=decode_sealed(row["signing_secret"]),
                description=_text(row["description"]),
                created_at=self.times.decode(row["created_at"]),
                updated_at=self.times.decode(row["updated_at"]),
                upstream_url=_text(row["upstream_url"]),
            )

    def encode_key(self, k: GatewayKey) -> tuple[Any, ...]:
        return (
            k.key_id,
            k.principal_id,
            k.hash,
            k.label,
            self.time(k.created_at),
            self.time(k.last_used_at),
            self.time(k.expires_at),
            self.time(k.revoked_at),
            encode_scope(k.scope),
        )

    def decode_key(self, row: Row) -> GatewayKey:
        with decoding("gateway_keys", row["key_id"]):
            return GatewayKey(
                key_id=_text(row["key_id"]),
                principal_id=_text(row["principal_id"]),
                hash=_text(row["hash"]),
                label=_text(row["label"]),
                created_at=self.times.decode(row["created_at"]),
                last_used_at=self.times.decode(row["last_used_at"]),
                expires_at=self.times.decode(row["expires_at"]),
                revoked_at=self.times.decode(row["revoked_at"]),
                scope=decode_scope(row["scope"]),
            )

    def encode_override(self, o: Override) -> tuple[Any, ...]:
        return (
            o.principal_id,
            o.server,
            encode_sealed_map(o.values),
            encode_str_map(o.masks),
            o.updated_by,
            self.time(o.updated_at),
            OverrideStatus(o.status).value,
            o.status_reason,
            self.time(o.status_at),
            self.time(o.expires_at),
        )

    def decode_override(self, row: Row) -> Override:
        with decoding("overrides", f"{row['principal_id']}/{row['server']}"):
            return Override(
                principal_id=_text(row["principal_id"]),
                server=_text(row["server"]),
                values=decode_sealed_map(row["sealed_values"]),
                masks=decode_masks(row["masks"]),
                updated_by=_text(row["updated_by"]),
                updated_at=self._required_time(row["updated_at"]),
                status=OverrideStatus(row["status"]),
                status_reason=_text(row["status_reason"]),
                status_at=self.times.decode(row["status_at"]),
                expires_at=self.times.decode(row["expires_at"]),
            )

    def decode_sealed_row(self, entity: Entity, row: Row) -> SealedRow:
        """A row of `SEALED_SELECT[entity]`."""
        if entity is Entity.SERVER:
            with decoding("servers", row["name"]):
                return SealedRow(entity, _text(row["name"]), decode_sealed_map(row["shared_values"]),
                                 decode_sealed(row["signing_secret"]))  # fmt: skip
        key = f"{row['principal_id']}/{row['server']}"
        with decoding("overrides", key):
            return SealedRow(entity, key, decode_sealed_map(row["sealed_values"]))

    def decode_key_check(self, row: Row) -> tuple[int, Sealed]:
        with decoding("key_checks", row["version"]):
            sealed = decode_sealed(row["sealed"])
            if sealed is None:
                raise TypeError("check value is null")
            return int(row["version"]), sealed

    def decode_change(self, row: Row) -> Change:
        with decoding("change_log", row["seq"]):
            return Change(
                seq=int(row["seq"]),
                entity=Entity(row["entity"]),
                entity_key=_text(row["entity_key"]),
                at=self._required_time(row["at"]),
            )

    def encode_audit(self, e: AuditEvent) -> tuple[Any, ...]:
        return (
            self.time(e.at),
            e.actor,
            e.action,
            e.target,
            e.outcome,
            e.request_id,
            encode_str_map(e.details),
            e.uid,
        )

    def decode_audit(self, row: Row) -> AuditEvent:
        with decoding("audit_events", row["id"]):
            return AuditEvent(
                id=int(row["id"]),
                at=self._required_time(row["at"]),
                actor=_text(row["actor"]),
                action=_text(row["action"]),
                target=_text(row["target"]),
                outcome=_text(row["outcome"]),
                request_id=_text(row["request_id"]),
                details=decode_str_map(row["details"]),
                uid=_text(row["uid"] or ""),  # NULL: a row from before version 4
            )

    def encode_usage(self, r: UsageRecord) -> tuple[Any, ...]:
        """Columns in USAGE_COLUMNS order. Call `check_usage` first."""
        return (
            self.time(r.at),
            r.request_id,
            r.principal_id,
            r.key_id,
            r.server,
            r.tool,
            r.mcp_method,
            r.decision,
            r.reason,
            r.upstream_status,
            r.request_bytes,
            r.response_bytes,
            float(r.duration_ms),
            r.uid,
        )

    def decode_usage(self, row: Row) -> UsageRecord:
        with decoding("usage_records", row["id"]):
            duration = row["duration_ms"]
            record = UsageRecord(
                id=int(row["id"]),
                at=self._required_time(row["at"]),
                request_id=row["request_id"],
                principal_id=row["principal_id"],
                key_id=row["key_id"],
                server=row["server"],
                tool=row["tool"],
                mcp_method=row["mcp_method"],
                decision=row["decision"],
                reason=row["reason"],
                upstream_status=row["upstream_status"],
                request_bytes=row["request_bytes"],
                response_bytes=row["response_bytes"],
                # SQLite hands back a REAL column holding a whole number as an int.
                duration_ms=float(duration) if type(duration) is int else duration,
                uid=row["uid"] or "",  # NULL: a row from before version 4
            )
            problem = usage_problem(record)
            if problem is not None:
                raise ValueError(problem)
            return record
