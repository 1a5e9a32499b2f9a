"""Configuration D's load driver: MCP `tools/call` over Streamable HTTP, raw JSON-RPC.

    python -m benchmarks.mcp_driver --url http://127.0.0.1:PORT/mcp/bench \\
        --auth-file TOKENS --clients 8 --duration 8 [--warmup 1]

Each of `--clients` concurrent clients is one MCP session on its own keep-alive connection:
`initialize`, `notifications/initialized`, then `tools/call add {a, b}` in a closed loop,
checking every answer (HTTP 200, a JSON-RPC result equal to a+b). Client i sends
`Authorization: Bearer <line i of --auth-file>`: the upstream token when calling the server
directly, a gateway key when calling through Envoy (which then injects that user's token).

It is a raw JSON-RPC driver (rawhttp), not the `mcp` SDK client: the SDK's per-call overhead
(pydantic models, anyio task groups, httpx) would make the driver, not the gateway, the
bottleneck on a 2-core machine. The wire traffic is what the SDK sends.
Prints one JSON object: calls, errors, elapsed, calls_per_s, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.rawhttp import Connection, Response

PROTOCOL = "2025-06-18"
ACCEPT = "application/json, text/event-stream"


def _json_rpc(response: Response) -> dict[str, Any]:
    """The JSON-RPC message of a response: plain JSON, or the `data:` of an SSE event."""
    text = response.body.decode()
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        text = data[-1] if data else "{}"
    message: dict[str, Any] = json.loads(text)
    return message


class Client:
    """One MCP session over one connection."""

    def __init__(self, host: str, port: int, path: str, auth: str) -> None:
        self.conn = Connection(host, port)
        self.path = path
        self.headers = {"authorization": f"Bearer {auth}", "content-type": "application/json", "accept": ACCEPT}
        self.next_id = 1

    async def _post(self, message: dict[str, Any]) -> Response:
        return await self.conn.request("POST", self.path, self.headers, json.dumps(message).encode())

    async def start(self) -> None:
        init = await self._post({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": PROTOCOL, "capabilities": {},
                       "clientInfo": {"name": "mcp-authz-bench", "version": "0"}},
        })  # fmt: skip
        if init.status != 200:
            raise RuntimeError(f"initialize: HTTP {init.status}: {init.body[:300]!r}")
        session = init.headers.get("mcp-session-id")
        if session:
            self.headers["mcp-session-id"] = session
        self.headers["mcp-protocol-version"] = PROTOCOL
        done = await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if done.status not in (200, 202):
            raise RuntimeError(f"notifications/initialized: HTTP {done.status}")

    async def call_add(self, a: int, b: int) -> bool:
        self.next_id += 1
        response = await self._post({
            "jsonrpc": "2.0", "id": self.next_id, "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": a, "b": b}},
        })  # fmt: skip
        if response.status != 200:
            return False
        result = _json_rpc(response).get("result", {})
        if result.get("isError"):
            return False
        structured = result.get("structuredContent") or {}
        content = result.get("content") or [{}]
        value = structured.get("result", content[0].get("text"))
        return str(value) == str(a + b)


async def run(url: str, auths: list[str], clients: int, duration: float, warmup: float) -> dict[str, Any]:
    """Start `clients` sessions, run `warmup` s unmeasured, then `duration` s measured."""
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
    sessions = [Client(host, port, path, auths[i % len(auths)]) for i in range(clients)]
    await asyncio.gather(*(s.start() for s in sessions))
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.monotonic() + warmup + duration

    async def loop(client: Client, seed: int) -> None:
        nonlocal errors
        n = seed
        while time.monotonic() < stop_at:
            n += 1
            started = time.perf_counter()
            ok = await client.call_add(n, seed)
            elapsed = time.perf_counter() - started
            if measuring:
                latencies.append(elapsed)
                errors += 0 if ok else 1

    async def switch() -> float:
        nonlocal measuring
        await asyncio.sleep(warmup)
        measuring = True
        return time.monotonic()

    tasks = [asyncio.create_task(loop(s, i * 1000)) for i, s in enumerate(sessions)]
    measure_start = await switch()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - measure_start
    for s in sessions:
        await s.conn.close()
    calls = len(latencies)
    ordered = sorted(latencies)
    return {
        "calls": calls,
        "errors": errors,
        "elapsed": elapsed,
        "calls_per_s": calls / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * statistics.median(ordered) if ordered else 0.0,
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0,
    }


def main() -> None:
    """Command-line entry point; prints the result as one JSON object."""
    parser = argparse.ArgumentParser(description="MCP tools/call load driver (raw JSON-RPC over Streamable HTTP)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--auth-file", type=Path, required=True, help="one bearer value a line, one per client")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    auths = [line.strip() for line in args.auth_file.read_text().splitlines() if line.strip()]
    print(json.dumps(asyncio.run(run(args.url, auths, args.clients, args.duration, args.warmup))))


if __name__ == "__main__":
    main()
