"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for load drivers.

Far lighter than httpx per request (no pools, no models), which matters on a 2-core machine
where the driver shares the CPU with Envoy, the sidecar and the upstream. It handles exactly
what the benchmark needs: one request at a time per connection, `Content-Length` or chunked
responses (the MCP server's SSE answers to a POST are chunked and end with the response).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lowercase names; a repeated header keeps its last value
    body: bytes


class Connection:
    """One keep-alive connection to 127.0.0.1:`port`."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None

    async def request(self, method: str, path: str, headers: Mapping[str, str], body: bytes = b"") -> Response:
        if self._writer is None or self._reader is None:
            await self.open()
        assert self._writer is not None and self._reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        parsed: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                parsed[name.strip().lower()] = value.strip()
        if parsed.get("transfer-encoding", "").lower() == "chunked":
            payload = await self._chunked()
        elif "content-length" in parsed:
            payload = await self._reader.readexactly(int(parsed["content-length"]))
        else:
            payload = b""
        if parsed.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, parsed, payload)

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        parts: list[bytes] = []
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")  # no trailers expected
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)
