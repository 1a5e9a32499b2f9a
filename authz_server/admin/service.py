"""`AdminService`: every management use case, one layer behind the local CLI and the admin gRPC API.

It owns every rule about *what* may be changed and *how* input is validated;
the CLI and the API only translate arguments and render results. It is built
from one mixin per resource over a shared base (base.py):

    servers.py     ServerAdmin      MCP servers, shared values, signing secrets
    principals.py  PrincipalAdmin   principals, teams, who am I
    keys.py        KeyAdmin         gateway keys
    overrides.py   OverrideAdmin    overrides, credential status, `overrides test`
    records.py     RecordAdmin      the audit trail and usage: query, export, prune

and implements `AdminOps` (ops.py), where each operation's contract is stated.

Contract of every operation:
- the first argument is the `Actor` doing it; `policy.authorize` is the one place
  that decides whether the actor may, and a refusal raises `PermissionDenied`
  with the same message whether or not the target exists;
- exactly one `AuditEvent` is appended per call (audit.py), with outcome `ok`,
  `denied` or `error`, the actor's request id, and details that never contain a secret;
- bad input raises `InvalidInput`, a missing target `NotFound`, a duplicate
  `Conflict`; messages name fields and placeholders, never values (validate.py);
- results are small frozen views (views.py). A view never carries a hash, a
  ciphertext or a plaintext secret: one-time secrets (gateway keys, signing
  secrets) are returned separately as `Secret`.
"""

from __future__ import annotations

from authz_server.admin import validate
from authz_server.admin.keys import KeyAdmin
from authz_server.admin.overrides import OverrideAdmin
from authz_server.admin.policy import Actor as Actor  # the argument of every operation
from authz_server.admin.principals import PrincipalAdmin, new_principal_id
from authz_server.admin.records import RecordAdmin
from authz_server.admin.servers import ServerAdmin
from authz_server.admin.views import GatewayKeyView
from authz_server.errors import ConfigError, Conflict
from authz_server.models import Principal, PrincipalKind, Role, Secret


class AdminService(ServerAdmin, PrincipalAdmin, KeyAdmin, OverrideAdmin, RecordAdmin):
    """Every management use case, against a `Store`, with one role check and one audit trail.

    Besides the `AdminOps` operations, two for the local operator alone, who holds the store:
    `verify_master_key` and `initialize`."""

    async def verify_master_key(self, *, require_initialized: bool = True) -> None:
        """Raise MasterKeyError unless our keyring opens the store's check values.

        Every command that opens a store calls this first, so a wrong master key
        stops before anything is written. With `require_initialized`, a store
        without check values (never initialised) is a ConfigError too: values
        sealed into it would be bound to a key nobody recorded.
        """
        checks = await self._store.get_key_checks()
        if not checks and require_initialized:
            raise ConfigError("The store is not initialised: run 'mcp-authz init' first.")
        self._keyring.verify_check(checks)

    async def initialize(
        self, actor: Actor, admin_name: str = "admin", team: str = "default"
    ) -> tuple[Principal, GatewayKeyView, Secret]:
        """Bind the store to this master key and create the first admin and their key.

        The store must be migrated. Refuses with Conflict when it already holds
        master key checks (initialised before).
        """
        async with self._audit(actor, "init", f"principal:{admin_name}") as op:
            self._authorize(actor, "init", None)
            validate.check_name(admin_name, "admin principal")
            validate.check_name(team, "team")
            if await self._store.get_key_checks():
                raise Conflict(
                    "The store is already initialised. Use the existing admin key, or create another with "
                    "'mcp-authz keys create'."
                )
            if await self._store.get_principal_by_name(admin_name) is not None:
                raise Conflict(f"A principal named {admin_name} exists already.")
            now = self._now()
            await self._store.put_key_checks(self._keyring.check_values())
            await self._store.ensure_team(team, now)
            principal = await self._store.add_principal(
                Principal(
                    id=new_principal_id(),
                    name=admin_name,
                    kind=PrincipalKind.USER,
                    team=team,
                    roles=(Role.ADMIN,),
                    created_at=now,
                )
            )
            key, secret = await self._issue_key(principal.id, "initial admin key", None, (), now)
            versions = ",".join(str(v) for v in self._keyring.versions)
            op.details.update({"team": team, "key_id": key.key_id, "key_versions": versions})
            return principal, GatewayKeyView.of(key, principal.name, now), secret
