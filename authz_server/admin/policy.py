"""Who may do what: the `Actor`, the rank hierarchy, and the one role check.

Every use case calls `authorize` (or `may`, its yes/no form) and nothing else
decides. The rule, as README's Administration section states it:
- admin: everything (the local operator is an admin);
- any role: who am I, and a server's placeholder names (no values);
- manager: reading servers; on another principal, overrides (set, list masked,
  delete, test, status) and usage records, but only of a principal whose highest
  role is not above the manager's (so never an admin's); never another
  principal's keys, since a key for someone is the power to act as them;
- manager and user: their own keys, overrides and usage records;
- everything else (servers, principals, teams, pruning usage, the audit trail)
  is for admins;
- and whoever gives roles gives none above their own (`authorize_grant`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from authz_server.errors import PermissionDenied
from authz_server.models import Principal, Role

CLI_ACTOR_ID = "cli"
KEY_HOLDER_ID = "(gateway key)"

# Keys and overrides belong to a principal: a user may act on their own.
_OWNED_ACTIONS = frozenset(
    {
        "keys.create",
        "keys.list",
        "keys.revoke",
        "keys.regenerate",
        "overrides.set",
        "overrides.list",
        "overrides.delete",
        # The status of a principal's credentials, and testing one against the upstream.
        "overrides.status",
        "overrides.test",
        # Usage records belong to the principal whose request they record.
        "usage.query",
        "usage.export",
    }
)
# Of those, what a manager may also do on another principal (one who does not outrank them):
# overrides, with their status and tests, and usage records. Never keys: a key for someone is
# the power to act as them, and so to use their personal credentials.
_MANAGED_ACTIONS = _OWNED_ACTIONS - {"keys.create", "keys.list", "keys.revoke", "keys.regenerate"}
# The hierarchy: admin > manager > user. A principal ranks as its highest role.
_RANK = {Role.ADMIN: 3, Role.MANAGER: 2, Role.USER: 1}
_SERVER_READ_ACTIONS = frozenset({"servers.list", "servers.show"})
# Any authenticated principal: who am I, and which placeholders a server asks for (no values).
_ANY_ROLE_ACTIONS = frozenset({"whoami", "servers.form"})


def rank(roles: Iterable[Role]) -> int:
    """A principal's place in the hierarchy admin > manager > user: its highest role (0: none)."""
    return max((_RANK.get(Role(r), 0) for r in roles), default=0)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling: a principal (remote, authenticated by gateway key) or the local operator."""

    principal_id: str
    roles: frozenset[Role]
    # Per call, for the audit trail: the admin API's request id and the caller's address.
    request_id: str = field(default="", compare=False)
    source: str = field(default="", compare=False)

    @classmethod
    def operator(cls) -> Actor:
        """The local CLI operator: it holds the master key and the store, so it is an admin."""
        return cls(CLI_ACTOR_ID, frozenset({Role.ADMIN}))

    @classmethod
    def key_holder(cls) -> Actor:
        """Whoever holds the gateway key a `RemoteAdmin` sends: the sidecar authenticates the key
        and acts as its principal. It holds no role here, so an `AdminService` refuses it everything."""
        return cls(KEY_HOLDER_ID, frozenset())

    @classmethod
    def of(cls, principal: Principal, request_id: str = "", source: str = "") -> Actor:
        return cls(principal.id, frozenset(principal.roles), request_id, source)

    @property
    def is_operator(self) -> bool:
        return self.principal_id == CLI_ACTOR_ID


def authorize(actor: Actor, action: str, target: Principal | None = None, *, everyone: bool = False) -> None:
    """The one role check: return, or raise PermissionDenied.

    `target` is the principal the action is on: the one named, or the owner of
    the key or override acted on. It is None when the action is on no
    principal's thing (a server, a team, the audit trail) or when the principal
    or key named does not exist. Callers look the target up, call this, and only
    then raise NotFound, so a refusal never tells whether the target exists.
    `everyone` asks to list across principals; the caller then keeps only the
    rows of principals this check lets the actor act on (`may`), so nobody lists
    a principal who outranks them. An unknown target is refused to all but
    admins, exactly as a principal who outranks the actor would be.
    """
    roles = actor.roles
    if Role.ADMIN in roles:
        return
    if action in _ANY_ROLE_ACTIONS and roles:
        return
    if action in _SERVER_READ_ACTIONS and Role.MANAGER in roles:
        return
    if action in _OWNED_ACTIONS and roles:
        manages = action in _MANAGED_ACTIONS and Role.MANAGER in roles
        if everyone:
            if manages:
                return
        elif target is not None:
            if target.id == actor.principal_id:
                return
            if manages and rank(target.roles) <= rank(roles):
                return
    raise PermissionDenied(f"You are not allowed to do {action} on this target.")


def authorize_grant(actor: Actor, roles: Iterable[Role]) -> None:
    """Nobody gives a role that ranks above their own (a manager never makes an admin), whatever
    else `authorize` lets them do: raise PermissionDenied."""
    if rank(roles) > rank(actor.roles):
        raise PermissionDenied("You may not give a role that ranks above your own.")


def may(actor: Actor, action: str, target: Principal | None = None, *, everyone: bool = False) -> bool:
    """`authorize` as a yes/no, for choosing what a listing shows."""
    try:
        authorize(actor, action, target, everyone=everyone)
    except PermissionDenied:
        return False
    return True


def visible(actor: Actor, action: str, people: Iterable[Principal]) -> frozenset[str] | None:
    """Whose rows a listing of everyone shows the actor: None for all of them (an actor who may
    act even on an unknown principal, i.e. an admin), else the ids of the principals in `people`
    the actor may act on, so nobody sees the rows of a principal who outranks them."""
    if may(actor, action, None):
        return None
    return frozenset(p.id for p in people if may(actor, action, p))
