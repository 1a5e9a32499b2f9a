"""Issue 13, graceful drain: a sidecar stopped with SIGTERM fails no request and loses no record.

- Two real sidecars on one SQLite store behind one real Envoy (the shipped config, both in the
  mcp_authz cluster), under a steady load of valid requests; each is restarted in turn with
  SIGTERM. Every request answers 2xx, Envoy's own counters show no ext_authz error, and every
  allowed request has its usage row afterwards.
- One sidecar behind Envoy, restarted the same way: a restart it cannot hide, so requests fail
  closed (Envoy's JSON 503) for a bounded time, and still no allowed request loses its record.
- One sidecar on SIGTERM: NOT_SERVING at once (gRPC health and /readyz), Check still answered
  for the drain period, then exit within the drain and a second; a second signal cuts it short.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .harness import AUTHZ_CLUSTER, LOOPBACK, EnvoyProcess, LoopServer, _cluster, run_envoy
from .sidecar import Sidecar, World, run_sidecar, seed, seed_world

pytestmark = pytest.mark.e2e

SERVER = "open"  # no upstream credentials: the cheapest allowed request
RATE = 150.0  # requests per second, steady
CONNECTIONS = 32  # the load's connections to Envoy, and the most requests it has in flight
DRAIN = 2.0  # the default drain (Settings.drain_seconds)
BODY = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add", "arguments": {}}}'


# --------------------------------------------------------------------------- a cheap upstream


class Upstream(LoopServer):
    """An HTTP/1.1 keep-alive server on its own thread and loop: 200 with a small JSON body to anything.

    The example MCP server costs milliseconds per request on a shared 2-core machine; this costs
    microseconds, so the load measures the gateway, not the upstream.
    """

    name = "upstream"
    ANSWER = b'{"jsonrpc": "2.0", "id": 1, "result": {}}'
    REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.authorizations: Counter[bytes] = Counter()  # the Authorization header values received

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"authorization":
                        self.authorizations[value.strip()] += 1
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                writer.write(self.REPLY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# --------------------------------------------------------------------------- the load


@dataclass
class Load:
    """Valid requests at a fixed rate until stopped: when each was sent and what it got."""

    url: str
    headers: dict[str, str]
    rate: float = RATE
    # (seconds from the start until the answer came, what it was: "200", "503 authz_unavailable" (status
    # and the JSON-RPC error's reason, if any), or the client's error). The answer's time, not the send's:
    # on a busy machine a request may leave the client late, but Envoy cannot answer before it decides.
    outcomes: list[tuple[float, str]] = field(default_factory=list)
    origin: float = field(default_factory=time.monotonic)  # what the times above count from
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ok(self) -> int:
        return len(self.outcomes) - len(self.failures())

    def failures(self) -> list[tuple[float, str]]:
        return sorted((t, s) for t, s in self.outcomes if not s.startswith("2"))

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
        # At most CONNECTIONS requests in flight: a client that falls behind (a starved machine) sends
        # late rather than queueing in httpx's pool, whose scheduling grows with the square of its queue
        # until the test's own loop stalls and requests time out on the client's side.
        in_flight = asyncio.Semaphore(CONNECTIONS)
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:
            start = self.origin = time.monotonic()
            pending: set[asyncio.Task[None]] = set()
            sent = 0
            while not self._stop.is_set():
                due = start + sent / self.rate
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await in_flight.acquire()
                task = asyncio.create_task(self._one(client))
                pending.add(task)
                task.add_done_callback(pending.discard)
                task.add_done_callback(lambda _: in_flight.release())
                sent += 1
            if pending:
                await asyncio.wait(pending, timeout=15)

    async def _one(self, client: httpx.AsyncClient) -> None:
        try:
            response = await client.post(self.url, content=BODY, headers=self.headers)
        except httpx.HTTPError as exc:
            self.outcomes.append((time.monotonic() - self.origin, type(exc).__name__))
            return
        at = time.monotonic() - self.origin
        outcome = str(response.status_code)
        if response.status_code >= 300:
            try:
                outcome += f" {response.json()['error']['data']['reason']}"
            except (ValueError, KeyError, TypeError):
                outcome += f" {response.text[:80]!r}"
        self.outcomes.append((at, outcome))


# --------------------------------------------------------------------------- helpers


def _endpoints(ports: list[int]) -> Any:
    """An Envoy config mutation: the mcp_authz cluster lists every sidecar."""

    def mutate(config: dict[str, Any]) -> None:
        _cluster(config, AUTHZ_CLUSTER)["load_assignment"]["endpoints"] = [
            {"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": p}}}} for p in ports
            ]}
        ]  # fmt: skip

    return mutate


def _usage(world: World) -> tuple[int, int]:
    """Allowed usage rows for SERVER in the store, and how many distinct request ids they have."""
    path = world.store_url.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        rows, ids = db.execute(
            "SELECT count(*), count(DISTINCT request_id) FROM usage_records WHERE server = ? AND decision = 'allow'",
            (SERVER,),
        ).fetchone()
    return int(rows), int(ids)


async def _all_healthy(envoy: EnvoyProcess, count: int, timeout: float = 15.0) -> float:
    """Wait until Envoy's health checks pass on all `count` sidecars; the seconds it took."""
    start = time.monotonic()
    while True:
        flags = await asyncio.to_thread(envoy.health_flags)
        if flags == ["healthy"] * count:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"not all healthy after {timeout}s: {flags}"
        await asyncio.sleep(0.05)


def _windows(failures: list[tuple[float, str]]) -> list[str]:
    """Failures grouped into bursts (gaps under a second): "count x outcomes from t1 to t2 s"."""
    bursts: list[list[tuple[float, str]]] = []
    for failure in failures:
        if bursts and failure[0] - bursts[-1][-1][0] < 1.0:
            bursts[-1].append(failure)
        else:
            bursts.append([failure])
    return [f"{len(b)} x {sorted({s for _, s in b})} from {b[0][0]:.2f} to {b[-1][0]:.2f} s" for b in bursts]


def audit_matches_denials(audit: tuple[int, int], denied: int, envoy: EnvoyProcess) -> bool:
    """Every denial has its authentication-failure audit event (`audit`: rows, distinct request
    ids). A request may have more than one only where Envoy asked again (ext_authz's retry policy:
    each Check answered is audited), never more than Envoy's retry count allows."""
    rows, distinct = audit
    retried = envoy.stat(f"cluster.{AUTHZ_CLUSTER}.upstream_rq_retry") or 0
    return distinct == denied and denied <= rows <= denied + retried


@dataclass
class Restart:
    signalled: float  # seconds since the load started
    exited_after: float
    exit_code: int
    healthy_after: float  # from SIGTERM until Envoy's health checks pass on the new process
    drained: bool  # the old process logged its drain, and dropped no usage record
    logs: str = field(repr=False, default="")


@dataclass
class Rig:
    """Sidecars on one SQLite store, the cheap upstream, and Envoy routing Check to every sidecar."""

    world: World
    sidecars: list[Sidecar]
    envoy: EnvoyProcess
    upstream: Upstream
    stack: ExitStack
    sidecar_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def start(
        cls, tmp_path: Path, stack: ExitStack, count: int, *, store_url: str | None = None,
        sidecar_env: dict[str, str] | None = None, servers: Sequence[str] = (SERVER,),
    ) -> Rig:
        """`store_url`: seed there instead of SQLite; `sidecar_env`: the sidecars' own settings
        (e.g. their MCP_AUTHZ_STORE through a fault proxy); `servers`: the MCP servers Envoy routes."""
        world = await seed(tmp_path / "world", store_url)
        env = sidecar_env or {}
        sidecars = [await asyncio.to_thread(stack.enter_context, run_sidecar(world, name=f"sidecar{i + 1}", env=env))
                    for i in range(count)]  # fmt: skip
        ports = [s.port for s in sidecars]
        upstream = stack.enter_context(Upstream())
        envoy = await asyncio.to_thread(
            stack.enter_context,
            run_envoy(tmp_path, authz_port=ports[0], upstream_port=upstream.port, servers=list(servers),
                      mutate=_endpoints(ports)),
        )  # fmt: skip
        await _all_healthy(envoy, count)
        return cls(world, sidecars, envoy, upstream, stack, env)

    def load(self, key: str | None = None, rate: float = RATE) -> Load:
        """Requests with alice's key, or with `key`."""
        headers = {"authorization": f"Bearer {key or self.world.keys['alice']}", "content-type": "application/json",
                   "accept": "application/json, text/event-stream"}  # fmt: skip
        return Load(self.envoy.url(SERVER), headers, rate)

    async def restart(self, i: int, since: float) -> Restart:
        """SIGTERM sidecar `i`, wait for it to exit, start it again on its port, wait until Envoy sees it healthy."""
        old = self.sidecars[i]
        signalled = time.monotonic()
        old.process.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(old.process.proc.wait, DRAIN + 10)
        exited = time.monotonic() - signalled
        self.sidecars[i] = await asyncio.to_thread(
            self.stack.enter_context, run_sidecar(self.world, port=old.port, name=f"sidecar{i + 1}-restarted", env=self.sidecar_env)
        )
        await _all_healthy(self.envoy, len(self.sidecars))
        logs = old.logs()
        drained = '"msg": "draining"' in logs and '"usage_dropped": 0' in logs
        return Restart(signalled - since, exited, code, time.monotonic() - signalled, drained, logs)

    async def usage_settles_at(self, allowed: int) -> tuple[int, int]:
        """Allowed usage rows (all, distinct request ids) once they equal `allowed`, or after 10 s."""
        deadline = time.monotonic() + 10
        while (usage := _usage(self.world)) != (allowed, allowed) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return usage


async def test_rolling_restart_of_two_sidecars_fails_no_request_and_loses_no_record(
    tmp_path: Path, process_stack: ExitStack
) -> None:
    rig = await Rig.start(tmp_path, process_stack, 2)
    load = rig.load()
    running = asyncio.create_task(load.run())
    restarts: list[Restart] = []
    try:
        await asyncio.sleep(2)
        for i in range(2):
            restarts.append(await rig.restart(i, load.origin))
            await asyncio.sleep(1)
        await asyncio.sleep(1)
    finally:
        load.stop()
        await running

    stat = rig.envoy.stat
    report = (f"restarts: {restarts}; {len(load.outcomes)} requests, {load.ok} 2xx, "
              f"{stat(f'cluster.{AUTHZ_CLUSTER}.upstream_rq_retry')} Checks retried; "
              f"failures: {_windows(load.failures())}")  # fmt: skip
    assert len(load.outcomes) > 1000, report
    assert load.failures() == [], report
    for restart in restarts:
        assert restart.exit_code == 0 and restart.drained, restart.logs[-3000:]
        assert restart.exited_after < DRAIN + 1, report
    # Envoy's own counters agree: every Check answered and allowed, none failed or was denied.
    assert stat("http.mcp_ingress.ext_authz.ok") == len(load.outcomes), report
    for name in ("http.mcp_ingress.ext_authz.error", "http.mcp_ingress.ext_authz.denied",
                 "http.mcp_ingress.ext_authz.failure_mode_allowed", "http.mcp_ingress.downstream_rq_5xx",
                 f"cluster.{AUTHZ_CLUSTER}.upstream_rq_503", f"cluster.{AUTHZ_CLUSTER}.upstream_rq_retry_overflow"):  # fmt: skip
        assert not stat(name), f"{name} = {stat(name)}; {report}"
    assert rig.upstream.requests == len(load.outcomes), report

    # Nothing lost: every allowed request has its usage row (the stopped sidecars flushed theirs).
    usage = await rig.usage_settles_at(load.ok)
    assert usage == (load.ok, load.ok), f"usage rows (all, distinct) {usage} for {load.ok} allowed; {report}"
    assert stat("access_logs.grpc_access_log.logs_dropped") == 0, report
    print(report)


async def test_a_lone_sidecar_restarting_fails_closed_for_a_bounded_time_and_loses_no_record(
    tmp_path: Path, process_stack: ExitStack
) -> None:
    """What a single replica's restart costs (README, "Deploying"): it cannot be hidden. From when
    Envoy sees it draining until its successor answers SERVING, requests get Envoy's 503 with the
    JSON-RPC `authz_unavailable` body; never anything else, and no allowed request loses its record."""
    rig = await Rig.start(tmp_path, process_stack, 1)
    load = rig.load()
    running = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(2)
        restart = await rig.restart(0, load.origin)
        await asyncio.sleep(2)
    finally:
        load.stop()
        await running

    failures = load.failures()
    report = f"restart: {restart}; {len(load.outcomes)} requests, {load.ok} 2xx; failures: {_windows(failures)}"
    assert failures and {s for _, s in failures} == {"503 authz_unavailable"}, report
    first, last = failures[0][0], failures[-1][0]
    # One window, opening only once Envoy has seen NOT_SERVING (the drain's start is still served),
    # closing when the successor is healthy.
    assert len(_windows(failures)) == 1, report
    assert restart.signalled <= first and last <= restart.signalled + restart.healthy_after + 1, report
    # The drain (2 s), the stop (under a second), the successor's start and one health check: ~4 s here.
    assert restart.exit_code == 0 and restart.drained, restart.logs[-3000:]
    assert restart.healthy_after < DRAIN + 5, report
    usage = await rig.usage_settles_at(load.ok)
    assert usage == (load.ok, load.ok), f"usage rows (all, distinct) {usage} for {load.ok} allowed; {report}"
    print(report)


async def test_a_sidecar_killed_under_load_costs_no_request_while_another_is_healthy(
    tmp_path: Path, process_stack: ExitStack
) -> None:
    """No drain at all (SIGKILL): Envoy's retry policy on ext_authz (envoy.yaml) asks the other
    sidecar whatever the dead one never answered, until the health checks take it out."""
    rig = await Rig.start(tmp_path, process_stack, 2)
    load = rig.load()
    running = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(2)
        rig.sidecars[0].process.proc.kill()
        await asyncio.to_thread(rig.sidecars[0].process.proc.wait, 5)
        while (await asyncio.to_thread(rig.envoy.health_flags)).count("healthy") != 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
    finally:
        load.stop()
        await running
    stat = rig.envoy.stat
    retried = stat(f"cluster.{AUTHZ_CLUSTER}.upstream_rq_retry")
    report = f"{len(load.outcomes)} requests, {retried} Checks retried; failures: {_windows(load.failures())}"
    assert load.failures() == [], report
    assert retried and retried == stat(f"cluster.{AUTHZ_CLUSTER}.upstream_rq_retry_success"), report
    assert not stat("http.mcp_ingress.ext_authz.error") and not stat(f"cluster.{AUTHZ_CLUSTER}.upstream_rq_retry_overflow")
    print(report)


# --------------------------------------------------------------------------- one sidecar, no Envoy


def _check_request(key: str) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.id = "POST", f"/mcp/{SERVER}", "1"
    http.headers["authorization"] = f"Bearer {key}"
    request.attributes.context_extensions["mcp_server"] = SERVER
    return request


def _health(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    return int(reply.status)


def test_on_sigterm_a_sidecar_says_not_serving_at_once_answers_check_through_the_drain_then_exits(
    tmp_path: Path,
) -> None:
    world = seed_world(tmp_path / "world")
    with run_sidecar(world) as sidecar, grpc.insecure_channel(f"{LOOPBACK}:{sidecar.port}") as channel:
        check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
        request = _check_request(world.keys["alice"])
        assert check(request, timeout=5).status.code == 0  # allowed (and the key verified: no Argon2 later)
        assert sidecar.http("/readyz").status_code == 200

        signalled = time.monotonic()
        sidecar.process.proc.send_signal(signal.SIGTERM)
        while _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - signalled < 0.5, "still SERVING 0.5 s after SIGTERM"
            time.sleep(0.01)
        not_serving_after = time.monotonic() - signalled
        readyz = sidecar.http("/readyz")
        assert readyz.status_code == 503 and readyz.json()["reason"].startswith("draining"), readyz.text

        # Envoy may still route here until its next health check: every Check is answered, as before.
        answered = 0
        while time.monotonic() - signalled < DRAIN - 0.25:
            reply = check(request, timeout=1)
            assert reply.status.code == 0 and reply.HasField("ok_response"), reply
            answered += 1
            time.sleep(0.02)
        assert answered > 20

        # Then no new calls, and the process exits by itself within the drain and a second.
        code = sidecar.process.proc.wait(timeout=DRAIN + 5)
        exited_after = time.monotonic() - signalled
        assert code == 0, sidecar.logs()[-3000:]
        assert DRAIN <= exited_after < DRAIN + 1, f"exited {exited_after:.2f} s after SIGTERM"
        logs = sidecar.logs()
        assert '"msg": "draining", "seconds": 2.0' in logs and '"msg": "stopped"' in logs, logs[-3000:]
        print(f"NOT_SERVING {not_serving_after * 1000:.0f} ms after SIGTERM; {answered} Checks answered "
              f"while draining; exited after {exited_after:.2f} s")  # fmt: skip


def test_a_second_signal_cuts_the_drain_short(tmp_path: Path) -> None:
    world = seed_world(tmp_path / "world")
    with run_sidecar(world, extra=("--drain", "30")) as sidecar:
        with grpc.insecure_channel(f"{LOOPBACK}:{sidecar.port}") as channel:
            sidecar.process.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            assert check(_check_request(world.keys["bob"]), timeout=5).status.code == 0  # draining: still answered
        time.sleep(0.5)
        assert sidecar.process.alive()  # 30 s of drain ahead
        signalled = time.monotonic()
        sidecar.process.proc.send_signal(signal.SIGINT)
        code = sidecar.process.proc.wait(timeout=10)
        assert code == 0 and time.monotonic() - signalled < 1.5, sidecar.logs()[-3000:]
        assert "drain cut short" in sidecar.logs()
