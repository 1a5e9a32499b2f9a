"""`mcp-authz serve` with uvloop's event loop, unchanged otherwise (benchmark variant C-uvloop).

    python -m benchmarks.uvloop_serve --listen 127.0.0.1:PORT

The CLI runs the sidecar with `asyncio.run`, which takes its loop from the event loop policy:
installing uvloop's policy first is the whole difference. No sidecar code is changed.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from authz_server.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main(["serve", *sys.argv[1:]]))
