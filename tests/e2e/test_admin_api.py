"""Issue 4, end to end: the admin API over real gRPC (the remote CLI's client and the `mcp-authz
--server` CLI itself) and as JSON through Envoy's grpc_json_transcoder, against the real sidecar,
with real gateway keys; Check's answers through Envoy to the example MCP server.

1. the role matrix: each role x each operation x own / a user's / a manager's / an admin's ->
   allowed or PERMISSION_DENIED (gRPC), and a representative subset as JSON through Envoy (HTTP 403);
2. a user sets, lists (masked) and deletes their own override; Check injects it within 1 s;
3. a manager sets a user's override: updated_by is the manager;
4. keys: created and shown once, listed without secrets, revoked, regenerated; an expired key is refused;
5. the status table after each change: configured, missing, invalid (a failed `overrides test`
   against an upstream that wants `Bearer right`), expired;
6. audit events for each of the above (each test checks its own), and at the end a scan of the
   whole audit trail, the sidecar's logs and every CLI output for every secret used.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest

from authz_server.admin.gen import admin_pb2, admin_pb2_grpc
from authz_server.admin.remote import RemoteAdmin
from authz_server.admin.service import Actor
from authz_server.errors import RemoteError
from authz_server.models import Secret

from .harness import LOOPBACK, EnvoyProcess, ExampleServer, post_initialize, run_envoy, run_example_server
from .sidecar import CLI, Sidecar, World, add_key, admin_service, run_sidecar, seed

pytestmark = pytest.mark.e2e
SERVERS = ("github", "linear", "open", "crm", "mx-ind")
RIGHT = "right"  # the strict upstream accepts only `Authorization: Bearer right`
ANY = Actor.key_holder()  # a RemoteAdmin acts as the holder of its key: the key decides


@dataclass
class Stack:
    world: World
    sidecar: Sidecar
    upstream: ExampleServer  # behind Envoy's MCP routes: accepts anything
    strict: ExampleServer  # the servers' upstream_url for `overrides test`: wants Bearer right
    envoy: EnvoyProcess
    secrets: set[str] = field(default_factory=set)  # never to appear in the audit trail or logs
    outputs: list[tuple[str, set[str]]] = field(default_factory=list)  # CLI output, one-time secrets it issued

    @property
    def target(self) -> str:
        return self.sidecar.admin_target  # the admin listener, never the Check listener

    def key(self, who: str) -> str:
        return self.world.keys[who]

    def bearer(self, who_or_key: str) -> dict[str, str]:
        key = self.world.keys.get(who_or_key, who_or_key)
        return {"authorization": f"Bearer {key}"}

    def remote(self, who_or_key: str) -> RemoteAdmin:
        return RemoteAdmin(self.target, Secret(self.world.keys.get(who_or_key, who_or_key)))

    def cli(self, who: str, *args: str, stdin: str | None = None, issued: set[str] | None = None) -> subprocess.CompletedProcess[str]:
        """`mcp-authz --server HOST:PORT ARGS` as `who` (MCP_AUTHZ_KEY), as a user would run it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_AUTHZ_")}
        env["MCP_AUTHZ_KEY"] = self.key(who)
        done = subprocess.run(
            [CLI, "--server", self.target, *args], input=stdin, capture_output=True, text=True, env=env, timeout=30
        )
        self.outputs.append((done.stdout + done.stderr, issued or set()))
        return done

    def json_api(self, method: str, path: str, who: str | None = None, body: Any = None) -> httpx.Response:
        """The admin API as JSON through Envoy (ext_authz is off on /admin/: the sidecar authenticates)."""
        headers = self.bearer(who) if who else {}
        return httpx.request(method, f"{self.envoy.base_url}{path}", headers=headers, json=body, timeout=10)


async def _seed_more(world: World, strict_port: int) -> None:
    """The admin-API cast, on top of `seed`'s: an admin, a manager and users for the role matrix
    and the flows, a server `crm` for the status table, and upstream URLs for `overrides test`."""
    async with admin_service(world) as svc:
        op = Actor.operator()
        cast = [("ada", "ops", "admin"), ("mia", "ops", "manager"), ("uma", "eng", "user"), ("ola", "eng", "user"),
                ("mx-admin", "mx", "admin"), ("mx-manager", "mx", "manager"), ("mx-user", "mx", "user"),
                ("mx-other", "mx", "user"), ("mx-manager2", "mx", "manager"), ("mx-admin2", "mx", "admin"),
                ("mx-victim", "mx-team", "user")]  # fmt: skip
        for name, team, role in cast:
            await svc.add_principal(op, name, team, [role])
            await add_key(svc, world, name)
        header = ["Authorization: Bearer {{API_KEY}}"]
        for name in ("crm", "mx-ind"):
            url = f"http://{LOOPBACK}:{strict_port}/mcp/{name}"
            _, secret = await svc.add_server(op, name, "individual", header, upstream_url=url)
            world.signing[name] = secret.reveal()
        await svc.update_server(op, "github", upstream_url=f"http://{LOOPBACK}:{strict_port}/mcp/github")
        await svc.add_server(op, "mx-shared", "shared", header)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("admin")
    with ExitStack() as stop:
        upstream = stop.enter_context(run_example_server(tmp))
        strict = stop.enter_context(run_example_server(tmp, expect_tokens={"authorization": f"Bearer {RIGHT}"}))
        world = asyncio.run(seed(tmp / "world"))
        asyncio.run(_seed_more(world, strict.port))
        sidecar = stop.enter_context(run_sidecar(world))
        envoy = stop.enter_context(
            run_envoy(tmp, authz_port=sidecar.port, authz_admin_port=sidecar.admin_port, upstream_port=upstream.port,
                      servers=SERVERS)
        )
        s = Stack(world, sidecar, upstream, strict, envoy)
        s.secrets |= set(world.keys.values()) | set(world.credentials) | {RIGHT, MATRIX_VALUE}
        s.secrets |= {"mx-shared-value-0123456", "json-own-value-012345", "json-value-0123456"}
        yield s


async def _eventually(probe: Callable[[], Awaitable[bool]], seconds: float = 1.0) -> float:
    """Poll `probe` every 20 ms until true; return how long it took. Fails past `seconds`."""
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _injected(s: Stack, who_or_key: str, server: str) -> tuple[int, str | None]:
    """Call `server` through Envoy as `who`: the status, and the Authorization the upstream got."""
    before = s.upstream.stats()["requests"]
    r = await post_initialize(s.envoy.url(server), s.bearer(who_or_key))
    stats = s.upstream.stats()
    got = stats["headers"][-1].get("authorization") if stats["requests"] > before else None
    return r.status, got


def _audited(events: list[Any], action: str, target: str, outcome: str = "ok") -> list[Any]:
    found = [e for e in events if e.action == action and e.target == target and e.outcome == outcome]
    assert found, f"no {outcome} {action} on {target} in the audit trail"
    return found


async def _audit(s: Stack, **filters: Any) -> list[Any]:
    async with s.remote("ada") as admin:
        return await admin.query_audit(ANY, **filters)


# 1 -- the role matrix ---------------------------------------------------------------------------

ROLES = {"admin": "mx-admin", "manager": "mx-manager", "user": "mx-user"}
OTHER = "mx-other"
# Whose thing an operation is on: the caller's own, or another principal's with that role
# (never the caller itself: each role's caller has a second principal of its own rank to act on).
WHOSE = {"user": OTHER, "manager": "mx-manager2", "admin": "mx-admin2"}
Op = Callable[[RemoteAdmin, RemoteAdmin, str], Awaitable[Any]]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


GHOST = "mx-ghost"  # no such principal: refusals must not differ from someone else's
MATRIX_VALUE = "matrix-value-0123456789"


async def _fresh_key(admin: RemoteAdmin, target: str) -> str:
    if target == GHOST:
        return "Zz9Zz9Z"  # no such key either
    view, _ = await admin.create_key(ANY, target, "matrix")
    return view.key_id


async def _with_override(admin: RemoteAdmin, target: str) -> None:
    if target != GHOST:
        await admin.set_override(ANY, target, "mx-ind", {"API_KEY": MATRIX_VALUE})


async def _revoke(c: RemoteAdmin, a: RemoteAdmin, t: str) -> None:
    await c.revoke_key(ANY, await _fresh_key(a, t))


async def _regenerate(c: RemoteAdmin, a: RemoteAdmin, t: str) -> None:
    await c.regenerate_key(ANY, await _fresh_key(a, t))


async def _delete_override(c: RemoteAdmin, a: RemoteAdmin, t: str) -> None:
    await _with_override(a, t)
    await c.delete_override(ANY, t, "mx-ind")


async def _test_override(c: RemoteAdmin, a: RemoteAdmin, t: str) -> None:
    await _with_override(a, t)
    await c.test_override(ANY, "mx-ind", t)


async def _usage_export(c: RemoteAdmin, target: str) -> None:
    async for _ in await c.export_usage(ANY, target):
        pass


async def _audit_export(c: RemoteAdmin) -> None:
    async for _ in await c.export_audit(ANY, action="whoami"):
        pass


async def _remove_server(c: RemoteAdmin, admin: RemoteAdmin) -> None:
    name = _unique("mx")
    await admin.add_server(ANY, name, "none")
    await c.remove_server(ANY, name)


async def _delete_principal(c: RemoteAdmin, admin: RemoteAdmin) -> None:
    name = _unique("mx")
    await admin.add_principal(ANY, name, "mx", ["user"])
    await c.delete_principal(ANY, name)


async def _toggle_principal(c: RemoteAdmin) -> None:
    await c.set_principal_disabled(ANY, "mx-victim", True)
    await c.set_principal_disabled(ANY, "mx-victim", False)


async def _toggle_team(c: RemoteAdmin) -> None:
    await c.set_team_disabled(ANY, "mx-team", True)
    await c.set_team_disabled(ANY, "mx-team", False)


# Each operation as the caller `c` would do it, on `t` (its own principal or someone else's);
# `a` is an admin client for setting the stage.
OPS: dict[str, Op] = {
    "whoami": lambda c, a, t: c.whoami(ANY),
    "servers.list": lambda c, a, t: c.list_servers(ANY),
    "servers.show": lambda c, a, t: c.show_server(ANY, "mx-ind"),
    "servers.form": lambda c, a, t: c.server_form(ANY, "mx-ind"),
    "servers.add": lambda c, a, t: c.add_server(ANY, _unique("mx"), "none"),
    "servers.update": lambda c, a, t: c.update_server(ANY, "mx-shared", description=_unique("d")),
    "servers.set_shared": lambda c, a, t: c.set_shared(ANY, "mx-shared", {"API_KEY": "mx-shared-value-0123456"}),
    "servers.rotate_signing_secret": lambda c, a, t: c.rotate_signing_secret(ANY, "mx-shared"),
    "servers.remove": lambda c, a, t: _remove_server(c, a),
    "principals.list": lambda c, a, t: c.list_principals(ANY),
    "principals.add": lambda c, a, t: c.add_principal(ANY, _unique("mx"), "mx", ["user"]),
    "principals.disable+enable": lambda c, a, t: _toggle_principal(c),
    "principals.update": lambda c, a, t: c.update_principal(ANY, "mx-victim", rate_limit_per_minute=600),
    "principals.delete": lambda c, a, t: _delete_principal(c, a),
    "teams.list": lambda c, a, t: c.list_teams(ANY),
    "teams.disable+enable": lambda c, a, t: _toggle_team(c),
    "keys.create": lambda c, a, t: c.create_key(ANY, t, "matrix"),
    "keys.list": lambda c, a, t: c.list_keys(ANY, t),
    "keys.revoke": lambda c, a, t: _revoke(c, a, t),
    "keys.regenerate": lambda c, a, t: _regenerate(c, a, t),
    "overrides.set": lambda c, a, t: c.set_override(ANY, t, "mx-ind", {"API_KEY": MATRIX_VALUE}),
    "overrides.list": lambda c, a, t: c.list_overrides(ANY, "mx-ind", t),
    "overrides.delete": lambda c, a, t: _delete_override(c, a, t),
    "overrides.status": lambda c, a, t: c.credential_status(ANY, "mx-ind", t),
    "overrides.test": lambda c, a, t: _test_override(c, a, t),
    "usage.query": lambda c, a, t: c.query_usage(ANY, t),
    "usage.export": lambda c, a, t: _usage_export(c, t),
    "audit.query": lambda c, a, t: c.query_audit(ANY, limit=5),
    "audit.export": lambda c, a, t: _audit_export(c),
}



# The specification, as a table: operation -> (admin, manager, user), each on its own thing and
# on a user's, a manager's and an admin's (another principal's). Nobody acts on a principal who
# outranks them; only admins touch another principal's keys (a key for someone is the power to
# act as them); a manager handles the overrides and usage of anyone not above them.
# Operations on no principal's thing have one value for all four.
Y, N = True, False
Row = tuple[bool, bool, bool, bool]  # own, a user's, a manager's, an admin's
MATRIX: dict[str, tuple[Row, Row, Row]] = {
    #                                  admin           manager         user
    #                                  own usr mgr adm own usr mgr adm own usr mgr adm
    "whoami":                        ((Y, Y, Y, Y),   (Y, Y, Y, Y),   (Y, Y, Y, Y)),
    "servers.form":                  ((Y, Y, Y, Y),   (Y, Y, Y, Y),   (Y, Y, Y, Y)),
    "servers.list":                  ((Y, Y, Y, Y),   (Y, Y, Y, Y),   (N, N, N, N)),
    "servers.show":                  ((Y, Y, Y, Y),   (Y, Y, Y, Y),   (N, N, N, N)),
    "servers.add":                   ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "servers.update":                ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "servers.set_shared":            ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "servers.rotate_signing_secret": ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "servers.remove":                ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "principals.list":               ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "principals.add":                ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "principals.disable+enable":     ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "principals.update":             ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "principals.delete":             ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "teams.list":                    ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "teams.disable+enable":          ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "keys.create":                   ((Y, Y, Y, Y),   (Y, N, N, N),   (Y, N, N, N)),
    "keys.list":                     ((Y, Y, Y, Y),   (Y, N, N, N),   (Y, N, N, N)),
    "keys.revoke":                   ((Y, Y, Y, Y),   (Y, N, N, N),   (Y, N, N, N)),
    "keys.regenerate":               ((Y, Y, Y, Y),   (Y, N, N, N),   (Y, N, N, N)),
    "overrides.set":                 ((Y, Y, Y, Y),   (Y, Y, Y, N),   (Y, N, N, N)),
    "overrides.list":                ((Y, Y, Y, Y),   (Y, Y, Y, N),   (Y, N, N, N)),
    "overrides.delete":              ((Y, Y, Y, Y),   (Y, Y, Y, N),   (Y, N, N, N)),
    "overrides.status":              ((Y, Y, Y, Y),   (Y, Y, Y, N),   (Y, N, N, N)),
    "overrides.test":                ((Y, Y, Y, Y),   (Y, Y, Y, N),   (Y, N, N, N)),
    "usage.query":                   ((Y, Y, Y, Y),   (Y, Y, Y, N),   (Y, N, N, N)),
    "usage.export":                  ((Y, Y, Y, Y),   (Y, Y, Y, N),   (Y, N, N, N)),
    "audit.query":                   ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
    "audit.export":                  ((Y, Y, Y, Y),   (N, N, N, N),   (N, N, N, N)),
}  # fmt: skip
assert set(MATRIX) == set(OPS)


OWNED = ("keys.", "overrides.", "usage.")  # a principal's things: whose they are can matter


def _cases() -> Iterator[Any]:
    for op, by_role in MATRIX.items():
        for (role, (own, *others)) in zip(ROLES, by_role, strict=True):
            if op.startswith(OWNED):
                yield pytest.param(role, op, "own", own, id=f"{role}-{op}-own")
                for whose, allowed in zip(WHOSE, others, strict=True):
                    yield pytest.param(role, op, whose, allowed, id=f"{role}-{op}-{whose}")
            else:
                assert len({own, *others}) == 1, op  # nobody owns a server, a team or the audit trail
                yield pytest.param(role, op, "user", own, id=f"{role}-{op}")


@pytest.mark.parametrize(("role", "op", "whose", "allowed"), list(_cases()))
async def test_role_matrix_over_grpc(stack: Stack, role: str, op: str, whose: str, allowed: bool) -> None:
    me = ROLES[role]
    target = me if whose == "own" else WHOSE[whose]
    async with stack.remote(me) as caller, stack.remote("mx-admin") as admin:
        if allowed:
            await OPS[op](caller, admin, target)
        else:
            with pytest.raises(RemoteError) as refused:
                await OPS[op](caller, admin, target)
            assert refused.value.reason == "permission_denied", refused.value.message
            assert target not in refused.value.message
            if whose != "own":
                # Someone who does not exist is refused the same way: nothing reveals existence,
                # nor that a name is an admin's.
                with pytest.raises(RemoteError) as ghost:
                    await OPS[op](caller, admin, GHOST)
                assert (ghost.value.reason, ghost.value.message) == ("permission_denied", refused.value.message)


def test_the_matrix_holds_the_corrected_role_model() -> None:
    """Issue 11: manager x (create, regenerate, revoke key) x (self, user, admin) and user x the same."""
    own, user, manager, admin = range(4)
    for op in ("keys.create", "keys.regenerate", "keys.revoke"):
        _, by_manager, by_user = MATRIX[op]
        assert by_manager[own] and not (by_manager[user] or by_manager[manager] or by_manager[admin]), op
        assert by_user[own] and not (by_user[user] or by_user[manager] or by_user[admin]), op
    for op in ("overrides.set", "overrides.delete", "overrides.test", "overrides.status", "overrides.list"):
        _, by_manager, _ = MATRIX[op]
        assert by_manager[user] and by_manager[manager] and not by_manager[admin], op


def test_a_managers_lists_of_everyone_leave_out_admins(stack: Stack) -> None:
    admins = {"ada", "mx-admin", "mx-admin2"}
    status, overrides = "/admin/v1/servers/mx-ind/status", "/admin/v1/overrides?server=mx-ind"
    for path, rows in ((status, "statuses"), (overrides, "overrides")):
        seen = {row["principal"] for row in stack.json_api("GET", path, "mx-manager").json().get(rows, [])}
        assert not seen & admins, (path, seen & admins)
    every = {row["principal"] for row in stack.json_api("GET", status, "mx-admin").json()["statuses"]}
    assert admins <= every and {"mx-manager", "mx-manager2", "mx-user"} <= every


# (role, method, path, body, expected HTTP status): the same rules as JSON through Envoy.
JSON_CASES = [
    ("user", "GET", "/admin/v1/whoami", None, 200),
    ("user", "GET", "/admin/v1/servers", None, 403),
    ("manager", "GET", "/admin/v1/servers", None, 200),
    ("user", "GET", "/admin/v1/servers/mx-ind/form", None, 200),
    ("user", "GET", "/admin/v1/keys?principal=mx-user", None, 200),
    ("user", "GET", "/admin/v1/keys?principal=mx-other", None, 403),
    ("user", "GET", "/admin/v1/keys?principal=mx-ghost", None, 403),
    ("manager", "GET", "/admin/v1/keys?principal=mx-manager", None, 200),
    ("manager", "GET", "/admin/v1/keys?principal=mx-other", None, 403),
    ("manager", "POST", "/admin/v1/keys", {"principal": "mx-admin", "label": "json"}, 403),
    ("manager", "POST", "/admin/v1/keys", {"principal": "mx-other", "label": "json"}, 403),
    ("manager", "POST", "/admin/v1/keys", {"principal": "mx-ghost", "label": "json"}, 403),
    ("user", "PUT", "/admin/v1/overrides/mx-ind", {"values": {"API_KEY": "json-own-value-012345"}}, 200),
    ("user", "PUT", "/admin/v1/overrides/mx-ind/mx-other", {"values": {"API_KEY": "json-value-0123456"}}, 403),
    ("manager", "PUT", "/admin/v1/overrides/mx-ind/mx-other", {"values": {"API_KEY": "json-value-0123456"}}, 200),
    ("manager", "PUT", "/admin/v1/overrides/mx-ind/mx-admin", {"values": {"API_KEY": "json-value-0123456"}}, 403),
    ("manager", "GET", "/admin/v1/status?principal=mx-admin", None, 403),
    ("user", "GET", "/admin/v1/servers/mx-ind/status", None, 200),
    ("user", "GET", "/admin/v1/status?principal=mx-other", None, 403),
    ("manager", "GET", "/admin/v1/servers/mx-ind/status", None, 200),
    ("user", "POST", "/admin/v1/principals", {"name": "mx-json", "team": "mx"}, 403),
    ("manager", "POST", "/admin/v1/principals", {"name": "mx-json", "team": "mx"}, 403),
    ("manager", "PATCH", "/admin/v1/principals/mx-user", {"roles": ["admin"]}, 403),
    ("user", "DELETE", "/admin/v1/principals/mx-other", None, 403),
    ("admin", "PATCH", "/admin/v1/principals/mx-victim", {"rateLimitPerMinute": 900}, 200),
    ("admin", "DELETE", "/admin/v1/principals/mx-ghost", None, 404),
    ("admin", "PATCH", "/admin/v1/servers/mx-shared", {"headers": ["Bad Header: {{X}}"]}, 400),
    ("user", "GET", "/admin/v1/audit", None, 403),
    ("manager", "GET", "/admin/v1/audit", None, 403),
    ("admin", "GET", "/admin/v1/audit?action=whoami&limit=3", None, 200),
    ("user", "DELETE", "/admin/v1/overrides/mx-ind/mx-other", None, 403),
    ("user", "GET", "/admin/v1/overrides?server=mx-ind", None, 200),
    (None, "GET", "/admin/v1/whoami", None, 401),
    ("user", "GET", "/admin/v1/nonsense", None, 404),
]


@pytest.mark.parametrize(("role", "method", "path", "body", "status"), JSON_CASES)
def test_role_matrix_subset_as_json_through_envoy(
    stack: Stack, role: str | None, method: str, path: str, body: Any, status: int
) -> None:
    r = stack.json_api(method, path, ROLES[role] if role else None, body)
    assert r.status_code == status, r.text
    if status in (401, 403):
        error = r.json()
        assert error["code"] == {401: 16, 403: 7}[status] and error["message"]
        assert not any(key in r.text for key in stack.world.keys.values())


# 2 -- a user's own override, through Envoy, and Check ---------------------------------------------------


async def test_user_sets_lists_and_deletes_own_override_and_check_follows(stack: Stack) -> None:
    token = f"uma-personal-{uuid.uuid4().hex}"
    stack.secrets.add(token)
    status, _ = await _injected(stack, "uma", "github")
    assert status == 403  # individual mode, nothing set yet

    put = stack.json_api("PUT", "/admin/v1/overrides/github", "uma", {"values": {"API_KEY": token}})
    assert put.status_code == 200, put.text
    assert put.json()["updated_by"] == "uma" and token not in put.text
    took = await _eventually(lambda: _has(stack, "uma", "github", f"Bearer {token}"))
    assert took <= 1.0

    listed = stack.json_api("GET", "/admin/v1/overrides?server=github", "uma").json()["overrides"]
    assert [(o["principal"], o["values"]) for o in listed] == [("uma", {"API_KEY": f"…{token[-4:]}"})]
    assert token not in json.dumps(listed)

    assert stack.json_api("DELETE", "/admin/v1/overrides/github", "uma").status_code == 200
    took = await _eventually(lambda: _status_is(stack, "uma", "github", 403))
    assert took <= 1.0
    assert stack.json_api("GET", "/admin/v1/overrides", "uma").json()["overrides"] == []

    # The same with the remote CLI: the value from stdin, the server by --server-name.
    token2 = f"uma-cli-{uuid.uuid4().hex}"
    stack.secrets.add(token2)
    done = stack.cli("uma", "overrides", "set", "--server-name", "github", stdin=token2 + "\n")
    assert done.returncode == 0, done.stderr
    assert "Set the override of uma for github" in done.stdout and token2 not in done.stdout
    assert await _eventually(lambda: _has(stack, "uma", "github", f"Bearer {token2}")) <= 1.0
    listing = stack.cli("uma", "overrides", "list")
    assert "uma" in listing.stdout and f"…{token2[-4:]}" in listing.stdout
    assert stack.cli("uma", "overrides", "delete", "--server-name", "github").returncode == 0

    events = await _audit(stack, actor_name="uma", action="overrides.*")
    _audited(events, "overrides.set", "override:uma/github")
    _audited(events, "overrides.list", "override:*/github")
    _audited(events, "overrides.delete", "override:uma/github")
    assert all(e.request_id for e in events)
    assert len({e.request_id for e in events}) == len(events)  # one per call


async def _has(s: Stack, who: str, server: str, expected: str) -> bool:
    status, got = await _injected(s, who, server)
    return status == 200 and got == expected


async def _status_is(s: Stack, who: str, server: str, expected: int) -> bool:
    return (await _injected(s, who, server))[0] == expected


# 3 -- a manager sets a user's override --------------------------------------------------------------


async def test_manager_creates_an_override_for_a_user(stack: Stack) -> None:
    token = f"ola-by-mia-{uuid.uuid4().hex}"
    stack.secrets.add(token)
    async with stack.remote("mia") as mia:
        view = await mia.set_override(ANY, "ola", "github", {"API_KEY": token})
    assert (view.principal, view.updated_by, view.status) == ("ola", "mia", "configured")
    assert await _eventually(lambda: _has(stack, "ola", "github", f"Bearer {token}")) <= 1.0
    # Ola sees who set it, masked; so does the manager's status table.
    async with stack.remote("ola") as ola:
        (mine,) = await ola.list_overrides(ANY, "github")
    assert (mine.updated_by, dict(mine.masks)) == ("mia", {"API_KEY": f"…{token[-4:]}"})
    table = stack.cli("mia", "--json", "overrides", "status", "--server-name", "github", "--principal", "ola")
    (row,) = json.loads(table.stdout)["statuses"]
    assert (row["updated_by"], row["status"], row["source"]) == ("mia", "configured", "override")
    (event,) = _audited(await _audit(stack, actor_name="mia", action="overrides.set"), "overrides.set",
                        "override:ola/github")
    assert event.actor == "mia" and dict(event.details)["fields"] == "API_KEY"


# 4 -- keys: shown once, listed without secrets, revoked, regenerated, expired -------------------------------


async def test_key_lifecycle_through_the_api_and_check(stack: Stack) -> None:
    # Created as JSON through Envoy: the key is in this one answer.
    created = stack.json_api("POST", "/admin/v1/keys", "uma", {"label": "ci"})
    assert created.status_code == 200, created.text
    new_key, key_id = created.json()["api_key"], created.json()["key"]["key_id"]
    stack.secrets.add(new_key)
    assert new_key.startswith(f"mgw_{key_id}") and created.json()["key"]["principal"] == "uma"
    # Every sidecar learns of it from the store's change log within a second.
    assert await _eventually(lambda: _status_is(stack, new_key, "open", 200)) <= 1.0

    # Listed: key ids and metadata, never a key or a hash.
    listing = stack.json_api("GET", "/admin/v1/keys", "uma")
    assert key_id in listing.text and "mgw_" not in listing.text and "argon2" not in listing.text
    fields = {"key_id", "principal", "label", "status", "scope", "created_at", "last_used_at", "expires_at",
              "revoked_at"}
    assert all(set(k) <= fields for k in listing.json()["keys"])  # nothing else: no hash, no key

    # Revoked: Check and the admin API refuse it within a second.
    revoked = stack.json_api("POST", f"/admin/v1/keys/{key_id}:revoke", "uma", {})
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert await _eventually(lambda: _status_is(stack, new_key, "open", 401)) <= 1.0
    r = await post_initialize(stack.envoy.url("open"), stack.bearer(new_key))
    assert r.body["error"]["data"]["reason"] == "key_revoked"
    assert stack.json_api("GET", "/admin/v1/whoami", new_key).status_code == 401

    # Regenerated over gRPC: the replacement works, the old key stops at once.
    async with stack.remote("uma") as uma:
        view, first = await uma.create_key(ANY, None, "laptop")
        second_view, second = await uma.regenerate_key(ANY, view.key_id)
    stack.secrets |= {first.reveal(), second.reveal()}
    assert second_view.key_id != view.key_id and second_view.label == "laptop"
    assert await _eventually(lambda: _status_is(stack, first.reveal(), "open", 401)) <= 1.0
    assert await _eventually(lambda: _status_is(stack, second.reveal(), "open", 200)) <= 1.0
    async with stack.remote(second.reveal()) as again:
        assert (await again.whoami(ANY)).name == "uma"

    # Expired: a key that expires in two seconds works, then is refused by Check and the admin API.
    async with stack.remote("uma") as uma:
        _, brief = await uma.create_key(ANY, None, "brief", expires_at=datetime.now(UTC) + timedelta(seconds=2))
    stack.secrets.add(brief.reveal())
    assert await _eventually(lambda: _status_is(stack, brief.reveal(), "open", 200)) <= 1.0
    await asyncio.sleep(2.1)
    r = await post_initialize(stack.envoy.url("open"), stack.bearer(brief.reveal()))
    assert (r.status, r.body["error"]["data"]["reason"]) == (401, "key_expired")
    async with stack.remote(brief.reveal()) as expired:
        with pytest.raises(RemoteError) as refused:
            await expired.whoami(ANY)
    assert refused.value.reason == "key_expired"

    events = await _audit(stack, actor_name="uma", action="keys.*")
    _audited(events, "keys.create", f"key:{key_id}")
    _audited(events, "keys.revoke", f"key:{key_id}")
    (regen,) = _audited(events, "keys.regenerate", f"key:{view.key_id}")
    assert dict(regen.details)["new_key_id"] == second_view.key_id
    # Refusals are security events, from Check and from the admin API alike (written behind).
    async def refusals_recorded() -> bool:
        seen = {(e.outcome, dict(e.details).get("api")) for e in await _audit(stack, action="authn.failure")}
        return {("key_revoked", "admin"), ("key_revoked", None), ("key_expired", "admin"),
                ("key_expired", None)} <= seen

    await _eventually(refusals_recorded, seconds=3.0)
    assert {e.target for e in await _audit(stack, action="authn.failure", target=key_id)} == {key_id}


# 5 -- the status table after each change ---------------------------------------------------------------------


def _status_rows(s: Stack) -> dict[str, tuple[str, str]]:
    """`mcp-authz overrides status --server-name crm` as a manager: principal -> (indicator, status)."""
    done = s.cli("mia", "overrides", "status", "--server-name", "crm")
    assert done.returncode == 0, done.stderr
    rows: dict[str, tuple[str, str]] = {}
    for line in done.stdout.splitlines()[1:]:
        cells = line.split()
        if len(cells) > 5 and cells[0] == "crm":
            rows[cells[1]] = (cells[4], cells[5])
    return rows


async def test_status_table_after_each_change(stack: Stack) -> None:
    rows = _status_rows(stack)
    assert rows["uma"] == rows["ola"] == rows["bob"] == ("🟡", "missing")
    assert "🟢 configured  🟡 missing  🔴 invalid  ⏰ expired" in stack.cli("mia", "overrides", "status",
                                                                          "--server-name", "crm").stdout

    # configured, and the upstream agrees
    assert stack.cli("mia", "overrides", "set", "--server-name", "crm", "--principal", "uma",
                     stdin=RIGHT + "\n").returncode == 0
    assert _status_rows(stack)["uma"] == ("🟢", "configured")
    tested = stack.cli("uma", "--json", "overrides", "test", "--server-name", "crm")
    assert json.loads(tested.stdout)["test"] == {
        "principal": "uma", "server": "crm", "result": "ok", "http_status": 200,
        "detail": "upstream answered 200", "status": "configured",
    }  # fmt: skip

    # invalid: the upstream (started with --expect-token 'authorization=Bearer right') rejects it
    wrong = f"wrong-{uuid.uuid4().hex}"
    stack.secrets.add(wrong)
    assert stack.cli("mia", "overrides", "set", "--server-name", "crm", "--principal", "ola",
                     stdin=wrong + "\n").returncode == 0
    assert _status_rows(stack)["ola"] == ("🟢", "configured")
    tested = stack.cli("mia", "overrides", "test", "--server-name", "crm", "--principal", "ola")
    assert tested.returncode == 0 and "REJECTED" in tested.stdout and "🔴 invalid" in tested.stdout
    assert _status_rows(stack)["ola"] == ("🔴", "invalid")
    rejected = [r for r in stack.strict.stats()["rejections"] if r["path"] == "/mcp/crm"]
    assert rejected and rejected[-1]["reason"] == "bad_token"

    # expired: a credential set to expire in a few seconds
    expiry = datetime.now(UTC) + timedelta(seconds=2.5)
    brief = f"brief-{uuid.uuid4().hex}"
    stack.secrets.add(brief)
    assert stack.cli("mia", "overrides", "set", "--server-name", "crm", "--principal", "bob", "--expires",
                     expiry.isoformat(), stdin=brief + "\n").returncode == 0
    assert _status_rows(stack)["bob"] == ("🟢", "configured")
    await asyncio.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds()) + 0.1)
    assert _status_rows(stack)["bob"] == ("⏰", "expired")
    r = await post_initialize(stack.envoy.url("crm"), stack.bearer("bob"))
    assert r.status == 403 and "has expired" in r.body["error"]["message"]

    # The same table as JSON through Envoy, for a manager; a user sees only their own row.
    table = stack.json_api("GET", "/admin/v1/servers/crm/status", "mia").json()["statuses"]
    by_name = {row["principal"]: row["status"] for row in table}
    assert (by_name["uma"], by_name["ola"], by_name["bob"], by_name["carol"]) == (
        "configured", "invalid", "expired", "missing")
    own = stack.json_api("GET", "/admin/v1/servers/crm/status", "ola").json()["statuses"]
    assert [(row["principal"], row["status"]) for row in own] == [("ola", "invalid")]
    assert not any(secret in json.dumps(table) for secret in (RIGHT, wrong, brief) if len(secret) > 8)

    tests = await _audit(stack, action="overrides.test")
    assert {(e.actor, e.target, dict(e.details).get("result")) for e in tests} >= {
        ("uma", "override:uma/crm", "ok"), ("mia", "override:ola/crm", "rejected")}
    _audited(await _audit(stack, actor_name="mia", action="overrides.status"), "overrides.status",
             "override:*/crm")


# 6 -- request ids, admin authentication failures, reflection, and the secret scan ---------------------------


async def test_request_ids_and_refused_admin_calls_are_audited(stack: Stack) -> None:
    request_id = f"e2e-{uuid.uuid4().hex}"
    async with grpc.aio.insecure_channel(stack.target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        metadata = (("authorization", f"Bearer {stack.key('ola')}"), ("x-request-id", request_id))
        await stub.ListKeys(admin_pb2.ListKeysRequest(), metadata=metadata)
        # The configured key header works as well as Authorization.
        await stub.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=(("x-api-key", stack.key("ola")),))
        bad = stack.key("ola")[:-1] + ("A" if stack.key("ola")[-1] != "A" else "B")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {bad}"),
                                                                   ("x-request-id", request_id + "-bad")))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert dict(refused.value.trailing_metadata())["mcp-authz-reason"] == "key_checksum"
    (listed,) = [e for e in await _audit(stack, action="keys.list") if e.request_id == request_id]
    assert (listed.actor, listed.outcome) == ("ola", "ok") and dict(listed.details)["source"] == LOOPBACK

    async def failure_recorded() -> bool:
        return any(e.request_id == request_id + "-bad" for e in await _audit(stack, action="authn.failure"))

    await _eventually(failure_recorded, seconds=3.0)  # written behind, off the request path
    (failure,) = [e for e in await _audit(stack, action="authn.failure") if e.request_id == request_id + "-bad"]
    assert (failure.outcome, dict(failure.details)["api"], dict(failure.details)["method"]) == ("key_checksum", "admin", "WhoAmI")
    assert bad not in str(failure)

    # Through Envoy, the request id is the x-request-id Envoy generated (its access log's), not the client's.
    forged = stack.json_api("GET", "/admin/v1/whoami", "ola")
    assert forged.status_code == 200
    newest = (await _audit(stack, action="whoami", actor_name="ola"))[-1]
    assert uuid.UUID(newest.request_id)


async def test_a_key_scoped_to_servers_manages_nothing(stack: Stack) -> None:
    async with stack.remote("ada") as ada:
        _, scoped = await ada.create_key(ANY, "ola", "app key", scope=["github"])
    stack.secrets.add(scoped.reveal())

    async def refused_for_scope() -> bool:
        async with stack.remote(scoped.reveal()) as app:
            try:
                await app.whoami(ANY)
            except RemoteError as exc:
                return exc.reason == "permission_denied" and "scoped" in exc.message
        return False

    await _eventually(refused_for_scope)


async def _reflected_services(target: str) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for reply in stub.ServerReflectionInfo(ask()):
            return {s.name for s in reply.list_services_response.service}
    raise AssertionError("no reflection reply")


async def test_reflection_lists_each_listeners_own_services(stack: Stack) -> None:
    """The admin listener offers the admin API, never Check or the access log; the Check listener the reverse."""
    check, log, admin, health = ("envoy.service.auth.v3.Authorization", "envoy.service.accesslog.v3.AccessLogService",
                                 "mcp_authz.admin.v1.Admin", "grpc.health.v1.Health")  # fmt: skip
    on_admin = await _reflected_services(stack.target)
    assert {admin, health} <= on_admin and not {check, log} & on_admin
    on_check = await _reflected_services(f"{LOOPBACK}:{stack.sidecar.port}")
    assert {check, log, health} <= on_check and admin not in on_check


def test_no_secret_in_the_audit_trail_logs_or_cli_output(stack: Stack) -> None:
    export = stack.cli("ada", "audit", "--export")
    assert export.returncode == 0, export.stderr
    events = [json.loads(line) for line in export.stdout.splitlines()]
    actions = {e["action"] for e in events}
    assert {"overrides.set", "overrides.delete", "overrides.test", "overrides.status", "keys.create",
            "keys.revoke", "keys.regenerate", "authn.failure", "audit.query"} <= actions
    assert all(e["request_id"] for e in events if e["actor"] not in ("cli", "-"))
    # The export through Envoy is JSON lines too.
    streamed = stack.json_api("GET", "/admin/v1/audit:export?action=keys.revoke", "ada")
    assert streamed.status_code == 200 and all(json.loads(line)["action"] == "keys.revoke"
                                               for line in streamed.text.splitlines() if line.strip())
    secrets = {s for s in stack.secrets if len(s) >= 8}
    assert secrets
    texts = {"audit export": export.stdout, "sidecar log": stack.sidecar.logs(),
             "envoy log": stack.envoy.process.log_tail(10**7)}
    for name, text in texts.items():
        leaked = [s[:8] for s in secrets if s in text]
        assert leaked == [], f"{name} contains secrets starting {leaked}"
    for output, issued in stack.outputs:
        leaked = [s[:8] for s in secrets - issued if s in output]
        assert leaked == [], f"CLI output contains secrets starting {leaked}"
