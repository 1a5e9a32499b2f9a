"""The admin API's messages and the views they carry, both ways.

The servicer (api.py) turns views into messages; the remote client (remote.py)
turns messages back into the very views the local CLI renders. Each pair is one
`ViewCodec`, built by `_codec` from the view's fields and the message's
descriptor: a view field goes in the message field of its name (or the one
`renamed` gives), and how is read from the two types:

    message field            view field                        view -> message   message -> view
    Timestamp                datetime (| None)                 set unless None   None when unset (or the epoch)
    map                      tuple of (key, value), sorted     dict              sorted pairs
    repeated message         tuple of tuples or dataclasses    by field order    back to the same
    repeated scalar          tuple                             list              tuple
    with presence            X | None                          set unless None   None when unset
    scalar                   X | None                          None as zero      zero as None
    scalar                   X                                 as is             as is
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.admin import validate, views
from authz_server.admin.gen import admin_pb2 as pb
from authz_server.models import Secret

REASON_TRAILER = "mcp-authz-reason"  # a refusal's reason travels in this trailer, its message in the status
_EPOCH = datetime.fromtimestamp(0, UTC)  # a required time the message left unset
_V = TypeVar("_V")
_M = TypeVar("_M")


def stamp(target: Timestamp, value: datetime | None) -> None:
    """Set a Timestamp field; a naive datetime is UTC, as everywhere in the admin layer."""
    if value is not None:
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
        target.FromDatetime(aware.astimezone(UTC))


def when(msg: Any, name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime, or None when unset; InvalidInput out of range."""
    if not msg.HasField(name):
        return None
    value = msg.__getattribute__(name)
    return validate.time_of(value.seconds, value.nanos, name)


def kind_of(fd: Any) -> str:  # a FieldDescriptor (upb's or the pure one)
    """How a message field travels: "time" (a Timestamp), "map", "messages" (repeated), "list"
    (repeated scalars), "present" (a scalar with presence: `optional`) or "scalar"."""
    if fd.message_type is not None:
        if fd.message_type.full_name == "google.protobuf.Timestamp":
            return "time"
        return "map" if fd.message_type.GetOptions().map_entry else "messages"
    if fd.is_repeated:
        return "list"
    return "present" if fd.has_presence else "scalar"


@dataclass(frozen=True, slots=True)
class ViewCodec(Generic[_V, _M]):
    """A view and its message: `message(view)` for the servicer, `view(message)` for the client."""

    message: Callable[[_V], _M]
    view: Callable[[_M], _V]


@dataclass(frozen=True, slots=True)
class _Field:
    """One view field and the message field that carries it (see the module's table)."""

    name: str
    wire: str
    kind: str  # "time", "map", "messages", "list", "present" or "scalar"
    optional: bool  # the view field may be None
    item: Any = None  # "messages": the view's element type (tuple, or a dataclass) and the message class
    item_message: Any = None

    def put(self, msg: Any, value: Any) -> None:
        if value is None:
            return
        if self.kind == "time":
            stamp(getattr(msg, self.wire), value)
        elif self.kind == "map":
            getattr(msg, self.wire).update(dict(value))
        elif self.kind == "messages":
            names = [f.name for f in self.item_message.DESCRIPTOR.fields]
            rows = [e if isinstance(e, tuple) else tuple(getattr(e, n) for n in names) for e in value]
            getattr(msg, self.wire).extend(self.item_message(**dict(zip(names, row, strict=True))) for row in rows)
        elif self.kind == "list":
            getattr(msg, self.wire).extend(value)
        else:
            setattr(msg, self.wire, value)

    def get(self, msg: Any) -> Any:
        if self.kind == "time":
            return when(msg, self.wire) or (None if self.optional else _EPOCH)
        value = getattr(msg, self.wire)
        if self.kind == "map":
            return tuple(sorted(value.items()))
        if self.kind == "messages":
            names = [f.name for f in self.item_message.DESCRIPTOR.fields]
            return tuple(self.item(*(getattr(m, n) for n in names)) if self.item is not tuple
                         else tuple(getattr(m, n) for n in names) for m in value)  # fmt: skip
        if self.kind == "list":
            return tuple(value)
        if self.kind == "present":
            return value if msg.HasField(self.wire) else None
        return None if self.optional and not value else value


def _codec(view: type[_V], message: type[_M], **renamed: str) -> ViewCodec[_V, _M]:
    """The codec of a view and its message; every field of each must have its match in the other."""
    hints = typing.get_type_hints(view)
    wire_fields = message.DESCRIPTOR.fields_by_name  # type: ignore[attr-defined]
    fields: list[_Field] = []
    for f in dataclasses.fields(view):  # type: ignore[arg-type]
        fd = wire_fields[renamed.get(f.name, f.name)]
        args = typing.get_args(hints[f.name])
        optional = type(None) in args
        kind, item, item_message = kind_of(fd), None, None
        if kind == "messages":
            item_message = getattr(pb, fd.message_type.name)
            item = typing.get_origin(args[0]) or args[0]  # tuple[tuple[str, bool], ...] or tuple[Placeholder, ...]
        fields.append(_Field(f.name, fd.name, kind, optional, item, item_message))
    unmatched = set(wire_fields) - {f.wire for f in fields}
    if unmatched:
        raise TypeError(f"{message.__name__} fields without a {view.__name__} field: {sorted(unmatched)}")

    def to_message(value: _V) -> _M:
        msg = message()
        for f in fields:
            f.put(msg, getattr(value, f.name))
        return msg

    def to_view(msg: _M) -> _V:
        return view(**{f.name: f.get(msg) for f in fields})

    return ViewCodec(to_message, to_view)


SERVER = _codec(views.ServerView, pb.Server, shared_masks="shared_values")
FORM = _codec(views.ServerFormView, pb.ServerForm)
PRINCIPAL = _codec(views.PrincipalView, pb.Principal)
TEAM = _codec(views.TeamView, pb.Team)
KEY = _codec(views.GatewayKeyView, pb.GatewayKey)
OVERRIDE = _codec(views.OverrideView, pb.Override, masks="values")
STATUS = _codec(views.CredentialStatusView, pb.CredentialStatus, masks="values")
OVERRIDE_TEST = _codec(views.OverrideTestView, pb.OverrideTestResult)
AUDIT = _codec(views.AuditView, pb.AuditEvent)
USAGE = _codec(views.UsageView, pb.UsageRecord)
WHOAMI = _codec(views.WhoAmIView, pb.WhoAmIResponse)
PRINCIPAL_DELETED = _codec(views.PrincipalDeletedView, pb.DeletePrincipalResponse)
_ISSUE = _codec(views.OverrideIssueView, pb.OverrideIssue)
ISSUES: ViewCodec[list[views.OverrideIssueView], list[pb.OverrideIssue]] = ViewCodec(
    lambda items: [_ISSUE.message(v) for v in items], lambda messages: [_ISSUE.view(m) for m in messages]
)  # a repeated field of a reply in `Fields`
SECRET: ViewCodec[Secret, str] = ViewCodec(Secret.reveal, Secret)  # shown once: a key or a signing secret
