"""pipeline/pipeline.py: `Pipeline.decide` end to end, its contract.

- every branch of the runtime decision order (DESIGN.md), table-driven, and the order itself;
- a denial after authentication names the principal, key and server;
- a bounded fuzz of the whole pipeline: random headers, paths and queries around valid,
  revoked, unknown and damaged keys. Whatever it decides, no exception but `Denied` escapes,
  and an allowed request, as Envoy would forward it, holds no key-shaped string.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus

import pytest

from authz_server.crypto import keys
from authz_server.errors import Denied
from authz_server.models import AuthMode
from authz_server.pipeline.types import CheckInput, Decision

from ..fakes import World, alice_key, bob_key, request, standard_world


@dataclass
class Case:
    name: str
    build: Callable[[World], CheckInput]
    status: int  # 200 for allow
    reason: str = ""
    injected: dict[str, str] | None = None  # credential headers expected on allow


CASES = [
    # 1. authentication
    Case("no key", lambda w: request(), 401, "key_missing"),
    Case("non-gateway bearer", lambda w: request(bearer="sk-something"), 401, "key_malformed"),
    Case("malformed key", lambda w: request(bearer="mgw_tooshort"), 401, "key_malformed"),
    Case("bad checksum", lambda w: request(bearer=alice_key(w)[:-1] + ("A" if alice_key(w)[-1] != "A" else "B")), 401,
         "key_checksum"),
    Case("unknown key id", lambda w: request(bearer=_unknown_key()), 401, "key_unknown"),
    Case("wrong secret for a known id", lambda w: request(bearer=_wrong_secret(w)), 401, "key_invalid"),
    Case("revoked key", lambda w: request(bearer=alice_key(w, revoked_in=-1)), 401, "key_revoked"),
    Case("key in grace period", lambda w: request(bearer=alice_key(w, revoked_in=60)), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("expired key", lambda w: request(bearer=alice_key(w, expires_in=-1)), 401, "key_expired"),
    Case("disabled principal", lambda w: request(bearer=w.key(w.principal("carol", disabled=True)), server="linear"),
         401, "principal_disabled"),
    Case("disabled team", lambda w: (w.team("ops", disabled=True), request(bearer=w.key(w.principal("dave", team="ops")), server="linear"))[1],
         401, "team_disabled"),
    # 2. server
    Case("route not mapped", lambda w: request(bearer=alice_key(w), server=None), 403, "server_unmapped"),
    Case("server unknown", lambda w: request(bearer=alice_key(w), server="nope"), 403, "server_unknown"),
    # 3. scope
    Case("scope: other server", lambda w: request(bearer=alice_key(w, scope=("linear",))), 403, "scope_server"),
    Case("scope: this server", lambda w: request(bearer=alice_key(w, scope=("github",))), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("scope: allowed tool", lambda w: request(bearer=alice_key(w, scope=("github:search",)), mcp_method="tools/call", tool="search"), 200,
         injected={"authorization": "Bearer alice-gh"}),
    Case("scope: other tool", lambda w: request(bearer=alice_key(w, scope=("github:search",)), mcp_method="tools/call", tool="delete"), 403,
         "scope_tool"),
    Case("scope: tools/list with tool scope", lambda w: request(bearer=alice_key(w, scope=("github:search",)), mcp_method="tools/list"), 200,
         injected={"authorization": "Bearer alice-gh"}),
    Case("scope: tool scope without MCP metadata fails closed", lambda w: request(bearer=alice_key(w, scope=("github:search",))), 403,
         "scope_tool"),
    Case("scope: tool scope on the SSE GET", lambda w: request(bearer=alice_key(w, scope=("github:search",)), method="GET"), 200,
         injected={"authorization": "Bearer alice-gh"}),
    Case("scope: tool scope on the session's DELETE", lambda w: request(bearer=alice_key(w, scope=("github:search",)), method="DELETE"),
         200, injected={"authorization": "Bearer alice-gh"}),
    *[Case(f"scope: other tool by {m}", lambda w, m=m: request(bearer=alice_key(w, scope=("github:search",)), method=m,
                                                                 mcp_method="tools/call", tool="delete"), 403, "scope_tool")
      for m in ("PUT", "PATCH", "POST")],
    *[Case(f"scope: {m} without MCP metadata fails closed", lambda w, m=m: request(bearer=alice_key(w, scope=("github:search",)), method=m),
           403, "scope_tool") for m in ("PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND")],
    Case("scope: allowed tool by PUT", lambda w: request(bearer=alice_key(w, scope=("github:search",)), method="PUT",
                                                        mcp_method="tools/call", tool="search"), 200,
         injected={"authorization": "Bearer alice-gh"}),
    # 4. credentials
    Case("override injected", lambda w: request(bearer=alice_key(w)), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("individual without override", lambda w: request(bearer=bob_key(w)), 403, "credential_missing"),
    Case("expired override on individual", lambda w: (w.override(w.principal("erin"), "github", {"API_KEY": "x"}, expires_in=-1),
                                                        request(bearer=w.key(w.state.principals["p_erin"])))[1], 403, "credential_missing"),
    Case("shared default", lambda w: request(bearer=bob_key(w), server="linear"), 200, injected={"authorization": "Bearer shared-linear"}),
    Case("override beats shared default", lambda w: (w.override(w.principal("fay"), "linear", {"API_KEY": "fay-linear"}),
                                                       request(bearer=w.key(w.state.principals["p_fay"]), server="linear"))[1], 200,
         injected={"authorization": "Bearer fay-linear"}),
    Case("shared server with no default", lambda w: request(bearer=bob_key(w), server="unset"), 403, "credential_missing"),
    Case("mode none injects nothing", lambda w: request(bearer=bob_key(w), server="open"), 200, injected={}),
    Case("optional placeholder left out", lambda w: request(bearer=bob_key(w), server="multi"), 200, injected={"x-api-key": "shared-k"}),
    Case("override fills an optional placeholder", lambda w: (w.override(w.principal("gus"), "multi", {"CLIENT_ID": "gus-client"}),
                                                                request(bearer=w.key(w.state.principals["p_gus"]), server="multi"))[1], 200,
         injected={"x-api-key": "shared-k", "x-client-id": "gus-client"}),
    Case("corrupt stored credential", lambda w: request(bearer=bob_key(w), server="broken"), 503, "credential_unreadable"),
    Case("corrupt override", lambda w: (w.override(w.principal("hal"), "linear", {}, corrupt=True),
                                          request(bearer=w.key(w.state.principals["p_hal"]), server="linear"))[1], 503, "credential_unreadable"),
    # 5. usage limit
    Case("under its rate limit", lambda w: request(bearer=w.key(w.principal("ivy", rate=1)), server="linear"), 200,
         injected={"authorization": "Bearer shared-linear"}),
    # key sources
    Case("key in custom header", lambda w: request(headers={"x-api-key": alice_key(w)}), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("key in path", lambda w: request(path=f"/mcp/github/{alice_key(w)}"), 200, injected={"authorization": "Bearer alice-gh"}),
    Case("key with ASCII spaces and tabs around it", lambda w: request(headers={"authorization": f"Bearer \t {alice_key(w)} \t"}), 200,
         injected={"authorization": "Bearer alice-gh"}),
    *[Case(f"key with U+{ord(ws):04X} around it", lambda w, ws=ws: request(headers={"authorization": f"Bearer {ws}{alice_key(w)}"}), 401,
           "key_malformed") for ws in ("\u00a0", "\u2003", "\u0085", "\u3000", "\u200b", "\n", "\v", "\f", "\r")],
    *[Case(f"custom-header key with U+{ord(ws):04X} after it", lambda w, ws=ws: request(headers={"x-api-key": alice_key(w) + ws}), 401,
           "key_malformed") for ws in ("\u00a0", "\u2003", "\u0085", "\u3000")],
    Case("key under another auth scheme", lambda w: request(headers={"authorization": f"Token {alice_key(w)}"}), 401, "key_malformed"),
    Case("key in the query string", lambda w: request(path=f"/mcp/github?api_key={alice_key(w)}"), 400, "key_in_url"),
    Case("key in the query beside a bearer key", lambda w: request(bearer=bob_key(w), path=f"/mcp/github?key={alice_key(w)}"), 400,
         "key_in_url"),
    Case("key inside a path segment", lambda w: request(bearer=bob_key(w), path=f"/mcp/github/x{alice_key(w)}"), 400, "key_in_url"),
    Case("a file named like a key's prefix is fine", lambda w: request(bearer=alice_key(w), path="/mcp/github/files/mgw_notes.txt"),
         200, injected={"authorization": "Bearer alice-gh"}),
]


def _unknown_key() -> str:
    from authz_server.crypto import keys

    return keys.generate()[1].reveal()


def _wrong_secret(w: World) -> str:
    """A well-formed key with a valid checksum and a known key id, but another secret."""
    from authz_server.crypto import keys

    real = alice_key(w)
    other = keys.generate()[1].reveal()
    head = real[:11] + other[11:30]
    return head + keys._checksum(head)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_decision_order(case: Case) -> None:
    w = standard_world()
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
    w = standard_world()
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(bearer="mgw_bad", server="nope"))
    assert exc.value.status == 401


async def test_order_scope_before_credentials() -> None:
    w = standard_world()
    key = bob_key(w, scope=("linear",))  # bob has no github credential either
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(bearer=key))
    assert exc.value.reason == "scope_server"


async def test_order_credentials_before_rate_limit() -> None:
    w = standard_world()
    key = w.key(w.principal("jo", rate=1))
    pipeline = w.pipeline()
    for _ in range(3):
        with pytest.raises(Denied) as exc:
            pipeline.decide(request(bearer=key))  # github, individual, no override
        assert exc.value.reason == "credential_missing"


async def test_denials_after_authn_carry_identity() -> None:
    w = standard_world()
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(bearer=bob_key(w)))
    assert exc.value.principal_id == "p_bob" and exc.value.key_id and exc.value.server == "github"


# --- the fuzz -----------------------------------------------------------------------------

_KEY_RE = re.compile(r"mgw_[0-9A-Za-z]{32}")  # written out again on purpose: the test's own idea of a key
_SEED = int(os.environ.get("MCP_AUTHZ_FUZZ_SEED", time.time_ns() % 2**32))
_BUDGET_SECONDS = float(os.environ.get("MCP_AUTHZ_FUZZ_SECONDS", "20"))
_HEADERS_SEEN = ("authorization", "x-api-key", "x-user-id", "x-user-roles", "x-request-id", "x-mcp-authz-signature")
_SPACES = ("", " ", "\t", "  ", "\u00a0", "\u2003", "\u0085", "\u3000", "\u200b", "\ufeff")


def _holds_key(text: str) -> bool:
    """A key-shaped string in `text`, as sent or percent-decoded up to four times."""
    for _ in range(5):
        if _KEY_RE.search(text):
            return True
        text = unquote_plus(text)
    return False


def _forwarded(inp_path: str, inp_headers: dict[str, str], decision: Decision) -> tuple[str, dict[str, str]]:
    """The request as Envoy sends it upstream after applying the decision's mutations."""
    headers = {k: v for k, v in inp_headers.items() if k not in decision.headers_to_remove}
    path = inp_path
    for name, value in decision.headers_to_set:
        if name == ":path":
            path = value
        else:
            headers[name] = value
    return path, headers


def _fuzz_world() -> tuple[World, list[str]]:
    w = World()
    w.server("github", AuthMode.SHARED, shared={"API_KEY": "shared-gh"})
    w.server("multi", AuthMode.SHARED, headers=(("X-API-Key", "{{API_KEY}}"),), shared={"API_KEY": "shared-k"})
    alice, bob = w.principal("alice"), w.principal("bob")
    pool = [w.key(alice), w.key(bob), w.key(alice, scope=("github:search",)), w.key(bob, revoked_in=-1)]
    pool.append(keys.generate()[1].reveal())  # unknown
    return w, pool


def _mangle(rng: random.Random, key: str) -> str:
    """The key as a client (or an attacker) might send it."""
    choice = rng.randrange(9)
    if choice == 0:
        return key[: rng.randrange(20, len(key))]  # truncated
    if choice == 1:
        i = rng.randrange(len(key))
        return key[:i] + rng.choice("aZ9") + key[i + 1 :]  # a typo
    if choice == 2:
        return quote(key, safe="") if rng.random() < 0.5 else "".join(f"%{b:02X}" for b in key.encode())
    if choice == 3:
        return rng.choice(("x", "-", "_", ".")) + key
    if choice == 4:
        return key + rng.choice(("x", ".txt", "/", "%2F"))
    return rng.choice(_SPACES) + key + rng.choice(_SPACES)


def _random_request(rng: random.Random, pool: list[str]):  # type: ignore[no-untyped-def]
    def any_key() -> str:
        k = rng.choice(pool)
        return _mangle(rng, k) if rng.random() < 0.4 else k

    headers: dict[str, str] = {}
    for name in _HEADERS_SEEN:
        if rng.random() < 0.35:
            value = any_key()
            if name == "authorization":
                value = rng.choice(("Bearer ", "bearer ", "BEARER  ", "Token ", "Basic ", "", "Bearer\u00a0")) + value
            headers[name] = value
    segments = ["mcp", rng.choice(("github", "multi"))]
    for _ in range(rng.randrange(4)):
        segments.append(rng.choice(("tools", "files", "mgw_notes.txt", "%2e%2e", "x", "")) if rng.random() < 0.5 else any_key())
    path = "/" + "/".join(segments)
    if rng.random() < 0.5:
        params = [f"{rng.choice(('api_key', 'key', 'q', 'cursor', any_key()))}={rng.choice(('1', 'a+b', any_key()))}"
                  for _ in range(rng.randrange(1, 4))]
        path += "?" + "&".join(params)
    method = rng.choice(("POST", "POST", "GET", "DELETE", "PUT", "PATCH"))
    mcp = rng.choice((("", ""), ("tools/call", "search"), ("tools/call", "delete"), ("tools/list", ""), ("tools/call", any_key())))
    server = segments[1]
    return request(headers=headers, path=path, server=server, method=method, mcp_method=mcp[0], tool=mcp[1])


def test_fuzz_no_key_is_ever_forwarded() -> None:
    rng = random.Random(_SEED)
    w, pool = _fuzz_world()
    pipeline = w.pipeline()
    deadline = time.monotonic() + _BUDGET_SECONDS
    outcomes: dict[str, int] = {}
    runs = 0
    while time.monotonic() < deadline and runs < 200_000:
        inp = _random_request(rng, pool)
        runs += 1
        context = f"seed {_SEED} (MCP_AUTHZ_FUZZ_SEED), run {runs}: {inp.method} {inp.path!r} {dict(inp.headers)!r}"
        try:
            decision = pipeline.decide(inp)
        except Denied as denied:
            outcomes[denied.reason] = outcomes.get(denied.reason, 0) + 1
            assert not _KEY_RE.search(denied.message + denied.hint), context
            continue
        outcomes["allow"] = outcomes.get("allow", 0) + 1
        path, headers = _forwarded(inp.path, dict(inp.headers), decision)
        assert not _holds_key(path), context
        for name, value in headers.items():
            assert not _KEY_RE.search(name) and not _KEY_RE.search(value), f"{name} leaks; {context}"
    # The fuzz must reach both sides, or it proves nothing.
    assert runs > 1000, runs
    assert outcomes.get("allow", 0) > 50 and outcomes.get("key_in_url", 0) > 50, outcomes
