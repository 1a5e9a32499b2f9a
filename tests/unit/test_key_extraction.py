"""Where a gateway key may come from, and that it never goes upstream (issue 11).

- `scan_url`, table-driven: exact key-shaped path segments are path keys and are stripped;
  a key-shaped string anywhere else in the URL, however encoded, is a 400;
- a bounded fuzz of the whole pipeline: random headers, paths and queries around valid,
  revoked, unknown and damaged keys. Whatever it decides, no exception but `Denied` escapes,
  and an allowed request, as Envoy would forward it, holds no key-shaped string.
"""

from __future__ import annotations

import os
import random
import re
import time
from urllib.parse import quote, unquote_plus

import pytest

from authz_server.crypto import keys
from authz_server.errors import Denied
from authz_server.models import AuthMode
from authz_server.pipeline.authn import scan_url
from authz_server.pipeline.types import Decision

from .world import World, request

K = keys.generate()[1].reveal()
K2 = keys.generate()[1].reveal()
ENCODED = "".join(f"%{b:02X}" for b in K.encode())  # every character percent-encoded


@pytest.mark.parametrize(
    ("path", "key", "rewritten"),
    [
        ("/mcp/github", "", None),
        ("/mcp/github/tools?cursor=abc%20def", "", None),
        ("/mcp/github/files/mgw_notes.txt", "", None),
        ("/mcp/github/mgw_" + "a" * 31, "", None),  # one short of a key: not key-shaped
        (f"/mcp/github/{K}", K, "/mcp/github"),
        (f"/mcp/github/{K}/", K, "/mcp/github/"),
        (f"/mcp/github/{K}/tools?x=1", K, "/mcp/github/tools?x=1"),
        (f"/{K}", K, "/"),
        (f"/mcp/{K}/github/{K2}", K, "/mcp/github"),  # the first is the key; both are removed
    ],
)
def test_path_keys_are_whole_segments_and_are_stripped(path: str, key: str, rewritten: str | None) -> None:
    assert scan_url(path) == (key, rewritten)


@pytest.mark.parametrize(
    "path",
    [
        f"/mcp/github?api_key={K}",
        f"/mcp/github?key={K}",
        f"/mcp/github?{K}",
        f"/mcp/github?a=1&token=Bearer%20{K}",
        f"/mcp/github/{K2}?api_key={K}",  # a path key plus a query key
        f"/mcp/github/x{K}",  # inside a segment
        f"/mcp/github/{K}x",
        f"/mcp/github/{K}.json",
        f"/mcp/github/{K[:10]}%{ord(K[10]):02X}{K[11:]}",  # one character encoded
        f"/mcp/github/{ENCODED}",
        f"/mcp/github?k={ENCODED}",
        f"/mcp/github?k={quote(ENCODED)}",  # encoded twice
        f"/mcp/github?k={quote(quote(ENCODED))}",  # three times
        f"/mcp/github?k={K[:12]}+{K[12:]}".replace("+", ""),
    ],
)
def test_a_key_anywhere_else_in_the_url_is_refused(path: str) -> None:
    with pytest.raises(Denied) as refused:
        scan_url(path)
    assert (refused.value.status, refused.value.reason) == (400, "key_in_url")
    assert K not in refused.value.message and K2 not in refused.value.message


def test_a_refused_url_names_the_key_id_for_the_audit_trail() -> None:
    with pytest.raises(Denied) as refused:
        scan_url(f"/mcp/github?api_key={K}")
    assert refused.value.key_id == K[keys.KEY_ID_SLICE]


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


def _world() -> tuple[World, list[str]]:
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
    w, pool = _world()
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
