"""The admin API's wire form of every `AdminOps` operation: one table, read by both ends.

Each `Rpc` row names a method of `mcp_authz.admin.v1.Admin`, the operation it
runs, and how its result is answered. The servicer (api.py) turns a request into
the operation's arguments and its result into the reply; the client (remote.py)
does the reverse. How each argument travels is read from the proto and from the
operation's signature in `AdminOps`, so it is declared nowhere else:

- it goes in the request field of its name (`principal_name`, `server_name` and
  `actor_name` in `principal`, `server` and `actor`); an argument without a field
  must be listed in `local` (the client applies it: an export's paging), and a
  field without an argument is an error, both at import;
- a field with presence (`optional`, a Timestamp) is None when unset;
- an argument that may be None, in a field without presence: the field's zero
  ("" or 0) is None;
- `defaults`: what the server passes when a field is zero, since JSON clients
  leave fields out (AddPrincipal's team "default", roles ["user"]...);
- in those last two cases the client refuses a zero value: the server would read
  it as "not given", so it would not arrive as sent.
`fixed` arguments are set by the method itself (DisablePrincipal: disabled=True).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from google.protobuf.message import Message

from authz_server.admin import wire
from authz_server.admin.gen import admin_pb2 as pb
from authz_server.admin.ops import DEFAULT_LIMIT, AdminOps
from authz_server.admin.wire import ViewCodec
from authz_server.errors import InvalidInput

_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"]
SERVICE_NAME = _SERVICE.full_name
_FIELD_OF = {"principal_name": "principal", "server_name": "server", "actor_name": "actor"}
LOCAL_ONLY = frozenset({"prune_usage"})  # operations the admin API does not offer


# --- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Whole:
    """The reply is the result's own message."""

    codec: ViewCodec[Any, Any]

    def message(self, result: Any, reply: type[Message]) -> Message:
        out: Message = self.codec.message(result)
        return out

    def result(self, reply: Any) -> Any:
        return self.codec.view(reply)


@dataclass(frozen=True, slots=True)
class Each:
    """A list of results, in one repeated field."""

    field: str
    codec: ViewCodec[Any, Any]

    def message(self, result: Any, reply: type[Message]) -> Message:
        return reply(**{self.field: [self.codec.message(v) for v in result]})

    def result(self, reply: Any) -> Any:
        return [self.codec.view(m) for m in getattr(reply, self.field)]


@dataclass(frozen=True, slots=True)
class Fields:
    """A result in fields: one value, or a tuple of them (a view and its one-time secret)."""

    parts: tuple[tuple[str, ViewCodec[Any, Any]], ...]

    def message(self, result: Any, reply: type[Message]) -> Message:
        values = result if len(self.parts) > 1 else (result,)
        return reply(**{name: codec.message(v) for (name, codec), v in zip(self.parts, values, strict=True)})

    def result(self, reply: Any) -> Any:
        values = tuple(codec.view(getattr(reply, name)) for name, codec in self.parts)
        return values if len(values) > 1 else values[0]


@dataclass(frozen=True, slots=True)
class Nothing:
    """No result: an empty reply."""

    def message(self, result: Any, reply: type[Message]) -> Message:
        return reply()

    def result(self, reply: Any) -> Any:
        return None


@dataclass(frozen=True, slots=True)
class Stream:
    """Pages of results, streamed one message per row; `unit` is what a page counts."""

    codec: ViewCodec[Any, Any]
    unit: str


Reply = Whole | Each | Fields | Nothing | Stream


# --- arguments -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of an operation and the request field it travels in."""

    name: str
    field: str
    kind: str  # "time", "map", "list", "present" (a field with presence) or "scalar"
    zero: Any  # the field's zero, for "scalar" and "list"
    absent: Any  # what the server passes for a zero field
    unsendable_zero: bool  # the client refuses a zero value: it would arrive as `absent`

    def read(self, request: Any) -> Any:
        """The argument, from a request (the servicer's side)."""
        if self.kind == "time":
            return wire.when(request, self.field)
        value = getattr(request, self.field)
        if self.kind == "map":
            return dict(value)
        if self.kind == "present":
            return value if request.HasField(self.field) else None
        if self.kind == "list":
            value = list(value)
        return self.absent if value == self.zero else value

    def write(self, request: Any, value: Any) -> None:
        """Put the argument in a request (the client's side), or refuse it clearly."""
        if value is None and self.absent is None and self.kind in ("time", "present", "scalar", "list"):
            return  # not given: the field stays unset
        try:
            plain = [_plain(v) for v in value] if self.kind == "list" else _plain(value)
            if not (self.unsendable_zero and plain == self.zero):
                self._put(request, value, plain)
                return
        except (TypeError, ValueError, AttributeError):
            # The value is not echoed: it could be a secret.
            raise InvalidInput(f"The {self.name} given has a type or size the admin API cannot carry.") from None
        given = "not given" if self.absent is None else f"the default, {self.absent!r}"
        raise InvalidInput(f"An empty {self.name} cannot be sent: the admin API would read it as {given}.")

    def _put(self, request: Any, value: Any, plain: Any) -> None:
        if self.kind == "time":
            wire.stamp(getattr(request, self.field), value)
        elif self.kind == "map":
            getattr(request, self.field).update(dict(value))
        elif self.kind == "list":
            getattr(request, self.field).extend(plain)
        else:
            setattr(request, self.field, plain)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _args(op: str, request: type[Message], fixed: Mapping[str, Any], local: frozenset[str],
          defaults: Mapping[str, Any]) -> tuple[Arg, ...]:  # fmt: skip
    """Each argument of `op` and its field in `request`, checked both ways."""
    method = getattr(AdminOps, op)
    hints = typing.get_type_hints(method)
    names = [p for p in inspect.signature(method).parameters if p not in ("self", "actor", *fixed, *local)]
    fields = request.DESCRIPTOR.fields_by_name
    missing = [n for n in names if _FIELD_OF.get(n, n) not in fields]
    unfilled = set(fields) - {_FIELD_OF.get(n, n) for n in names}
    if missing or unfilled:
        raise TypeError(f"{op} and {request.__name__} disagree: no field for {missing}, no argument for {unfilled}")
    out = []
    for name in names:
        fd = fields[_FIELD_OF.get(name, name)]
        optional = type(None) in typing.get_args(hints[name])
        kind = wire.kind_of(fd)  # a request holds no repeated message
        zero = [] if kind == "list" else {} if kind == "map" else fd.default_value
        absent = None if optional else defaults.get(fd.name, zero)
        unsendable = kind in ("scalar", "list") and (optional or fd.name in defaults)
        out.append(Arg(name, fd.name, kind, zero, absent, unsendable))
    return tuple(out)


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One admin API method: the operation it runs, its reply, and what its request fixes."""

    name: str
    op: str
    reply: Reply = Nothing()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    echo: Mapping[str, str] = field(default_factory=dict)  # reply field <- request field
    local: frozenset[str] = frozenset()
    request: type[Message] = field(init=False)
    response: type[Message] = field(init=False)
    args: tuple[Arg, ...] = field(init=False)

    def __post_init__(self) -> None:
        method = _SERVICE.methods_by_name[self.name]
        if method.server_streaming != isinstance(self.reply, Stream):
            raise TypeError(f"{self.name}: a streaming reply is declared if and only if the method streams")
        object.__setattr__(self, "request", getattr(pb, method.input_type.name))
        object.__setattr__(self, "response", getattr(pb, method.output_type.name))
        object.__setattr__(self, "args", _args(self.op, self.request, self.fixed, self.local, self.defaults))

    def arguments(self, request: Any) -> dict[str, Any]:
        """The operation's keyword arguments from a request (the servicer's side)."""
        return {a.name: a.read(request) for a in self.args} | dict(self.fixed)

    def build(self, arguments: Mapping[str, Any]) -> Any:
        """The request for the operation's arguments (the client's side); refuses what cannot travel."""
        request = self.request()
        for a in self.args:
            a.write(request, arguments[a.name])
        return request

    def answer(self, result: Any, request: Any) -> Message:
        """The reply to a request, from the operation's result (the servicer's side)."""
        if isinstance(self.reply, Stream):
            raise TypeError(f"{self.name} streams: its rows are sent one by one")
        reply = self.reply.message(result, self.response)
        for name, source in self.echo.items():
            setattr(reply, name, getattr(request, source))
        return reply

    def matches(self, arguments: Mapping[str, Any]) -> bool:
        """Whether this method is the one for these arguments (by its `fixed` ones)."""
        return all(type(arguments.get(k)) is type(v) and arguments[k] == v for k, v in self.fixed.items())


_EXPORT_PAGING = frozenset({"page_size"})
RPCS: tuple[Rpc, ...] = (
    Rpc("WhoAmI", "whoami", Whole(wire.WHOAMI)),
    Rpc("ListServers", "list_servers", Each("servers", wire.SERVER)),
    Rpc("GetServer", "show_server", Whole(wire.SERVER)),
    Rpc("GetServerForm", "server_form", Whole(wire.FORM)),
    Rpc("AddServer", "add_server", Fields((("server", wire.SERVER), ("signing_secret", wire.SECRET)))),
    Rpc("UpdateServer", "update_server", Fields((("server", wire.SERVER), ("incompatible", wire.ISSUES)))),
    Rpc("SetSharedValues", "set_shared", Whole(wire.SERVER)),
    Rpc("RemoveServer", "remove_server"),
    Rpc("RotateSigningSecret", "rotate_signing_secret", Fields((("signing_secret", wire.SECRET),)),
        echo={"server": "name"}),
    Rpc("ListPrincipals", "list_principals", Each("principals", wire.PRINCIPAL)),
    Rpc("AddPrincipal", "add_principal", Whole(wire.PRINCIPAL),
        defaults={"team": "default", "roles": ["user"], "kind": "user"}),
    Rpc("DisablePrincipal", "set_principal_disabled", Whole(wire.PRINCIPAL), fixed={"disabled": True}),
    Rpc("EnablePrincipal", "set_principal_disabled", Whole(wire.PRINCIPAL), fixed={"disabled": False}),
    Rpc("UpdatePrincipal", "update_principal", Whole(wire.PRINCIPAL)),
    Rpc("DeletePrincipal", "delete_principal", Whole(wire.PRINCIPAL_DELETED)),
    Rpc("ListTeams", "list_teams", Each("teams", wire.TEAM)),
    Rpc("DisableTeam", "set_team_disabled", Whole(wire.TEAM), fixed={"disabled": True}),
    Rpc("EnableTeam", "set_team_disabled", Whole(wire.TEAM), fixed={"disabled": False}),
    Rpc("ListKeys", "list_keys", Each("keys", wire.KEY)),
    Rpc("CreateKey", "create_key", Fields((("key", wire.KEY), ("api_key", wire.SECRET)))),
    Rpc("RevokeKey", "revoke_key", Whole(wire.KEY)),
    Rpc("RegenerateKey", "regenerate_key", Fields((("key", wire.KEY), ("api_key", wire.SECRET))),
        echo={"replaced": "key_id", "grace_seconds": "grace_seconds"}),
    Rpc("ListOverrides", "list_overrides", Each("overrides", wire.OVERRIDE)),
    Rpc("SetOverride", "set_override", Whole(wire.OVERRIDE)),
    Rpc("DeleteOverride", "delete_override"),
    Rpc("TestOverride", "test_override", Whole(wire.OVERRIDE_TEST)),
    Rpc("GetCredentialStatus", "credential_status", Each("statuses", wire.STATUS)),
    Rpc("QueryAudit", "query_audit", Each("events", wire.AUDIT), defaults={"limit": DEFAULT_LIMIT}),
    # ExportAudit has no limit field: the client stops reading after `limit` events.
    Rpc("ExportAudit", "export_audit", Stream(wire.AUDIT, "events"), local=_EXPORT_PAGING | {"limit"}),
    Rpc("QueryUsage", "query_usage", Each("records", wire.USAGE), defaults={"limit": DEFAULT_LIMIT}),
    Rpc("ExportUsage", "export_usage", Stream(wire.USAGE, "records"), local=_EXPORT_PAGING),
)  # fmt: skip


def rpcs_of(op: str) -> tuple[Rpc, ...]:
    """The methods that run operation `op` (two for an enable/disable pair, none if local only)."""
    return _BY_OP.get(op, ())


_BY_OP: dict[str, tuple[Rpc, ...]] = {}
for _rpc in RPCS:
    _BY_OP[_rpc.op] = (*_BY_OP.get(_rpc.op, ()), _rpc)


def operations() -> list[str]:
    """Every operation of `AdminOps`, by name."""
    return [n for n, v in vars(AdminOps).items() if inspect.iscoroutinefunction(v)]


_uncovered = set(operations()) - set(_BY_OP) - LOCAL_ONLY
_unknown = {r.name for r in RPCS} ^ {m.name for m in _SERVICE.methods}
if _uncovered or _unknown:
    raise TypeError(f"The admin API table is incomplete: operations {_uncovered}, methods {_unknown}")
