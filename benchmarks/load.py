"""Load generators: wrk (max throughput, rotating keys) and h2load (fixed rate, latency).

Both are Debian packages (`wrk`, `nghttp2-client`). Every run is bounded: a duration, and a
subprocess timeout beyond it. Only 127.0.0.1 URLs are accepted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import REPO_ROOT, BenchError

LUA_KEYS = REPO_ROOT / "benchmarks" / "lua" / "keys.lua"


def _local(url: str) -> None:
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"load only goes to 127.0.0.1, not {url}")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(url: str, keys_file: Path, *, path: str, duration: float, connections: int, threads: int = 1,
        delay_ms: float | None = None) -> WrkResult:
    """`wrk` with the rotating-keys Lua script (GET `url` + `path`), closed loop."""
    _local(url)
    env = dict(os.environ)
    if delay_ms:
        env["WRK_DELAY_MS"] = str(int(delay_ms))
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s", "--timeout", "5s",
            "-s", str(LUA_KEYS), url, "--", str(keys_file), path]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, env=env, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            data = json.loads(line[len("WRK_JSON ") :])
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                non2xx=data["non2xx"],
                socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
            )
    raise BenchError(f"wrk failed ({done.returncode}): {done.stdout[-800:]} {done.stderr[-800:]}")


@dataclass(frozen=True)
class FixedRateResult:
    target_rps: float
    achieved_rps: float
    requests: int
    non2xx: int
    p50_ms: float
    p99_ms: float
    clients: int


def h2load_fixed(url: str, *, key: str, rate: float, duration: float, work_dir: Path, warmup: float = 1.0,
                 per_client_max: int = 100) -> FixedRateResult:
    """GET `url` at a fixed total `rate`, with h2load (`--h1 --rps`), and return p50/p99.

    h2load's `--rps` timer sends a client's requests in bursts once the per-client rate passes
    100/s (measured: 4 at once every 10 ms at 400/s), and every client of one h2load process
    starts its timer at the same instant (bursts of `-c` requests). A single-threaded sidecar
    queues bursts, which inflates its latency. So the rate is spread over
    ceil(rate / `per_client_max`) separate h2load processes of one connection each (each one
    evenly paced), whose starts are staggered across one period, so their phases differ.
    Percentiles come from every process's per-request log.

    h2load sends the same headers on every request, so one warm key is used here (the sidecar
    does the same dictionary lookups for any warm key); wrk's max-throughput runs rotate keys.
    Latency is measured from each request's send, so queueing before the send is not counted
    (no coordinated-omission correction): keep rates below capacity.
    """
    _local(url)
    clients = max(1, math.ceil(rate / per_client_max))
    per_client = max(1, round(rate / clients))
    period = 1.0 / per_client
    procs: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for i in range(clients):
            log = work_dir / f"h2load-{i}.log"
            log.unlink(missing_ok=True)
            argv = ["h2load", "--h1", "-t", "1", "-c", "1", "--rps", str(per_client),
                    "-D", f"{duration:g}", "--warm-up-time", f"{warmup:g}",
                    "-H", f"authorization: Bearer {key}", "-H", "accept: application/json, text/event-stream",
                    "--log-file", str(log), url]  # fmt: skip
            procs.append((subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
            time.sleep(period / clients)
        latencies: list[int] = []
        non2xx = 0
        for proc, log in procs:
            out, _ = proc.communicate(timeout=duration + warmup + 30)
            if proc.returncode != 0 or not log.exists():
                raise BenchError(f"h2load failed ({proc.returncode}): {out[-800:]}")
            for line in log.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) < 3:
                    continue
                latencies.append(int(parts[2]))
                if not 200 <= int(parts[1]) < 300:
                    non2xx += 1
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if not latencies:
        raise BenchError("h2load logged no request")
    latencies.sort()
    n = len(latencies)
    return FixedRateResult(
        target_rps=per_client * clients,
        achieved_rps=n / duration,
        requests=n,
        non2xx=non2xx,
        p50_ms=latencies[n // 2] / 1000,
        p99_ms=latencies[min(n - 1, int(0.99 * n))] / 1000,
        clients=clients,
    )
