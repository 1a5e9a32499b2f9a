"""pipeline/mutate.py: what an allowed request becomes: credential and identity headers, the key
removed from wherever it came, and the signature an upstream checks."""

from __future__ import annotations

import hashlib
import hmac

from authz_server.models import PrincipalKind
from authz_server.pipeline.types import Decision

from ..fakes import SIGNING, alice_key, bob_key, request, standard_world


async def test_allow_mutations() -> None:
    w = standard_world()
    key = alice_key(w)
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
    w = standard_world()
    key = bob_key(w)
    open_decision = w.pipeline().decide(request(bearer=key, server="open"))
    assert "authorization" in open_decision.headers_to_remove
    linear_decision = w.pipeline().decide(request(bearer=key, server="linear"))
    assert "authorization" not in linear_decision.headers_to_remove
    assert dict(linear_decision.headers_to_set)["authorization"] == "Bearer shared-linear"


async def test_empty_roles_header_is_removed_not_passed_through() -> None:
    w = standard_world()
    key = w.key(w.principal("svc", roles=(), kind=PrincipalKind.SERVICE))
    decision = w.pipeline().decide(request(bearer=key, server="open", headers={"x-user-roles": "admin"}))
    assert "x-user-roles" in decision.headers_to_remove
    assert dict(decision.headers_to_set)["x-user-type"] == "service"
