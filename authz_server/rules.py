"""The naming and header rules every layer shares, each defined once.

- names of teams, principals and servers (`NAME_RE`), MCP tool names (`TOOL_RE`);
- placeholder names in credential templates, and their length limit;
- the headers the gateway owns: the verified identity, the request id and the
  signature pair (whose names are settings: `Settings.signature_header` and
  `timestamp_header`, defaulting to the constants here), plus the headers no
  template may set because they frame the HTTP message.

Key shapes (`mgw_…`, key ids) live with the keys, in `crypto/keys.py`.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")  # \Z: `$` also matches before a final newline
"""Names of teams, principals and servers: lowercase, URL- and header-safe."""

TOOL_RE = re.compile(r"^[A-Za-z0-9_./-]{1,128}\Z")
"""An MCP tool name as scopes, filters and messages may name it: letters, digits, '_', '-', '.', '/'."""

PLACEHOLDER_NAME_MAX = 64
_PLACEHOLDER_NAME = rf"[A-Z][A-Z0-9_]{{0,{PLACEHOLDER_NAME_MAX - 1}}}"
PLACEHOLDER_NAME_RE = re.compile(rf"^{_PLACEHOLDER_NAME}\Z")
"""A placeholder's name: a capital letter, then capitals, digits and '_', at most 64 in all."""
PLACEHOLDER_RE = re.compile(rf"\{{\{{\s*({_PLACEHOLDER_NAME})\s*\}}\}}")
"""`{{API_KEY}}` in a header template; group 1 is the name."""

# --- headers ----------------------------------------------------------------------------------

IDENTITY_HEADERS = ("x-user-id", "x-user-type", "x-user-team", "x-user-roles")
"""The verified identity Check sets upstream, in the order the signature covers them."""
REQUEST_ID_HEADER = "x-request-id"
SIGNATURE_HEADER = "x-mcp-authz-signature"  # the default of Settings.signature_header
TIMESTAMP_HEADER = "x-mcp-authz-timestamp"  # the default of Settings.timestamp_header

VERIFIED_HEADERS = frozenset({*IDENTITY_HEADERS, REQUEST_ID_HEADER})
"""Headers upstream only ever receives from the gateway: a client's copies are replaced."""
_FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})
# Hop-by-hop headers: meaningless (or harmful) to inject upstream.
_HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"})

KEY_HEADER_RESERVED = VERIFIED_HEADERS | {"host", "content-type", "content-length", "authorization"}
"""Names the custom key header may not take (`Authorization: Bearer` is accepted anyway)."""


def template_reserved(signature_header: str, timestamp_header: str) -> frozenset[str]:
    """Header names a server's credential template may not set: the gateway's own (identity,
    request id, the configured signature pair), message framing, and hop-by-hop headers."""
    signed = {signature_header.lower(), timestamp_header.lower()}
    return VERIFIED_HEADERS | signed | _FRAMING_HEADERS | _HOP_BY_HOP_HEADERS
