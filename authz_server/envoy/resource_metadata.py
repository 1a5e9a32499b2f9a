"""The gateway as an OAuth resource server, as the MCP specification's Authorization section
asks of an MCP server: RFC 9728 protected resource metadata, and the RFC 6750 Bearer
challenge that points at it. The only place either is built.

Each MCP server `<name>`, routed at `/mcp/<name>` (envoy/envoy.yaml), is a protected
resource: its identifier is `<scheme>://<host>/mcp/<name>` as the client reached it, and its
metadata is at `<scheme>://<host>/.well-known/oauth-protected-resource/mcp/<name>`. Envoy
asks Check about those paths on a route of their own, marked `context_extensions.mcp_authz:
resource_metadata`; the servicer answers from the live tables, so a server added with
`mcp-authz servers add` is described at once, with no Envoy change.

`authorization_servers` is left out of the metadata: RFC 9728 makes it optional, and the
gateway names no authorization server until it has one (the MCP specification wants at least
one; until then OAuth-only clients cannot sign in, and gateway keys work as before).

The host and a tool name come from the client. Each is checked against a strict shape before
it enters a URL or a header (a bad one is left out, never echoed), and every quoted-string is
escaped, so nothing a client sends can add or close a parameter of the challenge.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from authz_server.errors import Reason, ReasonInfo, redact
from authz_server.rules import NAME_RE, TOOL_RE

ROUTE_EXTENSION = "mcp_authz"  # context_extensions key of the metadata route (envoy.yaml)
METADATA_ROUTE = "resource_metadata"  # ... and its value
WELL_KNOWN = "/.well-known/oauth-protected-resource"  # RFC 9728 section 3
RESOURCE_PREFIX = "/mcp/"  # where envoy.yaml routes each MCP server
REALM = "mcp-authz"

# A Host header as a URL may carry it: a DNS name or IPv4 address, or a bracketed IPv6 address,
# and an optional port. Anything else (quotes, spaces, a path, userinfo) gives no URL at all.
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
# A scope token (RFC 6749 section 3.3: NQCHAR, no space, quote or backslash).
_SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,200}$")


def origin(scheme: str, host: str) -> str:
    """`scheme://host` as the client reached the gateway; "" when the host is not a plain host[:port].
    The scheme is Envoy's (from its listener); anything but http is taken as https."""
    if not _HOST_RE.match(host):
        return ""
    return f"{'http' if scheme.lower() == 'http' else 'https'}://{host.lower()}"


def resource_url(base: str, server: str) -> str:
    """The MCP server's resource identifier: the URL a client connects to."""
    return f"{base}{RESOURCE_PREFIX}{server}"


def metadata_url(base: str, server: str) -> str:
    """Where the server's protected resource metadata is (RFC 9728 section 3.1: the well-known
    path, then the resource's own path)."""
    return f"{base}{WELL_KNOWN}{RESOURCE_PREFIX}{server}"


def server_of(path: str) -> str | None:
    """The server a metadata request names (`/.well-known/oauth-protected-resource/mcp/<name>`,
    query ignored), or None: the bare well-known path (the gateway as a whole is no resource:
    each server is one), or anything else."""
    path = path.partition("?")[0].partition("#")[0]
    rest = path[len(WELL_KNOWN) :] if path.startswith(WELL_KNOWN) else ""
    if not rest.startswith(RESOURCE_PREFIX):
        return None
    name = rest[len(RESOURCE_PREFIX) :]
    return name if NAME_RE.match(name) else None


def document(base: str, server: str) -> dict[str, object]:
    """The RFC 9728 metadata of one MCP server. Keys go in the Authorization header only."""
    return {
        "resource": resource_url(base, server),
        "bearer_methods_supported": ["header"],
        "resource_name": server,
        "scopes_supported": [server],  # the whole server, as a 401's challenge asks for it
    }


@dataclass(frozen=True, slots=True)
class Answer:
    """What Check answers on the metadata route."""

    status: int
    body: Mapping[str, object] | None  # None: no body (a preflight)
    headers: tuple[tuple[str, str], ...]
    server: str  # a registered server's name, else "": the metric label, never what the path said


# Browser-based MCP clients read the metadata from another origin. It is public, so any origin may
# read it, without credentials; a preflight (the client sends MCP-Protocol-Version) is answered too.
_CORS = (("access-control-allow-origin", "*"),)
_METHODS = "GET, HEAD, OPTIONS"
_PREFLIGHT = (*_CORS, ("access-control-allow-methods", _METHODS), ("access-control-allow-headers", "*"),
              ("access-control-max-age", "86400"))  # fmt: skip


def answer(method: str, path: str, scheme: str, host: str, serves: Callable[[str], bool]) -> Answer:
    """The answer to a request on the metadata route; `serves` says whether a server is registered."""
    if method == "OPTIONS":
        return Answer(204, None, _PREFLIGHT, "")
    if method not in ("GET", "HEAD"):
        return Answer(405, {"error": "method_not_allowed", "message": "Use GET."}, (*_CORS, ("allow", _METHODS)), "")
    base = origin(scheme, host)
    if not base:
        return Answer(400, {"error": "bad_host", "message": "The Host header is not a host name."}, _CORS, "")
    server = server_of(path)
    if server is None:
        message = f"Protected resource metadata is per MCP server: {WELL_KNOWN}{RESOURCE_PREFIX}<server>."
        return Answer(404, {"error": "not_found", "message": message}, _CORS, "")
    if not serves(server):
        return Answer(404, {"error": "not_found", "message": f"No MCP server '{server}' is registered."}, _CORS, "")
    return Answer(200, document(base, server), _CORS, server)


@functools.lru_cache(maxsize=1024)  # bounded: the host and the tool come from clients
def challenge(info: ReasonInfo, message: str, base: str, server: str, tool: str) -> str | None:
    """The WWW-Authenticate value of a denial, or None when it has none.

    A 401 says `invalid_token` when a key was presented and refused (not when none was), and
    the scope that covers the server (the specification's SHOULD); a scope refusal (403) says
    `insufficient_scope` and the scope that would allow the call. Both carry `resource_metadata`
    when the server and the client's host are known. Scopes are written as key scope entries:
    `server`, `server:tool`."""
    error = info.bearer_error
    if info.status != 401 and not error:
        return None
    params: list[tuple[str, str]] = [("realm", REALM)]
    if error:
        params.append(("error", error))
    if info.status == 401 or error == "insufficient_scope":
        scope = _needed_scope(info.reason, server, tool)
        if scope:
            params.append(("scope", scope))
    if base and NAME_RE.match(server):
        params.append(("resource_metadata", metadata_url(base, server)))
    if error:
        # Last: the one free text. Clients that take the first `name=` match (the MCP SDKs do)
        # then find the real scope and metadata URL before anything a message could hold.
        params.append(("error_description", message))
    return "Bearer " + ", ".join(f"{name}={quoted(value)}" for name, value in params)


def _needed_scope(reason: Reason, server: str, tool: str) -> str:
    """The key scope entry (as `mcp-authz keys create --scope` takes it) that would allow the call:
    the server's, or for a refused tool that tool's, when it can be named."""
    if not NAME_RE.match(server):
        return ""
    named = reason is Reason.SCOPE_TOOL and TOOL_RE.match(tool) and redact(tool) == tool  # never a key as a tool
    scope = f"{server}:{tool}" if named else server
    return scope if _SCOPE_TOKEN_RE.match(scope) else ""


def quoted(value: str) -> str:
    """An RFC 9110 quoted-string: backslash and quote escaped; what a header value may not hold
    (control characters, non-ASCII) replaced by '?'."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in value)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_metadata_route(context_extensions: Mapping[str, str]) -> bool:
    """Whether Envoy sent this Check from the metadata route (set there only, by envoy.yaml)."""
    return context_extensions.get(ROUTE_EXTENSION, "") == METADATA_ROUTE
