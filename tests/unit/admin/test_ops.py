"""admin/ops.py, the one admin contract: `AdminOps` and its two implementations, `AdminService`
and `RemoteAdmin`: every operation is on both sides with one signature (names, kinds, defaults).
That every argument the client gives reaches the server: test_rpcs.py."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from authz_server.admin.ops import AdminOps
from authz_server.admin.policy import Actor
from authz_server.admin.remote import RemoteAdmin
from authz_server.admin.service import AdminService

from ..fakes import operations

# Public coroutines that are not admin operations: the local operator's setup, and a client's own.
NOT_OPERATIONS = {AdminService: {"verify_master_key", "initialize"}, RemoteAdmin: {"close"}}


def _shape(function: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def contract_gaps(cls: type) -> list[str]:
    """What `cls` does differently from AdminOps: missing or extra operations, other signatures."""
    declared = operations(AdminOps)
    have = {n: f for n, f in operations(cls).items() if n not in NOT_OPERATIONS.get(cls, set())}
    gaps = [f"{n}: not on {cls.__name__}" for n in sorted(set(declared) - set(have))]
    gaps += [f"{n}: not in AdminOps" for n in sorted(set(have) - set(declared))]
    gaps += [f"{n}: {_shape(have[n])} != {_shape(f)}" for n, f in declared.items() if n in have and _shape(have[n]) != _shape(f)]
    return gaps


@pytest.mark.parametrize("cls", [AdminService, RemoteAdmin])
def test_both_sides_implement_every_operation_with_its_one_signature(cls: type) -> None:
    assert len(operations(AdminOps)) == 30
    assert contract_gaps(cls) == []


def test_the_check_sees_a_missing_an_extra_and_a_changed_operation() -> None:
    class Drifted(AdminService):
        async def whoami(self, actor: Actor, verbose: bool = False) -> Any:  # type: ignore[override]
            return None

        async def extra(self, actor: Actor) -> None:
            return None

    class Partial(RemoteAdmin):
        pass

    del_target = "list_teams"
    setattr(Partial, del_target, None)  # hides RemoteAdmin.list_teams
    gaps = contract_gaps(Drifted)
    assert "extra: not in AdminOps" in gaps and any(g.startswith("whoami:") for g in gaps)
    assert "list_teams: not on Partial" in contract_gaps(Partial)
