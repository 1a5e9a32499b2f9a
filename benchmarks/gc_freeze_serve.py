"""`mcp-authz serve` with `gc.freeze()` applied after start-up (scale variant "100k + gc.freeze").

    python -m benchmarks.gc_freeze_serve --listen 127.0.0.1:PORT

A bench-only experiment, no sidecar code changed: a daemon thread calls `gc.freeze()` once a
second for the first minute, which moves every object then alive (the loaded state: ~100k
principals, keys and overrides) to the permanent generation, so the cyclic garbage collector
stops traversing them on every full collection. Compared with the plain sidecar on the same
store, it shows how much of the large-store slowdown is the collector.
"""

from __future__ import annotations

import gc
import sys
import threading
import time

from authz_server.cli import main


def _freezer(seconds: int = 60) -> None:
    for _ in range(seconds):
        time.sleep(1)
        gc.freeze()


if __name__ == "__main__":
    threading.Thread(target=_freezer, name="gc-freeze", daemon=True).start()
    sys.exit(main(["serve", *sys.argv[1:]]))
