"""admin/rpcs.py, the table of RPCs between `RemoteAdmin` and the servicer: every argument the CLI
gives a `RemoteAdmin` reaches the server unchanged, or is refused with a clear error (the client's
refusals: test_remote.py): nothing is silently dropped."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import pytest

from authz_server.admin import rpcs
from authz_server.admin.gen import admin_pb2 as pb
from authz_server.admin.ops import AdminOps

from ..fakes import operations

WHEN = datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc)


def _sample(name: str, hint: Any) -> Any:
    """A value of the argument's type that is not its default: it must arrive as it was given."""
    samples = {"mode": "shared", "kind": "service", "roles": ["manager"], "limit": 5, "grace_seconds": 300,
               "rate_limit_per_minute": 60, "values": {"API_KEY": "v"}}  # fmt: skip
    if name in samples:
        return samples[name]
    args = set(typing.get_args(hint)) or {hint}
    if datetime in args:
        return WHEN
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint) and len(inner) == 1
    origin = typing.get_origin(inner[0] if optional else hint)  # X | None: X's
    if origin is not None and issubclass(origin, Iterable) and origin is not str:
        return [f"{name}-1", f"{name}-2"]
    return f"{name}-x"


def _arguments(rpc: rpcs.Rpc) -> dict[str, Any]:
    method = getattr(AdminOps, rpc.op)
    hints = typing.get_type_hints(method)
    names = [p for p in inspect.signature(method).parameters if p not in ("self", "actor", *rpc.local)]
    return {n: rpc.fixed[n] if n in rpc.fixed else _sample(n, hints[n]) for n in names}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    return list(value) if isinstance(value, (tuple, set)) else value


@pytest.mark.parametrize("rpc", rpcs.RPCS, ids=lambda r: r.name)
def test_every_argument_reaches_the_server_unchanged(rpc: rpcs.Rpc) -> None:
    given = _arguments(rpc)
    assert rpc.matches(given)
    received = rpc.arguments(rpc.build(given))
    assert received == {k: _plain(v) for k, v in given.items()}


@pytest.mark.parametrize("rpc", rpcs.RPCS, ids=lambda r: r.name)
def test_what_the_client_applies_itself_is_an_argument_without_a_field(rpc: rpcs.Rpc) -> None:
    parameters = inspect.signature(getattr(AdminOps, rpc.op)).parameters
    fields = set(rpc.request.DESCRIPTOR.fields_by_name)
    assert all(name in parameters and name not in fields for name in rpc.local)
    assert not any(name in fields for name in rpc.fixed)


def test_only_pruning_is_local_and_every_method_of_the_proto_is_served() -> None:
    served = {r.op for r in rpcs.RPCS}
    assert set(operations(AdminOps)) - served == rpcs.LOCAL_ONLY == {"prune_usage"}
    assert {r.name for r in rpcs.RPCS} == {m.name for m in pb.DESCRIPTOR.services_by_name["Admin"].methods}


@pytest.mark.parametrize("rpc", rpcs.RPCS, ids=lambda r: r.name)
def test_an_argument_not_given_arrives_as_not_given(rpc: rpcs.Rpc) -> None:
    """None for an argument that may be None (an edit's unchanged field, a list among them) leaves
    its field unset, and the server reads None back."""
    method = getattr(AdminOps, rpc.op)
    hints = typing.get_type_hints(method)
    given = _arguments(rpc)
    unset = {n for n in given if n not in rpc.fixed and type(None) in typing.get_args(hints[n])}
    received = rpc.arguments(rpc.build({n: None if n in unset else v for n, v in given.items()}))
    assert {n: received[n] for n in unset} == dict.fromkeys(unset)
