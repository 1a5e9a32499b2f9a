"""`make bench`: every configuration of issue 5, interleaved, on this machine; RESULTS.md out.

    python -m benchmarks.run [--quick] [--no-scale] [--out benchmarks/RESULTS.md]
    python -m benchmarks.run --only C,C0-loop [--rate 2500] [--base DIR] [--profile DIR] [--d]

(`make bench` runs it after installing wrk, h2load and the pinned Python packages;
`BENCH_QUICK=1 make bench` is the ~3-minute version.)

Phases, in order, each bounded in time and request count, all load to 127.0.0.1:

1. seed: a SQLite store with 1,000 principals, each with a key and an override on the
   `individual` server `bench` (benchmarks/seed.py), plus fresh keys for C-cold;
2. start every configuration once (Envoy with one worker per configuration, the sidecars),
   check each answers a valid and an invalid key as it should, warm every real sidecar;
3. max throughput: wrk, 32 connections, keys rotating over the 1,000 principals, the
   configurations interleaved (A B C0 ... C ..., then again) for several rounds;
4. latency at 25/50/75% of C's median max, with h2load's fixed request rate, interleaved;
5. C-cold: 32 never-used keys at once (Argon2 path), per round;
6. C-flood: valid traffic alone, then with a garbage flood at full speed and at a capped rate;
7. a py-spy profile of the sidecar under C's load (benchmarks/profiles/);
8. D: MCP tools/call from concurrent clients, direct and through Envoy + mcp-authz, interleaved;
9. scale (benchmarks/scale.py): 100k principals, keys and overrides.

Every process is stopped at the end, on failure too, and stray Envoys are looked for.
Raw numbers go to benchmarks/.work/results.json, the report to stdout and RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import envoy_config, load, profile, report
from benchmarks.procs import LOOPBACK, REPO_ROOT, BenchError, ProcessGroup, free_port, stray_envoys
from benchmarks.rawhttp import Connection
from benchmarks.seed import World, garbage_keys, seed_sync, write_keys_file
from benchmarks.stack import (
    Envoy,
    Sidecar,
    child_env,
    sanity,
    start_envoy,
    start_example_server,
    start_noop,
    start_sidecar,
    warm_direct,
)

WORK = REPO_ROOT / "benchmarks" / ".work"
PATH = "/mcp/bench"
# The sidecar's own Check timer (observability/metrics.py): wall time inside the servicer.
SERVICER_SUM = "mcp_authz_check_duration_seconds_sum"
SERVICER_COUNT = "mcp_authz_check_duration_seconds_count"


@dataclass(frozen=True)
class Plan:
    """How much of everything: `full()` keeps `make bench` near 12 minutes, `quick()` near 3."""

    mode: str
    rounds: int  # max-throughput rounds (every configuration once per round)
    max_seconds: float
    latency_rounds: int
    latency_seconds: float
    cold_rounds: int
    flood_rounds: int
    flood_seconds: float
    d_rounds: int
    d_seconds: float
    profile_seconds: float
    scale_rounds: int
    scale_seconds: float
    connections: int = 32  # wrk connections for max throughput
    d_clients: int = 8  # concurrent MCP sessions in D
    cold_keys: int = 32  # C-cold: new keys at once
    principals: int = 1000
    scale_principals: int = 100_000

    @classmethod
    def full(cls) -> Plan:
        return cls("full", rounds=3, max_seconds=5, latency_rounds=3, latency_seconds=5, cold_rounds=3,
                   flood_rounds=3, flood_seconds=5, d_rounds=3, d_seconds=6, profile_seconds=10,
                   scale_rounds=3, scale_seconds=5)  # fmt: skip

    @classmethod
    def quick(cls) -> Plan:
        return cls("quick", rounds=2, max_seconds=3, latency_rounds=1, latency_seconds=3, cold_rounds=1,
                   flood_rounds=1, flood_seconds=3, d_rounds=1, d_seconds=3, profile_seconds=4,
                   scale_rounds=1, scale_seconds=3)  # fmt: skip


@dataclass
class Config:
    """One benchmark configuration: an Envoy and the sidecar processes behind it (if any)."""

    name: str
    what: str
    envoy: Envoy
    sidecars: list[Sidecar] = field(default_factory=list)
    latency: bool = False  # also measured at fixed rates

    def sidecar_cpu(self) -> tuple[float, float]:
        user = sys_ = 0.0
        for s in self.sidecars:
            u, k = s.proc.cpu_times()
            user, sys_ = user + u, sys_ + k
        return user, sys_


def _checks(stats: dict[str, int]) -> int:
    """Check calls Envoy made: ext_authz ok + denied + error, summed over listeners."""
    return sum(v for k, v in stats.items() if k.endswith((".ext_authz.ok", ".ext_authz.denied", ".ext_authz.error")))


def _stat_sum(stats: dict[str, int], suffix: str) -> int:
    return sum(v for k, v in stats.items() if k.endswith(suffix))


@dataclass
class Measured:
    """CPU and Envoy counters around one load run."""

    seconds: float = 0.0
    sidecar_user: float = 0.0
    sidecar_sys: float = 0.0
    envoy_cpu: float = 0.0
    checks: int = 0
    stats_delta: dict[str, int] = field(default_factory=dict)


def measure(config: Config, run: Callable[[], Any]) -> tuple[Any, Measured]:
    """Run `run()` (a load) and return its result with the sidecar's and Envoy's CPU deltas."""
    before = config.envoy.stats()
    su0, ss0 = config.sidecar_cpu()
    e0 = config.envoy.proc.cpu_seconds()
    t0 = time.monotonic()
    result = run()
    elapsed = time.monotonic() - t0
    su1, ss1 = config.sidecar_cpu()
    e1 = config.envoy.proc.cpu_seconds()
    after = config.envoy.stats()
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    return result, Measured(elapsed, su1 - su0, ss1 - ss0, e1 - e0, _checks(after) - _checks(before), delta)


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the last one run: the MCP driver)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _per(total_seconds: float, count: int) -> float | None:
    return 1e6 * total_seconds / count if count else None


# --------------------------------------------------------------------------------- set-up


NOOP_THREADS = 16  # the no-op's thread pool, as mcp-authz's default MCP_AUTHZ_GRPC_THREADS


def start_configs(group: ProcessGroup, world: World, work: Path, only: set[str] | None = None,
                  base: Path | None = None) -> dict[str, Config]:  # fmt: skip
    """Start every configuration of the max-throughput phase (see report.DESCRIPTIONS), or those in `only`.
    `base`: another checkout, run as C-base (only when asked for by name)."""
    configs: dict[str, Config] = {}

    def want(*names: str) -> bool:
        return only is None or any(n in only for n in names)

    def envoy(name: str, wait_healthy: bool, **kwargs: Any) -> Envoy:
        lp, ap = free_port(), free_port()
        return start_envoy(group, name, envoy_config.derive(listen_port=lp, admin_port=ap, server=world.server,
                                                            **kwargs), lp, ap, work, wait_healthy)  # fmt: skip

    if want("A"):
        configs["A"] = Config("A", "", envoy("A", False, auth="none"), latency=True)
    if want("B"):
        credentials = [(k, f"user{i:06d}") for i, k in enumerate(world.keys)]
        configs["B"] = Config("B", "", envoy("B", False, auth="api_key", api_keys=credentials), latency=True)
    for mode in ("sync", "aio", "uvloop", "loop"):
        name = "C0" if mode == "sync" else f"C0-{mode}"
        if want(name):
            noop = start_noop(group, f"noop-{mode}", mode, threads=NOOP_THREADS)
            configs[name] = Config(name, "", envoy(name, True, auth="ext_authz", authz_ports=[noop.port], als=False),
                                   [noop], latency=mode in ("sync", "loop"))  # fmt: skip
    if want("C0-x2"):
        pair = [start_noop(group, f"noop-sync-{i}", "sync", threads=NOOP_THREADS) for i in (1, 2)]
        configs["C0-x2"] = Config("C0-x2", "", envoy("C0-x2", True, auth="ext_authz",
                                                      authz_ports=[p.port for p in pair], als=False), pair)  # fmt: skip
    if want("C", "C-noals"):
        main = start_sidecar(group, "sidecar-C", world)
        warm_direct(main, world.keys, world.server)
        if want("C"):
            configs["C"] = Config("C", "", envoy("C", True, auth="ext_authz", authz_ports=[main.port]), [main],
                                  latency=True)  # fmt: skip
        if want("C-noals"):
            configs["C-noals"] = Config("C-noals", "", envoy("C-noals", True, auth="ext_authz",
                                                              authz_ports=[main.port], als=False), [main])  # fmt: skip
    if base is not None and want("C-base"):
        other = start_sidecar(group, "sidecar-C-base", world, code=base)
        warm_direct(other, world.keys, world.server)
        configs["C-base"] = Config("C-base", "", envoy("C-base", True, auth="ext_authz", authz_ports=[other.port]),
                                   [other], latency=True)  # fmt: skip
    if want("C-uvloop"):
        uv = start_sidecar(group, "sidecar-C-uvloop", world, uvloop=True)
        warm_direct(uv, world.keys, world.server)
        configs["C-uvloop"] = Config("C-uvloop", "", envoy("C-uvloop", True, auth="ext_authz", authz_ports=[uv.port]),
                                     [uv])  # fmt: skip
    if want("C-x2"):
        twins = [start_sidecar(group, f"sidecar-C-x2-{i}", world) for i in (1, 2)]
        for sidecar in twins:
            warm_direct(sidecar, world.keys, world.server)
        configs["C-x2"] = Config("C-x2", "", envoy("C-x2", True, auth="ext_authz",
                                                    authz_ports=[t.port for t in twins]), twins)  # fmt: skip
    for config in configs.values():
        config.what = report.DESCRIPTIONS[config.name]
    return configs


def check_configs(configs: dict[str, Config], world: World) -> dict[str, Any]:
    """Every configuration must answer 200 to a valid key; B and C must refuse a bad one (401)."""
    bad = garbage_keys(world.keys, 2)[0]
    out: dict[str, Any] = {}
    for name, config in configs.items():
        result = sanity(config.envoy, PATH, world.keys[0], bad)
        out[name] = {"valid": result.valid, "invalid": result.invalid}
        expect_invalid = 200 if name == "A" or name.startswith("C0") else 401
        if result.valid != 200 or result.invalid != expect_invalid:
            raise BenchError(f"sanity check failed for {name}: valid key -> {result.valid}, "
                             f"invalid key -> {result.invalid} (expected 200 and {expect_invalid})")  # fmt: skip
    return out


# --------------------------------------------------------------------------------- phases


def phase_max(configs: dict[str, Config], keys_file: Path, plan: Plan, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """wrk at full speed, every configuration once per round, in a fixed order."""
    rows: list[dict[str, Any]] = []
    for config in configs.values():  # a short unmeasured pass: connections, pools, caches
        load.wrk(config.envoy.base_url, keys_file, path=PATH, duration=1, connections=plan.connections)
    for rnd in range(plan.rounds):
        for name, config in configs.items():
            before = [s.metrics() for s in config.sidecars]
            result, m = measure(config, lambda c=config: load.wrk(
                c.envoy.base_url, keys_file, path=PATH, duration=plan.max_seconds, connections=plan.connections))
            after = [s.metrics() for s in config.sidecars]
            in_check = sum(a.get(SERVICER_SUM, 0) - b.get(SERVICER_SUM, 0) for a, b in zip(after, before, strict=True))
            counted = sum(a.get(SERVICER_COUNT, 0) - b.get(SERVICER_COUNT, 0) for a, b in zip(after, before, strict=True))
            row = {
                "config": name, "round": rnd, "rps": result.rps, "requests": result.requests,
                "non2xx": result.non2xx, "socket_errors": result.socket_errors,
                "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "checks": m.checks,
                "sidecar_cpu_us": _per(m.sidecar_user + m.sidecar_sys, m.checks) if config.sidecars else None,
                "sidecar_user_us": _per(m.sidecar_user, m.checks) if config.sidecars else None,
                "sidecar_sys_us": _per(m.sidecar_sys, m.checks) if config.sidecars else None,
                "envoy_cpu_us": _per(m.envoy_cpu, result.requests),
                "servicer_us": 1e6 * in_check / counted if counted else None,
            }  # fmt: skip
            rows.append(row)
            log(f"  max   round {rnd + 1}/{plan.rounds} {name:9s} {result.rps:9.0f} req/s"
                f"  non-2xx {result.non2xx}  sidecar {row['sidecar_cpu_us'] or 0:6.0f} us/check")
    return rows


def median_rps(rows: list[dict[str, Any]], config: str) -> float:
    return statistics.median(r["rps"] for r in rows if r["config"] == config)


def phase_latency(configs: dict[str, Config], world: World, c_max: float, plan: Plan, work: Path,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """h2load at 25/50/75% of C's max, each latency configuration per rate per round."""
    rows: list[dict[str, Any]] = []
    chosen = [c for c in configs.values() if c.latency]
    for rnd in range(plan.latency_rounds):
        for fraction in (0.25, 0.5, 0.75):
            rate = fraction * c_max
            for config in chosen:
                result, m = measure(config, lambda c=config, r=rate: load.h2load_fixed(
                    c.envoy.base_url + PATH, key=world.keys[1], rate=r, duration=plan.latency_seconds,
                    work_dir=work))  # fmt: skip
                rows.append({
                    "config": config.name, "round": rnd, "fraction": fraction, "target_rps": result.target_rps,
                    "achieved_rps": result.achieved_rps, "requests": result.requests, "non2xx": result.non2xx,
                    "h2load_processes": result.clients,
                    "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                    "sidecar_cpu_us": _per(m.sidecar_user + m.sidecar_sys, m.checks) if config.sidecars else None,
                })  # fmt: skip
                log(f"  fixed round {rnd + 1}/{plan.latency_rounds} {int(fraction * 100)}% {config.name:4s}"
                    f" {result.achieved_rps:7.0f}/{result.target_rps:.0f} req/s p50 {result.p50_ms:.2f} ms"
                    f" p99 {result.p99_ms:.2f} ms")
    return rows


async def _cold_burst(port: int, keys: list[str]) -> list[tuple[int, float]]:
    conns = [await Connection(LOOPBACK, port).open() for _ in keys]

    async def one(conn: Connection, key: str) -> tuple[int, float]:
        started = time.perf_counter()
        response = await conn.request("GET", PATH, {"authorization": f"Bearer {key}"})
        return response.status, 1000 * (time.perf_counter() - started)

    try:
        return list(await asyncio.gather(*(one(c, k) for c, k in zip(conns, keys, strict=True))))
    finally:
        for conn in conns:
            await conn.close()


def phase_cold(config: Config, world: World, plan: Plan, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """32 never-used keys at once through Envoy + the real sidecar; per-key latency and errors."""
    rows: list[dict[str, Any]] = []
    for rnd in range(plan.cold_rounds):
        keys = world.cold_keys[rnd * plan.cold_keys : (rnd + 1) * plan.cold_keys]
        before_metrics = config.sidecars[0].metrics()
        result, m = measure(config, lambda k=keys: asyncio.run(_cold_burst(config.envoy.listen_port, k)))
        after_metrics = config.sidecars[0].metrics()
        argon2 = after_metrics.get("mcp_authz_argon2_verifications_total", 0) - before_metrics.get(
            "mcp_authz_argon2_verifications_total", 0)
        rows.append({
            "round": rnd, "latencies_ms": [ms for _, ms in result], "statuses": [s for s, _ in result],
            "ext_authz_error": _stat_sum(m.stats_delta, ".ext_authz.error"),
            "ext_authz_denied": _stat_sum(m.stats_delta, ".ext_authz.denied"),
            "rq_timeout": _stat_sum(m.stats_delta, "cluster.mcp_authz.upstream_rq_timeout"),
            "argon2_runs": argon2,
        })  # fmt: skip
        ordered = sorted(ms for _, ms in result)
        log(f"  cold  round {rnd + 1}/{plan.cold_rounds}: p50 {ordered[len(ordered) // 2]:.0f} ms, "
            f"max {ordered[-1]:.0f} ms, statuses {sorted(set(s for s, _ in result))}, argon2 runs {argon2:.0f}")
    return rows


def phase_flood(config: Config, keys_file: Path, garbage_file: Path, c_max: float, plan: Plan,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Valid traffic alone; with garbage at full speed; with garbage capped near 25% of C's max."""
    rows: list[dict[str, Any]] = []
    garbage_conns = 8
    # wrk's delay() paces each connection: rate ~= connections * 1000 / (delay + latency).
    capped_delay_ms = max(1.0, garbage_conns * 1000 / (0.25 * c_max))
    for rnd in range(plan.flood_rounds):
        for label, delay in (("alone", None), ("full", 0.0), ("capped", capped_delay_ms)):
            def run(d: float | None = delay) -> tuple[load.WrkResult, load.WrkResult | None]:
                if d is None:
                    return load.wrk(config.envoy.base_url, keys_file, path=PATH, duration=plan.flood_seconds,
                                    connections=plan.connections), None  # fmt: skip
                with BackgroundWrk(config.envoy.base_url, garbage_file, plan.flood_seconds + 2,
                                     garbage_conns if d else plan.connections, d) as garbage:
                    time.sleep(0.5)
                    valid = load.wrk(config.envoy.base_url, keys_file, path=PATH, duration=plan.flood_seconds,
                                     connections=plan.connections)  # fmt: skip
                return valid, garbage.result()

            (valid, garbage), m = measure(config, run)
            rows.append({
                "round": rnd, "flood": label, "valid_rps": valid.rps, "valid_non2xx": valid.non2xx,
                "valid_socket_errors": valid.socket_errors, "valid_p99_ms": valid.p99_ms,
                "garbage_rps": garbage.rps if garbage else 0.0, "garbage_requests": garbage.requests if garbage else 0,
                "garbage_non2xx": garbage.non2xx if garbage else 0,
                "ext_authz_denied": _stat_sum(m.stats_delta, ".ext_authz.denied"),
                "ext_authz_error": _stat_sum(m.stats_delta, ".ext_authz.error"),
            })  # fmt: skip
            log(f"  flood round {rnd + 1}/{plan.flood_rounds} {label:6s}: valid {valid.rps:6.0f} req/s "
                f"(non-2xx {valid.non2xx}), garbage {garbage.rps if garbage else 0:6.0f} req/s")
    return rows


class BackgroundWrk:
    """wrk in the background (garbage keys), always reaped; `result()` after the block."""

    def __init__(self, url: str, keys_file: Path, duration: float, connections: int, delay_ms: float) -> None:
        env = dict(os.environ)
        if delay_ms:
            env["WRK_DELAY_MS"] = str(int(delay_ms))
        argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s", "--timeout", "5s",
                "-s", str(load.LUA_KEYS), url, "--", str(keys_file), PATH]  # fmt: skip
        self.duration = duration
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out = ""

    def __enter__(self) -> BackgroundWrk:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.out, _ = self.proc.communicate(timeout=self.duration + 30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def result(self) -> load.WrkResult:
        for line in self.out.splitlines():
            if line.startswith("WRK_JSON "):
                d = json.loads(line[len("WRK_JSON ") :])
                return load.WrkResult(d["requests"], d["duration_us"] / 1e6, d["non2xx"],
                                      d["connect"] + d["read"] + d["write"] + d["timeout"],
                                      d["p50_us"] / 1000, d["p99_us"] / 1000)  # fmt: skip
        raise BenchError(f"background wrk printed no result: {self.out[-500:]}")


def phase_profile(config: Config, keys_file: Path, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """py-spy on the real sidecar while wrk loads configuration C: Python frames, then with native
    frames too (which show what the gRPC Cython layer and C-core do while holding the GIL)."""
    out_dir = REPO_ROOT / "benchmarks" / "profiles"
    sidecar = config.sidecars[0]
    duration = 2 * plan.profile_seconds + 4
    with BackgroundWrk(config.envoy.base_url, keys_file, duration, plan.connections, 0) as bg:
        time.sleep(1)
        summary = profile.record(sidecar.proc.pid, plan.profile_seconds, out_dir, "c-hotpath")
        native = profile.record(sidecar.proc.pid, plan.profile_seconds, out_dir, "c-hotpath-native", rate=100,
                                native=True)  # fmt: skip
    bg.result()
    summary["native"] = native
    log(f"  profile: {summary['samples']} + {native['samples']} samples -> benchmarks/profiles/")
    return summary


def phase_d(group: ProcessGroup, world: World, sidecar: Sidecar, plan: Plan, work: Path,
            log: Callable[[str], None]) -> dict[str, Any]:
    """MCP tools/call from `d_clients` sessions: directly, then through Envoy + mcp-authz, interleaved."""
    example = start_example_server(group)
    lp, ap = free_port(), free_port()
    config = envoy_config.derive(auth="ext_authz", listen_port=lp, admin_port=ap, server=world.server,
                                 authz_ports=[sidecar.port], upstream_port=example.port)  # fmt: skip
    envoy = start_envoy(group, "D", config, lp, ap, work, wait_healthy=True)
    gateway_url = f"{envoy.base_url}/mcp/{world.server}"
    direct_url = example.url(world.server)
    injected = asyncio.run(_echo_headers(gateway_url, world.keys[0]))
    if injected.get("authorization") != f"Bearer {world.tokens[0]}" or "mgw_" in json.dumps(injected):
        raise BenchError("D: the gateway did not inject the user's override, or leaked the gateway key")
    if injected.get("x-user-id") != "user000000":
        raise BenchError(f"D: unexpected identity {injected.get('x-user-id')!r}")
    if os.environ.get("BENCH_DEBUG_D"):
        log("upstream request headers via the gateway: " + ", ".join(sorted(injected)))
    n = plan.d_clients
    tokens = write_keys_file(work / "d-tokens.txt", world.tokens[:n])
    gateway_keys = write_keys_file(work / "d-keys.txt", world.keys[:n])
    d_config = Config("D", "", envoy, [sidecar])
    rows: list[dict[str, Any]] = []
    for rnd in range(plan.d_rounds):
        # n concurrent sessions (throughput), then one session alone (latency without queueing).
        for clients in (n, 1):
            for mode, url, auth in (("direct", direct_url, tokens), ("gateway", gateway_url, gateway_keys)):
                example.reset_stats()
                argv = [sys.executable, "-m", "benchmarks.mcp_driver", "--url", url, "--auth-file", str(auth),
                        "--clients", str(clients), "--duration", f"{plan.d_seconds:g}", "--warmup", "1"]  # fmt: skip

                def run(a: list[str] = argv) -> dict[str, Any]:
                    up0, kids0 = example.proc.cpu_seconds(), _children_cpu()
                    done = subprocess.run(a, capture_output=True, text=True, timeout=plan.d_seconds + 60,
                                          env=child_env(), check=False)  # fmt: skip
                    if done.returncode != 0:
                        raise BenchError(f"mcp_driver failed: {done.stderr[-1500:]}")
                    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
                    calls = data["calls_per_s"] * plan.d_seconds  # the timed part; the warm-up is extra
                    data["upstream_cpu_us"] = _per(example.proc.cpu_seconds() - up0, int(calls))
                    data["driver_cpu_us"] = _per(_children_cpu() - kids0, int(calls))
                    return data

                data, m = measure(d_config, run)
                data.update(mode=mode, round=rnd, clients=clients,
                            sidecar_cpu_us=_per(m.sidecar_user + m.sidecar_sys, m.checks) if mode == "gateway" else None,
                            envoy_cpu_us=_per(m.envoy_cpu, m.checks) if mode == "gateway" else None)
                rows.append(data)
                if os.environ.get("BENCH_DEBUG_D"):
                    log(str({k: v for k, v in m.stats_delta.items() if "cx_" in k or "rq_total" in k}))
                log(f"  D     round {rnd + 1}/{plan.d_rounds} {clients} client(s) {mode:7s}: {data['calls_per_s']:6.0f} "
                    f"calls/s p50 {data['p50_ms']:.2f} ms p99 {data['p99_ms']:.2f} ms errors {data['errors']}")
    return {"clients": n, "driver": "raw JSON-RPC over HTTP/1.1 keep-alive (benchmarks/mcp_driver.py)",
            "injected_ok": True, "rows": rows}  # fmt: skip


async def _echo_headers(url: str, key: str) -> dict[str, Any]:
    """Call the example server's `echo_headers` tool through the gateway; the upstream's headers."""
    from benchmarks.mcp_driver import Client, _json_rpc

    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    client = Client(host, int(port), "/" + url.split("//", 1)[1].split("/", 1)[1], key)
    await client.start()
    response = await client._post({"jsonrpc": "2.0", "id": 99, "method": "tools/call",
                                   "params": {"name": "echo_headers", "arguments": {}}})  # fmt: skip
    await client.conn.close()
    result = _json_rpc(response)["result"]
    structured: dict[str, Any] = result.get("structuredContent") or json.loads(result["content"][0]["text"])
    return dict(structured.get("result", structured))


# --------------------------------------------------------------------------------- main


def machine_and_versions(plan: Plan) -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            return (done.stdout or done.stderr).strip()
        except OSError:
            return "?"

    import grpc
    import google.protobuf

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")  # fmt: skip
    envoy_version = out([str(Path(sys.executable).parent / "envoy"), "--version"]).split("version:")[-1].strip()
    commit = out(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "authz_server", "envoy"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "mode": plan.mode,
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": out(["uname", "-r"]),
        "envoy": envoy_version.split("/")[1] if "/" in envoy_version else envoy_version,
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "uvloop": uv,
        "wrk": out(["wrk", "-v"]).splitlines()[0] if out(["wrk", "-v"]) else "?",
        "h2load": out(["h2load", "--version"]),
        "commit": commit + (" (+ uncommitted changes in authz_server/ or envoy/)" if dirty else ""),
        "plan": asdict(plan),
    }


def compare(only: set[str], plan: Plan, profile_dir: Path | None = None, rate: float | None = None,
            with_d: bool = False, base: Path | None = None) -> int:
    """Max throughput of a few configurations, interleaved, with medians printed.
    With `base`, C-base (C on that checkout's code) runs beside them: an A/B test of a change."""
    if base is not None:
        only = only | {"C-base"}
    unknown = only - set(report.DESCRIPTIONS)
    if unknown:
        print(f"unknown configurations: {', '.join(sorted(unknown))}; known: {', '.join(report.DESCRIPTIONS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    work = WORK / "compare"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    group = ProcessGroup(work / "logs")
    try:
        world = seed_sync(work / "world", principals=plan.principals, cold=0)
        keys_file = write_keys_file(work / "keys.txt", world.keys)
        configs = start_configs(group, world, work, only, base)
        check_configs(configs, world)
        rows = phase_max(configs, keys_file, plan, log)
        fixed: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        for _ in range(plan.latency_rounds if rate else 0):
            for name, config in configs.items():
                result = load.h2load_fixed(config.envoy.base_url + PATH, key=world.keys[1], rate=rate,
                                           duration=plan.latency_seconds, work_dir=work)  # fmt: skip
                fixed[name].append((result.p50_ms, result.p99_ms))
                log(f"  {name} at {rate:.0f} req/s: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms")
        if profile_dir is not None and "C" in configs:
            with BackgroundWrk(configs["C"].envoy.base_url, keys_file, plan.profile_seconds + 3, plan.connections, 0):
                time.sleep(1)
                summary = profile.record(configs["C"].sidecars[0].proc.pid, plan.profile_seconds, profile_dir, "c")
            log(f"profile: {summary['samples']} samples -> {profile_dir}")
        d_rows = phase_d(group, world, configs["C"].sidecars[0], plan, work, log)["rows"] if with_d else []
    finally:
        group.stop_all()
    print(f"{'config':10s} {'req/s':>9s} {'sidecar us/check':>17s} {'user + sys':>11s} {'in Check() us':>14s} "
          f"{'envoy us/req':>13s}")  # fmt: skip
    for name in configs:
        mine = [r for r in rows if r["config"] == name]

        def med(key: str, rows: list[dict[str, Any]] = mine) -> float:
            values = [r[key] for r in rows if r[key] is not None]
            return statistics.median(values) if values else 0.0

        latency = ""
        if fixed[name]:
            latency = (f"  at {rate:.0f} req/s: p50 {statistics.median(p for p, _ in fixed[name]):.2f} ms, "
                       f"p99 {statistics.median(q for _, q in fixed[name]):.2f} ms")  # fmt: skip
        print(f"{name:10s} {med('rps'):9.0f} {med('sidecar_cpu_us'):17.0f} "
              f"{med('sidecar_user_us'):5.0f} + {med('sidecar_sys_us'):3.0f} {med('servicer_us'):14.0f} "
              f"{med('envoy_cpu_us'):13.0f}{latency}")  # fmt: skip
    for clients in sorted({r["clients"] for r in d_rows}, reverse=True):
        for mode in ("direct", "gateway"):
            mine = [r for r in d_rows if r["clients"] == clients and r["mode"] == mode]
            cols = ("calls_per_s", "p50_ms", "upstream_cpu_us", "driver_cpu_us", "sidecar_cpu_us", "envoy_cpu_us")
            values = [statistics.median(v) if (v := [r[c] for r in mine if r.get(c) is not None]) else 0.0 for c in cols]
            print(f"D {clients} {mode:8s} " + "  ".join(f"{c} {v:.2f}" for c, v in zip(cols, values, strict=True)))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (make interrupted, a time-out) unwinds like Ctrl-C, so every finally block runs."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark; print the report and write RESULTS.md. Returns the exit status."""
    parser = argparse.ArgumentParser(description="mcp-authz benchmarks (issue 5)")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"))
    parser.add_argument("--no-scale", action="store_true", help="skip benchmarks/scale.py")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated configurations (e.g. C,C0-sync): max throughput only, "
                             "printed, RESULTS.md untouched; for trying a change")  # fmt: skip
    parser.add_argument("--rate", type=float, metavar="REQ_PER_S",
                        help="with --only: also p50/p99 at this fixed rate (h2load), per configuration")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="with --only including C: also py-spy the sidecar under load, summaries to DIR")
    parser.add_argument("--d", action="store_true", help="with --only including C: also run D (real MCP traffic)")
    parser.add_argument("--base", type=Path, metavar="DIR",
                        help="with --only: also run C-base, C on the code of the checkout in DIR (e.g. a `git "
                             "worktree` of the previous commit), interleaved: an A/B test on a noisy machine")
    args = parser.parse_args(argv)
    if args.base is not None and not args.only:
        parser.error("--base needs --only")
    if args.base is not None and not (args.base / "authz_server" / "__main__.py").is_file():
        parser.error(f"--base {args.base}: not a checkout of mcp-authz (no authz_server/__main__.py)")
    if args.only and "C-base" in args.only.split(",") and args.base is None:
        parser.error("C-base needs --base DIR: a checkout of the code to compare against")
    if args.only:
        return compare(set(args.only.split(",")), Plan.quick() if args.quick else Plan.full(), args.profile, args.rate,
                       args.d, args.base.resolve() if args.base else None)  # fmt: skip
    plan = Plan.quick() if args.quick else Plan.full()
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    results: dict[str, Any] = {"meta": machine_and_versions(plan)}
    group = ProcessGroup(WORK / "logs")
    try:
        log(f"mode {plan.mode}: seeding {plan.principals} principals (+{plan.cold_keys * plan.cold_rounds} cold keys)")
        world = seed_sync(WORK / "world", principals=plan.principals, cold=plan.cold_keys * plan.cold_rounds)
        keys_file = write_keys_file(WORK / "keys.txt", world.keys)
        garbage_file = write_keys_file(WORK / "garbage.txt", garbage_keys(world.keys, 10_000))
        log("starting every configuration")
        configs = start_configs(group, world, WORK)
        results["sanity"] = check_configs(configs, world)
        results["ready_seconds"] = {s.proc.name: s.ready_seconds for c in configs.values() for s in c.sidecars
                                    if s.metrics_port}  # fmt: skip
        log("max throughput (wrk, interleaved)")
        results["max"] = phase_max(configs, keys_file, plan, log)
        c_max = median_rps(results["max"], "C")
        log(f"fixed-rate latency at 25/50/75% of C's max ({c_max:.0f} req/s)")
        results["latency"] = phase_latency(configs, world, c_max, plan, WORK, log)
        log("C-cold")
        results["cold"] = phase_cold(configs["C"], world, plan, log)
        log("C-flood")
        results["flood"] = phase_flood(configs["C"], keys_file, garbage_file, c_max, plan, log)
        log("profile")
        results["profile"] = phase_profile(configs["C"], keys_file, plan, log)
        log("D: MCP tools/call")
        results["d"] = phase_d(group, world, configs["C"].sidecars[0], plan, WORK, log)
        results["rss_kib"] = {
            c.name: sum(s.proc.status_kib("VmHWM") for s in c.sidecars) for c in configs.values() if c.sidecars
        }
    finally:
        group.stop_all()
    if not args.no_scale:
        from benchmarks import scale

        log(f"scale: {plan.scale_principals} principals, keys and overrides")
        results["scale"] = scale.run(WORK / "scale", principals=plan.scale_principals, rounds=plan.scale_rounds,
                                     seconds=plan.scale_seconds, connections=plan.connections, log=log)  # fmt: skip
    strays = stray_envoys(str(WORK))
    results["strays"] = strays
    results["elapsed_seconds"] = time.monotonic() - started
    (WORK / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    text = report.render(results)
    report.write(args.out, text)
    print(text)
    shown = args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out
    log(f"done in {results['elapsed_seconds']:.0f}s; wrote {shown}")
    if strays:
        print("stray Envoy processes:\n" + "\n".join(strays), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
