"""admin/audit.py: every operation writes exactly one audit event, and none holds a secret."""

from __future__ import annotations

from authz_server.errors import NotFound
from authz_server.models import Secret

from ..fakes import GH_TOKEN, LINEAR_TOKEN, OP, AdminWorld


async def _audit(w: AdminWorld) -> list:
    return await w.store.query_audit(limit=10_000)


async def test_every_operation_writes_one_audit_event_without_secrets(world: AdminWorld) -> None:
    w = world
    calls = [
        ("servers.add", lambda: w.svc.add_server(OP, "crm", "shared", ["X-API-Key: {{API_KEY}}"])),
        ("servers.list", lambda: w.svc.list_servers(OP)),
        ("servers.show", lambda: w.svc.show_server(OP, "crm")),
        ("servers.set_shared", lambda: w.svc.set_shared(OP, "crm", {"API_KEY": GH_TOKEN})),
        ("servers.rotate_signing_secret", lambda: w.svc.rotate_signing_secret(OP, "crm")),
        ("principals.add", lambda: w.svc.add_principal(OP, "bob", "default", ["user"])),
        ("principals.list", lambda: w.svc.list_principals(OP)),
        ("principals.disable", lambda: w.svc.set_principal_disabled(OP, "bob", True)),
        ("principals.enable", lambda: w.svc.set_principal_disabled(OP, "bob", False)),
        ("teams.list", lambda: w.svc.list_teams(OP)),
        ("teams.disable", lambda: w.svc.set_team_disabled(OP, "default", True)),
        ("teams.enable", lambda: w.svc.set_team_disabled(OP, "default", False)),
        ("keys.create", lambda: w.svc.create_key(OP, "bob", "laptop")),
        ("keys.list", lambda: w.svc.list_keys(OP)),
        ("overrides.set", lambda: w.svc.set_override(OP, "bob", "crm", {"API_KEY": LINEAR_TOKEN})),
        ("overrides.list", lambda: w.svc.list_overrides(OP)),
        ("overrides.delete", lambda: w.svc.delete_override(OP, "bob", "crm")),
        ("servers.remove", lambda: w.svc.remove_server(OP, "crm")),
        ("keys.create", lambda: w.svc.create_key(OP, "nobody")),  # an error is audited too
    ]
    w.secrets += [GH_TOKEN, LINEAR_TOKEN]
    for action, call in calls:
        before = len(await _audit(w))
        try:
            result = await call()
        except NotFound:
            result = None
        for item in result if isinstance(result, tuple) else ():
            if isinstance(item, Secret):
                w.secrets.append(item.reveal())
        events = await _audit(w)
        assert len(events) == before + 1, action
        assert events[-1].action == action and events[-1].actor == "cli"
    keys = [v.key_id for v in await w.svc.list_keys(OP, "bob")]
    (bob_key,) = keys
    await w.svc.regenerate_key(OP, bob_key, grace_seconds=60)
    await w.svc.revoke_key(OP, bob_key)
    events = await _audit(w)
    by_action = {e.action: e for e in events}
    assert by_action["keys.regenerate"].target == f"key:{bob_key}" and by_action["keys.regenerate"].outcome == "ok"
    assert by_action["keys.regenerate"].details["grace_seconds"] == "60"
    assert by_action["keys.revoke"].target == f"key:{bob_key}"
    assert by_action["overrides.set"].details == {"fields": "API_KEY"}
    assert by_action["overrides.set"].target == "override:bob/crm"
    assert events[-4].outcome == "error" and events[-4].details["reason"] == "not_found"
    # The scan: no secret, key or hash anywhere in the audit trail.
    dump = "\n".join(repr(e) for e in events)
    for secret in w.secrets:
        assert secret not in dump
        assert secret[4:20] not in dump
    assert "$argon2" not in dump and "mgw_" not in dump
