"""Stages 2-4: which MCP server, whether the key may use it, and which credentials to inject.

Credential order (DESIGN.md, runtime decision step 4): the principal's own
override; else, in `shared` mode, the server default (an override may also fill
only some placeholders and take the rest from the default); else `individual`
mode is a 403 naming the server; `none` injects nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz_server.errors import Denied, Reason
from authz_server.models import AuthMode, Secret
from authz_server.rules import PLACEHOLDER_RE, TOOL_RE
from authz_server.pipeline.types import CheckInput, Identity
from authz_server.live.tables import AuthState, ServerEntry

SERVER_EXTENSION = "mcp_server"
_CALL_FREE_METHODS = frozenset({"GET", "DELETE"})  # MCP's session stream and session end: no JSON-RPC call


@dataclass(frozen=True, slots=True)
class Credentials:
    source: str  # "override", "shared" or "none": recorded so an upstream 401 can mark an override invalid
    headers: tuple[tuple[str, str], ...]
    expires_at: float | None = None  # the override's expiry, when one is injected


def find_server(inp: CheckInput, state: AuthState) -> ServerEntry:
    name = inp.context_extensions.get(SERVER_EXTENSION, "")
    if not name:
        raise Denied(Reason.SERVER_UNMAPPED)
    server = state.servers.get(name)
    if server is None:
        raise Denied(Reason.SERVER_UNKNOWN, f"The MCP server '{name}' is not registered with the gateway.")
    return server


def check_scope(identity: Identity, server: str, inp: CheckInput) -> None:
    """An empty scope allows everything. Entries are "server" (all its tools) or "server:tool".

    A key limited to tools on this server needs the MCP method from Envoy's MCP
    filter on every request that could carry a call, whatever its HTTP method (an
    upstream may well read a PUT's body); without it we cannot tell a tool call
    apart, so we refuse (fail closed). Only GET (the SSE stream) and DELETE (the
    session's end) pass without one.
    """
    if not identity.scope:
        return
    tools: set[str] = set()
    whole_server = False
    for entry in identity.scope:
        name, sep, tool = entry.partition(":")
        if name != server:
            continue
        if sep:
            tools.add(tool)
        else:
            whole_server = True
    if whole_server:
        return
    if not tools:
        raise Denied(Reason.SCOPE_SERVER, f"This gateway key is not allowed to use the MCP server '{server}'.")
    if inp.method in _CALL_FREE_METHODS:
        return
    if not inp.mcp_method:
        raise Denied(
            Reason.SCOPE_TOOL,
            "This gateway key is limited to certain tools, and the gateway cannot see which tool is called.",
            hint="Operators: enable Envoy's MCP filter before ext_authz (see envoy/envoy.yaml).",
        )
    if inp.mcp_method == "tools/call" and inp.tool not in tools:
        # The tool name comes from the request body: named back only when it looks like one.
        tool = f"the tool '{inp.tool}'" if TOOL_RE.match(inp.tool) else "this tool"
        raise Denied(Reason.SCOPE_TOOL, f"This gateway key may not call {tool} on '{server}'.")


def resolve_credentials(identity: Identity, server: ServerEntry, state: AuthState, now: float) -> Credentials:
    """The rendered credential headers for this caller on this server, and where they came from."""
    if server.mode is AuthMode.NONE:
        return Credentials("none", ())
    if server.corrupt:
        raise Denied(Reason.CREDENTIAL_UNREADABLE)
    override = state.overrides.get((identity.principal.id, server.name))
    expired = override is not None and override.expires_at is not None and override.expires_at <= now
    if override is not None and override.corrupt:
        raise Denied(Reason.CREDENTIAL_UNREADABLE)
    values: dict[str, Secret]
    use_override = override is not None and not expired
    if server.mode is AuthMode.SHARED:
        values = {**server.shared, **override.values} if use_override else server.shared  # type: ignore[union-attr]
    elif use_override:
        values = override.values  # type: ignore[union-attr]
    else:
        what = "has expired" if expired else "is not configured"
        raise Denied(
            Reason.CREDENTIAL_MISSING,
            f"The MCP server '{server.name}' needs your own credential, and yours {what}.",
            hint=f"Add it with 'mcp-authz overrides set --server {server.name}', or ask a manager to set it for you.",
        )
    if use_override:
        return Credentials("override", render(server, values), override.expires_at)  # type: ignore[union-attr]
    return Credentials("shared", render(server, values))


def render(server: ServerEntry, values: dict[str, Secret]) -> tuple[tuple[str, str], ...]:
    """Fill each header template. A header whose placeholders are all optional and
    unset is left out; a required placeholder without a value is a 403."""
    out: list[tuple[str, str]] = []
    for header in server.headers:
        missing_required: list[str] = []
        filled = 0

        def substitute(match: object) -> str:
            nonlocal filled
            name = match.group(1)  # type: ignore[attr-defined]
            secret = values.get(name)
            if secret is None:
                if name not in server.optional:
                    missing_required.append(name)
                return ""
            filled += 1
            return secret.reveal()

        value = PLACEHOLDER_RE.sub(substitute, header.template)
        if missing_required:
            raise Denied(
                Reason.CREDENTIAL_MISSING,
                f"The MCP server '{server.name}' has no value for {', '.join(missing_required)}.",
                hint=f"Set it with 'mcp-authz overrides set --server {server.name}' or 'mcp-authz servers set-shared'.",
            )
        if filled or not header.placeholders():
            out.append((header.name.lower(), value))
    return tuple(out)
