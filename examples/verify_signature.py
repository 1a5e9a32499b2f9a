"""Check that a request came through the mcp-authz gateway (stdlib only: copy this file).

The gateway adds two headers to every request it allows:

    x-mcp-authz-timestamp: <unix seconds>
    x-mcp-authz-signature: v1=<lowercase hex HMAC-SHA256>

The HMAC key is the server's signing secret (UTF-8 bytes of the string you were given).
The signed message is these 9 lines joined by "\\n" (no trailing newline), a missing
header counting as an empty string:

    v1, timestamp, METHOD (uppercase), path (with query string, as you received it),
    x-user-id, x-user-type, x-user-team, x-user-roles, x-request-id

Usage: ``verify(secret, request.method, request.url.path_with_query, request.headers)``
returns True only for a valid signature at most ``max_skew`` seconds (300) old or ahead.
``headers`` is any mapping with lowercase keys (or a case-insensitive one).
"""

import hashlib
import hmac
import time
from collections.abc import Mapping

SIGNED_HEADERS = ("x-user-id", "x-user-type", "x-user-team", "x-user-roles", "x-request-id")


def sign(secret: str, timestamp: int | str, method: str, path: str, headers: Mapping[str, str]) -> str:
    """Return the ``x-mcp-authz-signature`` value (``v1=<hex>``) for these request values."""
    lines = ["v1", str(timestamp), method.upper(), path, *(headers.get(h, "") for h in SIGNED_HEADERS)]
    digest = hmac.new(secret.encode(), "\n".join(lines).encode(), hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(
    secret: str, method: str, path: str, headers: Mapping[str, str], now: float | None = None, max_skew: int = 300
) -> bool:
    """True if the gateway signed exactly this request, recently; False otherwise (never raises)."""
    timestamp = headers.get("x-mcp-authz-timestamp", "")
    signature = headers.get("x-mcp-authz-signature", "")
    if not (timestamp.isascii() and timestamp.isdigit()) or not signature:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > max_skew:
        return False
    expected = sign(secret, timestamp, method, path, headers)
    return hmac.compare_digest(expected.encode(), signature.encode())  # bytes: any header value is safe
