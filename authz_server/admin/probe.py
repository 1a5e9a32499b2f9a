"""Testing a credential against its upstream: one MCP `initialize`, and the HTTP status it got.

`AdminService.test_override` depends on the `CredentialProbe` protocol; the
sidecar and the CLI use `HttpProbe` (standard library, in a thread, so the
event loop never blocks), tests a fake. The probe never follows a redirect:
that would hand the credential to whatever host the upstream names.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Protocol

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "mcp-authz-credential-test", "version": "1"},
    },
}


class ProbeFailed(Exception):
    """No HTTP answer (refused, timed out, TLS failure...). `message` names no header value."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CredentialProbe(Protocol):
    async def initialize(self, url: str, headers: Sequence[tuple[str, str]]) -> int:
        """POST an MCP initialize to `url` with `headers`; return the HTTP status, or raise ProbeFailed."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a 3xx comes back as an HTTPError with that status


class HttpProbe:
    """`CredentialProbe` over urllib, with a timeout and no redirects."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirects())

    async def initialize(self, url: str, headers: Sequence[tuple[str, str]]) -> int:
        return await asyncio.to_thread(self._post, url, headers)

    def _post(self, url: str, headers: Sequence[tuple[str, str]]) -> int:
        request = urllib.request.Request(url, data=json.dumps(INITIALIZE).encode(), method="POST")
        request.add_header("content-type", "application/json")
        request.add_header("accept", "application/json, text/event-stream")
        for name, value in headers:
            request.add_header(name, value)
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as answered:
            answered.close()
            return int(answered.code)
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            # The reason can quote the URL (no secret: URLs never hold user info), never a header.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise ProbeFailed(f"no answer from the upstream ({reason})") from None
