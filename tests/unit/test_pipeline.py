"""Every branch of the runtime decision order (DESIGN.md), table-driven."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from authz_server.errors import Denied
from authz_server.models import AuthMode, PrincipalKind, Role
from authz_server.pipeline.types import CheckInput, Decision

from .world import SIGNING, World, request


@dataclass
class Case:
    name: str
    build: Callable[[World], CheckInput]
    status: int  # 200 for allow
    reason: str = ""
    injected: dict[str, str] | None = None  # credential headers expected on allow


def _world() -> World:
    w = World()
    w.server("github", AuthMode.INDIVIDUAL)
    w.server("linear", AuthMode.SHARED, shared={"API_KEY": "shared-linear"})
    w.server("unset", AuthMode.SHARED)
    w.server("open", AuthMode.NONE)
    w.server(
        "multi",
        AuthMode.SHARED,
        headers=(("X-API-Key", "{{API_KEY}}"), ("X-Client-ID", "{{CLIENT_ID}}")),
        shared={"API_KEY": "shared-k"},
        optional=frozenset({"CLIENT_ID"}),
    )
    w.server("broken", AuthMode.SHARED, corrupt=True)
    return w


def _alice(w: World, **key_args) -> str:  # type: ignore[no-untyped-def]
    alice = w.principal("alice", roles=(Role.USER, Role.MANAGER))
    w.override(alice, "github", {"API_KEY": "alice-gh"})
    return w.key(alice, **key_args)


def _bob(w: World, **key_args) -> str:  # type: ignore[no-untyped-def]
    return w.key(w.principal("bob"), **key_args)


CASES = [
    # 1. authentication
    Case("no key", lambda w: request(), 401, "key_missing"),
    Case("non-gateway bearer", lambda w: request(bearer="sk-something"), 401, "key_malformed"),
    Case("malformed key", lambda w: request(bearer="mgw_tooshort"), 401, "key_malformed"),
    Case("bad checksum", lambda w: request(bearer=_alice(w)[:-1] + ("A" if _alice(w)[-1] != "A" else "B")), 401,
         "key_checksum"),
    Case("unknown key id", lambda w: request(bearer=_unknown_key()), 401, "key_unknown"),
    Case("wrong secret for a known id", lambda w: request(bearer=_wrong_secret(w)), 401, "key_invalid"),
    Case("revoked key", lambda w: request(bearer=_alice(w, revoked_in=-1)), 401, "key_revoked"),
    Case("key in grace period", lambda w: request(bearer=_alice(w, revoked_in=60)), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("expired key", lambda w: request(bearer=_alice(w, expires_in=-1)), 401, "key_expired"),
    Case("disabled principal", lambda w: request(bearer=w.key(w.principal("carol", disabled=True)), server="linear"),
         401, "principal_disabled"),
    Case("disabled team", lambda w: (w.team("ops", disabled=True), request(bearer=w.key(w.principal("dave", team="ops")), server="linear"))[1],
         401, "team_disabled"),
    # 2. server
    Case("route not mapped", lambda w: request(bearer=_alice(w), server=None), 403, "server_unmapped"),
    Case("server unknown", lambda w: request(bearer=_alice(w), server="nope"), 403, "server_unknown"),
    # 3. scope
    Case("scope: other server", lambda w: request(bearer=_alice(w, scope=("linear",))), 403, "scope_server"),
    Case("scope: this server", lambda w: request(bearer=_alice(w, scope=("github",))), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("scope: allowed tool", lambda w: request(bearer=_alice(w, scope=("github:search",)), mcp_method="tools/call", tool="search"), 200,
         injected={"authorization": "Bearer alice-gh"}),
    Case("scope: other tool", lambda w: request(bearer=_alice(w, scope=("github:search",)), mcp_method="tools/call", tool="delete"), 403,
         "scope_tool"),
    Case("scope: tools/list with tool scope", lambda w: request(bearer=_alice(w, scope=("github:search",)), mcp_method="tools/list"), 200,
         injected={"authorization": "Bearer alice-gh"}),
    Case("scope: tool scope without MCP metadata fails closed", lambda w: request(bearer=_alice(w, scope=("github:search",))), 403,
         "scope_tool"),
    Case("scope: tool scope on the SSE GET", lambda w: request(bearer=_alice(w, scope=("github:search",)), method="GET"), 200,
         injected={"authorization": "Bearer alice-gh"}),
    Case("scope: tool scope on the session's DELETE", lambda w: request(bearer=_alice(w, scope=("github:search",)), method="DELETE"),
         200, injected={"authorization": "Bearer alice-gh"}),
    *[Case(f"scope: other tool by {m}", lambda w, m=m: request(bearer=_alice(w, scope=("github:search",)), method=m,
                                                                 mcp_method="tools/call", tool="delete"), 403, "scope_tool")
      for m in ("PUT", "PATCH", "POST")],
    *[Case(f"scope: {m} without MCP metadata fails closed", lambda w, m=m: request(bearer=_alice(w, scope=("github:search",)), method=m),
           403, "scope_tool") for m in ("PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND")],
    Case("scope: allowed tool by PUT", lambda w: request(bearer=_alice(w, scope=("github:search",)), method="PUT",
                                                        mcp_method="tools/call", tool="search"), 200,
         injected={"authorization": "Bearer alice-gh"}),
    # 4. credentials
    Case("override injected", lambda w: request(bearer=_alice(w)), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("individual without override", lambda w: request(bearer=_bob(w)), 403, "credential_missing"),
    Case("expired override on individual", lambda w: (w.override(w.principal("erin"), "github", {"API_KEY": "x"}, expires_in=-1),
                                                        request(bearer=w.key(w.state.principals["p_erin"])))[1], 403, "credential_missing"),
    Case("shared default", lambda w: request(bearer=_bob(w), server="linear"), 200, injected={"authorization": "Bearer shared-linear"}),
    Case("override beats shared default", lambda w: (w.override(w.principal("fay"), "linear", {"API_KEY": "fay-linear"}),
                                                       request(bearer=w.key(w.state.principals["p_fay"]), server="linear"))[1], 200,
         injected={"authorization": "Bearer fay-linear"}),
    Case("shared server with no default", lambda w: request(bearer=_bob(w), server="unset"), 403, "credential_missing"),
    Case("mode none injects nothing", lambda w: request(bearer=_bob(w), server="open"), 200, injected={}),
    Case("optional placeholder left out", lambda w: request(bearer=_bob(w), server="multi"), 200, injected={"x-api-key": "shared-k"}),
    Case("override fills an optional placeholder", lambda w: (w.override(w.principal("gus"), "multi", {"CLIENT_ID": "gus-client"}),
                                                                request(bearer=w.key(w.state.principals["p_gus"]), server="multi"))[1], 200,
         injected={"x-api-key": "shared-k", "x-client-id": "gus-client"}),
    Case("corrupt stored credential", lambda w: request(bearer=_bob(w), server="broken"), 503, "credential_unreadable"),
    Case("corrupt override", lambda w: (w.override(w.principal("hal"), "linear", {}, corrupt=True),
                                          request(bearer=w.key(w.state.principals["p_hal"]), server="linear"))[1], 503, "credential_unreadable"),
    # 5. usage limit
    Case("under its rate limit", lambda w: request(bearer=w.key(w.principal("ivy", rate=1)), server="linear"), 200,
         injected={"authorization": "Bearer shared-linear"}),
    # key sources
    Case("key in custom header", lambda w: request(headers={"x-api-key": _alice(w)}), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("key in path", lambda w: request(path=f"/mcp/github/{_alice(w)}"), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("key with ASCII spaces and tabs around it", lambda w: request(headers={"authorization": f"Bearer \t {_alice(w)} \t"}), 200,
         injected={"authorization": "Bearer alice-gh"}),
    *[Case(f"key with U+{ord(ws):04X} around it", lambda w, ws=ws: request(headers={"authorization": f"Bearer {ws}{_alice(w)}"}), 401,
           "key_malformed") for ws in ("\u00a0", "\u2003", "\u0085", "\u3000", "\u200b", "\n", "\v", "\f", "\r")],
    *[Case(f"custom-header key with U+{ord(ws):04X} after it", lambda w, ws=ws: request(headers={"x-api-key": _alice(w) + ws}), 401,
           "key_malformed") for ws in ("\u00a0", "\u2003", "\u0085", "\u3000")],
    Case("key under another auth scheme", lambda w: request(headers={"authorization": f"Token {_alice(w)}"}), 401, "key_malformed"),
    Case("key in the query string", lambda w: request(path=f"/mcp/github?api_key={_alice(w)}"), 400, "key_in_url"),
    Case("key in the query beside a bearer key", lambda w: request(bearer=_bob(w), path=f"/mcp/github?key={_alice(w)}"), 400,
         "key_in_url"),
    Case("key inside a path segment", lambda w: request(bearer=_bob(w), path=f"/mcp/github/x{_alice(w)}"), 400, "key_in_url"),
    Case("a file named like a key's prefix is fine", lambda w: request(bearer=_alice(w), path="/mcp/github/files/mgw_notes.txt"),
         200, injected={"authorization": "Bearer alice-gh"}),
]


def _unknown_key() -> str:
    from authz_server.crypto import keys

    return keys.generate()[1].reveal()


def _wrong_secret(w: World) -> str:
    """A well-formed key with a valid checksum and a known key id, but another secret."""
    from authz_server.crypto import keys

    real = _alice(w)
    other = keys.generate()[1].reveal()
    head = real[:11] + other[11:30]
    return head + keys._checksum(head)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_decision_order(case: Case) -> None:
    w = _world()
    inp = case.build(w)
    pipeline = w.pipeline()
    if case.status == 200:
        decision = pipeline.decide(inp)
        injected = {n: v for n, v in decision.headers_to_set if not n.startswith(("x-user-", "x-request-id", "x-mcp-authz-", ":"))}
        assert injected == case.injected
        return
    with pytest.raises(Denied) as exc:
        pipeline.decide(inp)
    assert (exc.value.status, exc.value.reason) == (case.status, case.reason)


async def test_order_authentication_before_server() -> None:
    """An unknown server with a bad key is a 401, not a 403: authenticate first."""
    w = _world()
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(bearer="mgw_bad", server="nope"))
    assert exc.value.status == 401


async def test_order_scope_before_credentials() -> None:
    w = _world()
    key = _bob(w, scope=("linear",))  # bob has no github credential either
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(bearer=key))
    assert exc.value.reason == "scope_server"


async def test_order_credentials_before_rate_limit() -> None:
    w = _world()
    key = w.key(w.principal("jo", rate=1))
    pipeline = w.pipeline()
    for _ in range(3):
        with pytest.raises(Denied) as exc:
            pipeline.decide(request(bearer=key))  # github, individual, no override
        assert exc.value.reason == "credential_missing"


async def test_rate_limit_answers_429_with_retry_after() -> None:
    w = _world()
    key = w.key(w.principal("kim", rate=2))
    pipeline = w.pipeline()
    for _ in range(2):
        pipeline.decide(request(bearer=key, server="linear"))
    with pytest.raises(Denied) as exc:
        pipeline.decide(request(bearer=key, server="linear"))
    assert exc.value.status == 429 and exc.value.retry_after == 30
    w.now += 31
    pipeline.decide(request(bearer=key, server="linear"))


async def test_individual_denial_names_server_and_how_to_add() -> None:
    w = _world()
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(bearer=_bob(w)))
    assert "'github'" in exc.value.message
    assert "mcp-authz overrides set --server github" in exc.value.hint


async def test_denials_after_authn_carry_identity() -> None:
    w = _world()
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(bearer=_bob(w)))
    assert exc.value.principal_id == "p_bob" and exc.value.key_id and exc.value.server == "github"


async def test_allow_mutations() -> None:
    w = _world()
    key = _alice(w)
    inp = request(
        path=f"/mcp/github/{key}?x=1",
        headers={
            "x-user-id": "mallory",
            "x-user-roles": "admin",
            "x-user-team": "root",
        },
    )
    decision: Decision = w.pipeline().decide(inp)
    sets = dict(decision.headers_to_set)
    assert sets[":path"] == "/mcp/github?x=1"
    assert sets["x-user-id"] == "alice"
    assert sets["x-user-type"] == "user"
    assert sets["x-user-team"] == "eng"
    assert sets["x-user-roles"] == "user,manager"
    assert sets["x-request-id"] == "req-1"
    assert "x-api-key" in decision.headers_to_remove  # removed whatever the key's source
    assert not set(sets) & set(decision.headers_to_remove)
    assert all(key not in v for v in sets.values())
    ts = sets["x-mcp-authz-timestamp"]
    message = "\n".join(["v1", ts, "POST", "/mcp/github?x=1", "alice", "user", "eng", "user,manager", "req-1"])
    expected = "v1=" + hmac.new(SIGNING, message.encode(), hashlib.sha256).hexdigest()
    assert sets["x-mcp-authz-signature"] == expected
    assert decision.metadata["principal"] == "alice" and decision.metadata["server"] == "github"
    assert decision.metadata["decision"] == "allow"


async def test_bearer_key_removed_unless_template_overwrites() -> None:
    w = _world()
    key = _bob(w)
    open_decision = w.pipeline().decide(request(bearer=key, server="open"))
    assert "authorization" in open_decision.headers_to_remove
    linear_decision = w.pipeline().decide(request(bearer=key, server="linear"))
    assert "authorization" not in linear_decision.headers_to_remove
    assert dict(linear_decision.headers_to_set)["authorization"] == "Bearer shared-linear"


async def test_empty_roles_header_is_removed_not_passed_through() -> None:
    w = _world()
    key = w.key(w.principal("svc", roles=(), kind=PrincipalKind.SERVICE))
    decision = w.pipeline().decide(request(bearer=key, server="open", headers={"x-user-roles": "admin"}))
    assert "x-user-roles" in decision.headers_to_remove
    assert dict(decision.headers_to_set)["x-user-type"] == "service"


async def test_custom_key_header_is_configurable() -> None:
    w = _world()
    key = _alice(w)
    decision = w.pipeline(key_header="x-gateway-key").decide(request(headers={"x-gateway-key": key}))
    assert "x-gateway-key" in decision.headers_to_remove
    with pytest.raises(Denied) as exc:
        w.pipeline(key_header="x-gateway-key").decide(request(headers={"x-api-key": key}))
    assert exc.value.reason == "key_missing"


async def test_key_sources_in_priority_order() -> None:
    """Bearer, then the custom header, then the path: a junk header is not skipped for a path key."""
    w = _world()
    key = _alice(w)
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(path=f"/mcp/github/{key}", headers={"x-api-key": "junk"}))
    assert exc.value.reason == "key_malformed"
    decision = w.pipeline().decide(request(bearer=key, path=f"/mcp/github/{key}/sub?q=1"))
    assert dict(decision.headers_to_set)[":path"] == "/mcp/github/sub?q=1"  # the path copy never leaks
    plain = w.pipeline().decide(request(bearer=key, path="/mcp/github?q=1"))
    assert ":path" not in dict(plain.headers_to_set)


def test_a_grant_is_built_once_per_key_and_server_and_each_request_gets_its_own_signature() -> None:
    w = _world()
    key = _alice(w)
    pipeline = w.pipeline()
    first = pipeline.decide(request(bearer=key))
    second = pipeline.decide(replace(request(bearer=key), request_id="req-2"))
    assert second.grant is first.grant
    assert dict(first.headers_to_set)["x-request-id"] == "req-1" and dict(second.headers_to_set)["x-request-id"] == "req-2"
    assert dict(first.headers_to_set)["x-mcp-authz-signature"] != dict(second.headers_to_set)["x-mcp-authz-signature"]
    assert pipeline.decide(request(bearer=key, server="linear")).grant is not first.grant  # per server


def test_a_state_change_rebuilds_the_grant() -> None:
    w = _world()
    key = _alice(w)
    pipeline = w.pipeline()
    assert dict(pipeline.decide(request(bearer=key)).headers_to_set)["authorization"] == "Bearer alice-gh"
    w.override(w.state.principals["p_alice"], "github", {"API_KEY": "alice-gh-2"})
    assert dict(pipeline.decide(request(bearer=key)).headers_to_set)["authorization"] == "Bearer alice-gh"  # no change applied
    w.state.version += 1  # what the follower does after every change it applies
    assert dict(pipeline.decide(request(bearer=key)).headers_to_set)["authorization"] == "Bearer alice-gh-2"


def test_a_grant_ends_when_its_override_expires() -> None:
    w = _world()
    alice = w.principal("alice")
    key = w.key(alice)
    w.override(alice, "github", {"API_KEY": "soon-gone"}, expires_in=10)
    w.override(alice, "linear", {"API_KEY": "own-linear"}, expires_in=10)
    pipeline = w.pipeline()
    assert dict(pipeline.decide(request(bearer=key)).headers_to_set)["authorization"] == "Bearer soon-gone"
    assert dict(pipeline.decide(request(bearer=key, server="linear")).headers_to_set)["authorization"] == "Bearer own-linear"
    w.now += 11  # no change-log event: only the clock moved
    with pytest.raises(Denied) as exc:
        pipeline.decide(request(bearer=key))
    assert exc.value.reason == "credential_missing"
    assert dict(pipeline.decide(request(bearer=key, server="linear")).headers_to_set)["authorization"] == "Bearer shared-linear"


def test_where_the_key_came_from_decides_whether_authorization_is_removed_even_when_cached() -> None:
    w = _world()
    key = _bob(w)
    pipeline = w.pipeline()
    assert "authorization" in pipeline.decide(request(bearer=key, server="open")).headers_to_remove
    from_header = pipeline.decide(request(headers={"x-api-key": key, "authorization": "Basic dXNlcg=="}, server="open"))
    assert "authorization" not in from_header.headers_to_remove  # the client's own Authorization passes
