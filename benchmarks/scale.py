"""Scale: 100k principals, 100k keys and 100k overrides in one SQLite store.

    python -m benchmarks.scale [--principals 100000] [--rounds 3] [--seconds 5]

Reports:
- how long seeding took (benchmarks/seed.py: bulk batches through the store; keys hashed with
  the cheap Argon2 profile m=8 KiB, t=1, because 100k default-cost hashes take over half an
  hour here; every key is still a real Argon2id hash that the sidecar verifies on first use);
- time from spawning `mcp-authz serve` to its gRPC health answering SERVING (state loaded);
- the sidecar's RSS right after that, and its peak (VmHWM) at the end;
- warm Check throughput through Envoy (configuration C) with 1,000 keys sampled evenly across
  the 100k (each verified once first), against a 1,000-principal store measured in the same
  run, interleaved round by round. (The sidecar freezes its loaded state out of the garbage
  collector's scans after start-up; before it did, the 100k store measured 0.89x the 1k one.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import envoy_config, load
from benchmarks.procs import REPO_ROOT, ProcessGroup, free_port
from benchmarks.seed import seed_sync, write_keys_file
from benchmarks.stack import start_envoy, start_sidecar, warm_direct

PATH = "/mcp/bench"


def run(work: Path, *, principals: int = 100_000, rounds: int = 3, seconds: float = 5, connections: int = 32,
        sample: int = 1000, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Seed, start, measure, stop (always). Returns the numbers (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    big = seed_sync(work / "big", principals=principals)
    seed_seconds = time.monotonic() - started
    log(f"  scale: seeded {principals} principals, keys and overrides in {seed_seconds:.1f}s {big.seconds}")
    small = seed_sync(work / "small", principals=sample)
    step = max(1, principals // sample)
    sampled = big.keys[::step][:sample]
    big_keys = write_keys_file(work / "big-keys.txt", sampled)
    small_keys = write_keys_file(work / "small-keys.txt", small.keys)
    db_bytes = sum(p.stat().st_size for p in (work / "big").glob("authz.db*"))

    group = ProcessGroup(work / "logs")
    try:
        sidecar_big = start_sidecar(group, "sidecar-100k", big, timeout=120)
        rss_loaded = sidecar_big.proc.status_kib("VmRSS")
        log(f"  scale: SERVING {sidecar_big.ready_seconds:.2f}s after spawn, RSS {rss_loaded / 1024:.0f} MiB")
        sidecar_small = start_sidecar(group, "sidecar-1k", small)
        envoys = {}
        for name, sidecar in (("1k", sidecar_small), ("100k", sidecar_big)):
            lp, ap = free_port(), free_port()
            config = envoy_config.derive(auth="ext_authz", listen_port=lp, admin_port=ap, authz_ports=[sidecar.port])
            envoys[name] = start_envoy(group, f"scale-{name}", config, lp, ap, work, wait_healthy=True)
        warm_big = warm_direct(sidecar_big, sampled, big.server)
        warm_direct(sidecar_small, small.keys, small.server)
        runs: list[dict[str, Any]] = []
        targets = (("1k", small_keys, sidecar_small), ("100k", big_keys, sidecar_big))
        for name, keys_file, _ in targets:  # unmeasured pass
            load.wrk(envoys[name].base_url, keys_file, path=PATH, duration=1, connections=connections)
        for rnd in range(rounds):
            for name, keys_file, sidecar in targets:
                c0 = sidecar.proc.cpu_seconds()
                result = load.wrk(envoys[name].base_url, keys_file, path=PATH, duration=seconds,
                                  connections=connections)  # fmt: skip
                cpu = sidecar.proc.cpu_seconds() - c0
                runs.append({"store": name, "round": rnd, "rps": result.rps, "non2xx": result.non2xx,
                             "cpu_us": 1e6 * cpu / result.requests if result.requests else None})  # fmt: skip
                log(f"  scale round {rnd + 1}/{rounds} {name:11s} {result.rps:7.0f} req/s non-2xx {result.non2xx}")
        rss_end = sidecar_big.proc.status_kib("VmRSS")
        hwm = sidecar_big.proc.status_kib("VmHWM")
        small_hwm = sidecar_small.proc.status_kib("VmHWM")
    finally:
        group.stop_all()

    def med(store: str) -> float:
        return statistics.median(r["rps"] for r in runs if r["store"] == store)

    return {
        "principals": principals,
        "seed_seconds": seed_seconds,
        "seed_steps": big.seconds,
        "db_mib": db_bytes / 2**20,
        "ready_seconds": sidecar_big.ready_seconds,
        "rss_loaded_mib": rss_loaded / 1024,
        "rss_end_mib": rss_end / 1024,
        "hwm_mib": hwm / 1024,
        "hwm_1k_mib": small_hwm / 1024,
        "warm_seconds": warm_big,
        "rps_1k": med("1k"),
        "rps_100k": med("100k"),
        "ratio": med("100k") / med("1k") if med("1k") else 0.0,
        "runs": runs,
    }


def main() -> None:
    """Command-line entry point: run the scale benchmark alone and print its numbers as JSON."""
    parser = argparse.ArgumentParser(description="mcp-authz at 100k principals, keys and overrides")
    parser.add_argument("--principals", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    out = run(REPO_ROOT / "benchmarks" / ".work" / "scale", principals=args.principals, rounds=args.rounds,
              seconds=args.seconds, log=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
