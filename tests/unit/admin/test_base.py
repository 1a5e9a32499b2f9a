"""admin/base.py: what every use case shares: principal None means the caller, and the configured
signature header names (reserved in templates, signed with by `overrides test`)."""

from __future__ import annotations

import pytest

from authz_server.admin.service import AdminService
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.errors import InvalidInput, NotFound
from authz_server.store.memory import MemoryStore

from ..fakes import FAST, GOOD, OP, Clock, FakeProbe, SelfServiceWorld, example

verify = example("verify_signature").verify  # the upstream's recipe


async def test_principal_none_means_the_caller_and_the_operator_must_name_one(w: SelfServiceWorld) -> None:
    view, key = await w.svc.create_key(w.alice, None, "laptop")
    assert view.principal == "alice" and key.reveal().startswith("mgw_")
    await w.svc.set_override(w.alice, None, "github", {"API_KEY": GOOD})
    await w.svc.delete_override(w.alice, None, "github")
    assert await w.svc.list_overrides(w.alice) == []
    with pytest.raises(InvalidInput, match="Name the principal"):
        await w.svc.set_override(OP, None, "github", {"API_KEY": GOOD})
    with pytest.raises(NotFound, match="alice has no override"):
        await w.svc.delete_override(w.alice, None, "github")


async def test_the_configured_signature_headers_are_reserved_and_signed_with() -> None:
    """The sidecar may rename its signature pair (Settings.signature_header, timestamp_header):
    templates may not set the configured names, and `overrides test` signs with them."""
    store = MemoryStore()
    await store.migrate()
    probe = FakeProbe()
    svc = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST), Clock(), probe,
                       signature_header="X-Gw-Sig", timestamp_header="x-gw-ts")  # fmt: skip
    await svc.initialize(OP)
    for name in ("x-gw-sig", "X-GW-TS", "x-user-id"):
        with pytest.raises(InvalidInput, match="is reserved"):
            await svc.add_server(OP, "gh", "individual", [f"{name}: {{{{API_KEY}}}}"])
    # The default names are no longer the gateway's, so a template may use them.
    await svc.add_server(OP, "free", "individual", ["X-Mcp-Authz-Signature: {{API_KEY}}"])
    _, signing = await svc.add_server(OP, "github", "individual", ["Authorization: Bearer {{API_KEY}}"],
                                      upstream_url="http://127.0.0.1:9/mcp/github")  # fmt: skip
    await svc.add_principal(OP, "alice", "eng", ["user"])
    await svc.set_override(OP, "alice", "github", {"API_KEY": GOOD})
    assert (await svc.test_override(OP, "github", "alice")).result == "ok"
    (_, headers), = probe.calls
    assert "x-gw-sig" in headers and "x-gw-ts" in headers and "x-mcp-authz-signature" not in headers
    renamed = {"x-mcp-authz-signature": headers["x-gw-sig"], "x-mcp-authz-timestamp": headers["x-gw-ts"]}
    assert verify(signing.reveal(), "POST", "/mcp/github", {**headers, **renamed}) is True
