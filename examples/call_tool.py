"""Call one MCP tool through the gateway with the MCP Python SDK.

    MCP_AUTHZ_KEY=mgw_… python examples/call_tool.py http://127.0.0.1:10000/mcp/demo echo_headers
    python examples/call_tool.py http://127.0.0.1:10000/mcp/demo/mgw_… add '{"a": 2, "b": 3}'

The key is sent as `Authorization: Bearer` when MCP_AUTHZ_KEY is set; otherwise
put it in the URL path. A gateway denial prints the gateway's JSON answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client


async def call(url: str, tool: str, arguments: dict[str, object]) -> int:
    key = os.environ.get("MCP_AUTHZ_KEY", "")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        # One plain request first, so a denial shows the gateway's explanation instead of a transport error.
        probe = await http.post(
            url,
            json={"jsonrpc": "2.0", "id": 0, "method": "ping"},
            headers={"accept": "application/json, text/event-stream"},
        )
        if probe.status_code in (401, 403, 429, 503) and probe.headers.get("content-type", "").startswith("application/json"):
            print(f"HTTP {probe.status_code}: {json.dumps(probe.json(), indent=2)}", file=sys.stderr)
            return 1
        async with Client(streamable_http_client(url, http_client=http), mode="legacy", cache=None) as client:
            result = await client.call_tool(tool, arguments)
    for block in result.content:
        text = getattr(block, "text", None)
        print(text if text is not None else block)
    return 1 if result.is_error else 0


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        arguments = json.loads(sys.argv[3]) if len(sys.argv) == 4 else {}
    except json.JSONDecodeError:
        print("error: the tool arguments must be a JSON object, e.g. '{\"a\": 1}'", file=sys.stderr)
        return 2
    try:
        return asyncio.run(call(sys.argv[1], sys.argv[2], arguments))
    except httpx2.ConnectError:
        print(f"error: cannot reach {sys.argv[1].split('/mcp/')[0]}: is the gateway running (make run)?", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
