"""The upstream's signature recipe (examples/verify_signature.py), table-driven."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from ..fakes import example

vs = example("verify_signature")

SECRET = "s3cret-signing-key"
NOW = 1_700_000_000
METHOD = "POST"
PATH = "/mcp/demo?x=1"
IDENTITY = {
    "x-user-id": "u_123",
    "x-user-type": "user",
    "x-user-team": "platform",
    "x-user-roles": "admin,user",
    "x-request-id": "0f9e2b1c-aaaa-bbbb-cccc-000000000001",
}


def signed_headers(secret: str = SECRET, ts: int = NOW, **overrides: str) -> dict[str, str]:
    headers = dict(IDENTITY)
    headers["x-mcp-authz-timestamp"] = str(ts)
    headers["x-mcp-authz-signature"] = vs.sign(secret, ts, METHOD, PATH, headers)
    headers.update(overrides)
    return headers


def without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


def test_sign_matches_documented_message() -> None:
    message = "\n".join(["v1", str(NOW), "POST", PATH, *IDENTITY.values()])
    expected = hmac.new(SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()
    assert vs.sign(SECRET, NOW, "post", PATH, IDENTITY) == f"v1={expected}"


def test_missing_identity_header_signs_as_empty_string() -> None:
    partial = {k: v for k, v in IDENTITY.items() if k != "x-user-team"}
    assert vs.sign(SECRET, NOW, METHOD, PATH, partial) == vs.sign(
        SECRET, NOW, METHOD, PATH, {**partial, "x-user-team": ""}
    )


CASES = [
    ("valid", signed_headers(), METHOD, PATH, NOW, True),
    ("valid within skew", signed_headers(), METHOD, PATH, NOW + 300, True),
    ("valid, clock behind", signed_headers(), METHOD, PATH, NOW - 300, True),
    ("wrong secret", signed_headers(secret="other"), METHOD, PATH, NOW, False),
    ("tampered user id", signed_headers(**{"x-user-id": "u_999"}), METHOD, PATH, NOW, False),
    ("tampered roles", signed_headers(**{"x-user-roles": "admin"}), METHOD, PATH, NOW, False),
    ("tampered request id", signed_headers(**{"x-request-id": "x"}), METHOD, PATH, NOW, False),
    ("tampered path", signed_headers(), METHOD, "/mcp/github?x=1", NOW, False),
    ("tampered query", signed_headers(), METHOD, "/mcp/demo?x=2", NOW, False),
    ("tampered method", signed_headers(), "GET", PATH, NOW, False),
    ("stale timestamp", signed_headers(), METHOD, PATH, NOW + 301, False),
    ("future timestamp", signed_headers(), METHOD, PATH, NOW - 301, False),
    ("timestamp replaced", signed_headers(**{"x-mcp-authz-timestamp": str(NOW + 1)}), METHOD, PATH, NOW, False),
    ("signature missing", without(signed_headers(), "x-mcp-authz-signature"), METHOD, PATH, NOW, False),
    ("timestamp missing", without(signed_headers(), "x-mcp-authz-timestamp"), METHOD, PATH, NOW, False),
    ("signature empty", signed_headers(**{"x-mcp-authz-signature": ""}), METHOD, PATH, NOW, False),
    ("signed header removed", without(signed_headers(), "x-user-team"), METHOD, PATH, NOW, False),
    ("timestamp not a number", signed_headers(**{"x-mcp-authz-timestamp": "12a"}), METHOD, PATH, NOW, False),
    ("non-ascii signature", signed_headers(**{"x-mcp-authz-signature": "v1=\u00e9"}), METHOD, PATH, NOW, False),
    ("no headers at all", {}, METHOD, PATH, NOW, False),
]


@pytest.mark.parametrize(("headers", "method", "path", "now", "ok"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_verify(headers: dict[str, str], method: str, path: str, now: int, ok: bool) -> None:
    assert vs.verify(SECRET, method, path, headers, now=now) is ok


def test_verify_uses_wall_clock_by_default() -> None:
    import time

    ts = int(time.time())
    headers = signed_headers(ts=ts)
    assert vs.verify(SECRET, METHOD, PATH, headers)
    assert not vs.verify(SECRET, METHOD, PATH, signed_headers(ts=ts - 3600))
