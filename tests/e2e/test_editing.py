"""Editing without loss, end to end: the real CLI changes a server's templates and a principal's
roles, team, rate limit and existence while a real sidecar serves Check over gRPC; each change is
seen within a second, and no override is ever dropped silently."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from .harness import LOOPBACK
from authz_server.crypto.cipher import ENV_KEY_FILE

from .sidecar import CLI, Sidecar, World, run_sidecar, seed_world

pytestmark = pytest.mark.e2e

Answer = tuple[str, dict[str, str]]  # "allow" or the denial reason, and the headers set on an allow


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[World, Sidecar]]:
    world = seed_world(tmp_path / "world")
    with run_sidecar(world) as sidecar:
        yield world, sidecar


def check(sidecar: Sidecar, key: str, server: str) -> Answer:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "POST", f"/mcp/{server}"
    http.headers["authorization"] = f"Bearer {key}"
    request.attributes.context_extensions["mcp_server"] = server
    with grpc.insecure_channel(f"{LOOPBACK}:{sidecar.port}") as channel:
        reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5)
    if reply.HasField("denied_response"):
        return reply.status.message, {}
    return "allow", {h.header.key: h.header.value for h in reply.ok_response.headers}


def within_a_second(probe: Callable[[], Answer], done: Callable[[Answer], bool]) -> Answer:
    """Poll `probe` until `done`; the change must show in under a second."""
    start = time.monotonic()
    while True:
        answer = probe()
        if done(answer):
            assert time.monotonic() - start < 1.0
            return answer
        assert time.monotonic() - start < 1.0, f"still {answer[0]} after a second"
        time.sleep(0.02)


def ok(world: World, *args: str, stdin: str | None = None) -> str:
    done = world.cli(*args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused(world: World, *args: str) -> str:
    done = world.cli(*args)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip()


def test_servers_update_keeps_fitting_overrides_and_reports_the_others(live: tuple[World, Sidecar]) -> None:
    world, sidecar = live
    alice, bob = world.keys["alice"], world.keys["bob"]
    # A second header with an optional placeholder: alice's override (API_KEY only) still fits.
    out = json.loads(ok(world, "--json", "servers", "update", "github", "-H", "Authorization: Bearer {{API_KEY}}",
                        "-H", "X-Org: {{ORG}}", "--optional", "ORG"))  # fmt: skip
    assert out["incompatible"] == [] and out["server"]["placeholders"] == [
        {"name": "API_KEY", "required": True}, {"name": "ORG", "required": False}]  # fmt: skip
    ok(world, "overrides", "set", "--server-name", "github", "--principal", "alice",
       stdin="API_KEY=ghp_alice_personal_token_0001\nORG=acme\n")  # fmt: skip
    ok(world, "overrides", "set", "--server-name", "github", "--principal", "bob", stdin="API_KEY=ghp_bob_token_000003\n")
    assert within_a_second(lambda: check(sidecar, bob, "github"), lambda a: a[0] == "allow")[1]["authorization"] == (
        "Bearer ghp_bob_token_000003")  # fmt: skip

    # ORG becomes required: bob's override no longer fits. It is kept, marked missing, and reported.
    out = json.loads(ok(world, "--json", "servers", "update", "github", "--required", "ORG"))
    assert [(i["principal"], i["missing"]) for i in out["incompatible"]] == [("bob", ["ORG"])]
    assert "overrides set --server github" in out["incompatible"][0]["reason"]
    assert within_a_second(lambda: check(sidecar, bob, "github"), lambda a: a[0] != "allow")[0] == "credential_missing"
    reason, headers = check(sidecar, alice, "github")
    assert reason == "allow" and headers["x-org"] == "acme"
    status = json.loads(ok(world, "--json", "overrides", "status", "--server-name", "github"))["statuses"]
    rows = {s["principal"]: s for s in status}
    assert (rows["bob"]["status"], rows["bob"]["source"]) == ("missing", "override")
    assert rows["bob"]["reason"] == out["incompatible"][0]["reason"]
    assert rows["alice"]["status"] == "configured"
    listed = json.loads(ok(world, "--json", "overrides", "list", "--server-name", "github"))["overrides"]
    assert sorted(o["principal"] for o in listed) == ["alice", "bob"]  # nothing dropped
    # The table says it too, per principal.
    assert "bob: needs ORG" in ok(world, "servers", "update", "github", "--required", "ORG")

    # A bad template is refused in one line, and changes nothing.
    assert "not an HTTP header name" in refused(world, "servers", "update", "github", "-H", "Bad Header: {{X}}")
    assert check(sidecar, alice, "github")[0] == "allow"


def test_principals_update_is_seen_within_a_second(live: tuple[World, Sidecar]) -> None:
    world, sidecar = live
    carol = world.keys["carol"]
    reason, headers = check(sidecar, carol, "linear")
    assert reason == "allow" and (headers["x-user-team"], headers["x-user-roles"]) == ("ops", "user")

    out = json.loads(ok(world, "--json", "principals", "update", "carol", "--team", "platform", "--roles",
                        "manager,user"))["principal"]  # fmt: skip
    assert (out["team"], out["roles"]) == ("platform", ["manager", "user"])
    _, headers = within_a_second(lambda: check(sidecar, carol, "linear"), lambda a: a[1].get("x-user-team") == "platform")
    assert headers["x-user-roles"] == "manager,user"

    ok(world, "principals", "update", "carol", "--rate-limit", "1")
    answer = within_a_second(lambda: check(sidecar, carol, "linear"), lambda a: a[0] != "allow")
    assert answer[0] == "rate_limited"
    ok(world, "principals", "update", "carol", "--rate-limit", "0")  # 0 lifts the limit
    within_a_second(lambda: check(sidecar, carol, "linear"), lambda a: a[0] == "allow")

    assert "No principal named ghost" in refused(world, "principals", "update", "ghost", "--roles", "user")
    assert "Roles must be among" in refused(world, "principals", "update", "carol", "--roles", "root")
    events = json.loads(ok(world, "--json", "audit", "--action", "principals.update"))["events"]
    assert [e["outcome"] for e in events] == ["ok", "ok", "ok", "error", "error"]


def test_principals_delete_revokes_its_key_at_once_and_keeps_its_records(live: tuple[World, Sidecar]) -> None:
    world, sidecar = live
    dave = world.keys["dave"]
    assert check(sidecar, dave, "linear")[0] == "allow"
    out = ok(world, "principals", "delete", "dave")
    assert "1 key(s) revoked" in out and "audit events and usage records are kept" in out
    assert within_a_second(lambda: check(sidecar, dave, "linear"), lambda a: a[0] != "allow")[0] == "key_unknown"
    assert check(sidecar, world.keys["bob"], "linear")[0] == "allow"  # nobody else is touched
    events = json.loads(ok(world, "--json", "audit", "--target", "principal:dave"))["events"]
    assert [e["action"] for e in events] == ["principals.add", "principals.delete"]
    assert events[-1]["details"]["keys_revoked"] == "1"
    assert "No principal named dave" in refused(world, "principals", "delete", "dave")
    # The only admin stays.
    assert "last enabled admin" in refused(world, "principals", "delete", "admin")
    assert dave not in (world.dir / "cli-output.log").read_text()


def test_the_remote_cli_edits_too(live: tuple[World, Sidecar]) -> None:
    world, sidecar = live
    admin_key = json.loads(ok(world, "--json", "keys", "create", "admin", "--label", "remote"))["api_key"]

    def remote(*args: str, key: str = admin_key) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in world.env.items() if k not in ("MCP_AUTHZ_STORE", ENV_KEY_FILE)}
        env["MCP_AUTHZ_KEY"] = key
        return subprocess.run([CLI, "--server", sidecar.admin_target, "--json", *args], capture_output=True,
                              text=True, env=env, timeout=30, cwd=world.dir)  # fmt: skip

    done = remote("servers", "update", "github", "-H", "Authorization: token {{API_KEY}}", "-H", "X-Org: {{ORG}}")
    assert done.returncode == 0, done.stderr
    assert [(i["principal"], i["missing"]) for i in json.loads(done.stdout)["incompatible"]] == [("alice", ["ORG"])]
    done = remote("principals", "update", "bob", "--roles", "manager")
    assert done.returncode == 0 and json.loads(done.stdout)["principal"]["roles"] == ["manager"], done.stderr
    # A manager now, bob still may not make anyone an admin, nor delete anyone.
    for args in (("principals", "update", "carol", "--roles", "admin"), ("principals", "delete", "carol")):
        done = remote(*args, key=world.keys["bob"])
        said = done.stdout + done.stderr  # with --json, the refusal is a JSON document
        assert done.returncode != 0 and "permission_denied" in said and "Traceback" not in said
    done = remote("principals", "delete", "carol")
    assert done.returncode == 0 and json.loads(done.stdout)["deleted"]["keys_revoked"] == 1, done.stderr
    assert within_a_second(lambda: check(sidecar, world.keys["carol"], "linear"), lambda a: a[0] != "allow")[0] == (
        "key_unknown")  # fmt: skip
    done = remote("principals", "delete", "ghost")
    assert done.returncode != 0 and "No principal named ghost" in done.stdout + done.stderr
