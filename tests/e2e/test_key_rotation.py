"""Issue 14, online master-key rotation: two sidecars keep serving every request while the key rotates.

Two real sidecars on one SQLite store behind one real Envoy, under a steady load of valid requests
that each need a decrypted upstream credential (alice's personal override on `github`, the shared
credential of `linear`). While it runs, the CLI adds a key version, both sidecars learn it from the
key file, every sealed value is re-encrypted, `status` shows nothing left under version 1, and
version 1 is retired. No request fails or is denied, the upstream only ever sees the right
credentials, and a credential written after the rotation is served by both sidecars.

And SIGHUP re-reads the key file without stopping the sidecar (the default action would kill it).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server.crypto.cipher import ENV_KEY_FILE, read_key_file, replace_key_file, write_key_file

from ..postgres import reachable_url
from ..store.conftest import drop_schema
from .harness import AUTHZ_CLUSTER, LOOPBACK
from .sidecar import GITHUB_ALICE, LINEAR_SHARED, Sidecar, run_sidecar, seed_world, serving
from .test_rolling_restart import Load, Rig, _windows

pytestmark = pytest.mark.e2e

RATE = 60.0  # requests per second on each of the two servers
NEW_TOKEN = "ghp_alice_after_rotation_0003"


def _headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json",
            "accept": "application/json, text/event-stream"}  # fmt: skip


def _reloads(sidecar: Sidecar) -> list[list[int]]:
    """The keyring versions of each 'master keyring reloaded' line in the sidecar's log."""
    found = []
    for line in sidecar.logs().splitlines():
        if '"master keyring reloaded"' in line:
            found.append(json.loads(line)["versions"])
    return found


async def _all_reloaded(rig: Rig, versions: list[int], timeout: float = 10.0) -> float:
    """Wait until every sidecar has logged a reload to exactly `versions`; the seconds it took."""
    start = time.monotonic()
    while not all(versions in _reloads(s) for s in rig.sidecars):
        assert time.monotonic() - start < timeout, [(_reloads(s)) for s in rig.sidecars]
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _key_versions(sidecar: Sidecar) -> dict[str, float]:
    """The sidecar's mcp_authz_master_key_version gauge, by role (active, oldest, newest)."""
    text = sidecar.http("/metrics").text
    return {role: float(v) for role, v in re.findall(r'^mcp_authz_master_key_version\{role="(\w+)"\} (\S+)$', text, re.M)}


async def _gauges_reach(rig: Rig, role: str, version: int, timeout: float = 10.0) -> None:
    start = time.monotonic()
    while (held := [await asyncio.to_thread(_key_versions, s) for s in rig.sidecars]) and not all(
        h[role] == version for h in held
    ):
        assert time.monotonic() - start < timeout, held
        await asyncio.sleep(0.05)


async def _cli(rig: Rig, *args: str, stdin: str | None = None) -> str:
    done = await asyncio.to_thread(rig.world.cli, *args, stdin=stdin)
    assert done.returncode == 0, f"mcp-authz {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def _injected(sidecar: Sidecar, key: str, server: str) -> str:
    """Ask one sidecar directly (gRPC Check) which Authorization it injects for `key` on `server`."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.id = "POST", f"/mcp/{server}", "rotation-check"
    http.headers["authorization"] = f"Bearer {key}"
    request.attributes.context_extensions["mcp_server"] = server
    with grpc.insecure_channel(f"{LOOPBACK}:{sidecar.port}") as channel:
        reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5)
    assert reply.status.code == 0, reply
    return next(h.header.value for h in reply.ok_response.headers if h.header.key.lower() == "authorization")


@dataclass
class Rotation:
    """The steady load on github (alice's override) and linear (the shared credential), and what must hold after."""

    rig: Rig
    loads: list[Load] = field(default_factory=list)
    running: list[asyncio.Task[None]] = field(default_factory=list)
    key_material: set[str] = field(default_factory=set)
    credentials: set[str] = field(default_factory=lambda: {GITHUB_ALICE, LINEAR_SHARED})  # what the upstream may see

    def remember_keys(self, path: Path) -> None:
        self.key_material.update(e.split(":", 1)[1] for e in read_key_file(path).split(","))

    def start(self) -> None:
        world = self.rig.world
        self.remember_keys(world.key_file)
        self.loads = [Load(self.rig.envoy.url("github"), _headers(world.keys["alice"]), RATE),
                      Load(self.rig.envoy.url("linear"), _headers(world.keys["bob"]), RATE)]  # fmt: skip
        self.running = [asyncio.create_task(load.run()) for load in self.loads]

    async def stop(self) -> None:
        for load in self.loads:
            load.stop()
        await asyncio.gather(*self.running)

    async def set_alice(self, token: str) -> None:
        """`overrides set` through the CLI, then wait until every sidecar injects it."""
        self.credentials.add(token)
        await _cli(self.rig, "overrides", "set", "--principal", "alice", "--server-name", "github", stdin=f"API_KEY={token}\n")
        for sidecar in self.rig.sidecars:
            deadline = time.monotonic() + 2
            while await asyncio.to_thread(_injected, sidecar, self.rig.world.keys["alice"], "github") != f"Bearer {token}":
                assert time.monotonic() < deadline, f"{sidecar.process.name} does not inject the new credential"
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(_injected, sidecar, self.rig.world.keys["bob"], "linear") == f"Bearer {LINEAR_SHARED}"

    async def rotate_and_check_status(self, overrides: int) -> None:
        """`rotate` moves github, linear and open (their signing secrets, and linear's shared value) and
        `overrides` overrides (alice's on github, unless it was set under version 2 already)."""
        rotated = json.loads(await _cli(self.rig, "--json", "master-key", "rotate", "--batch", "1"))
        assert (rotated["resealed_servers"], rotated["resealed_overrides"]) == (3, overrides), rotated
        assert rotated["unreadable"] == [] and rotated["rows_under_old_versions"] == 0, rotated
        status = json.loads(await _cli(self.rig, "--json", "master-key", "status"))
        assert status["rows_under_old_versions"] == 0 and status["active_version"] == 2, status
        assert [(v["version"], v["servers"], v["overrides"]) for v in status["versions"]] == [(2, 3, 1), (1, 0, 0)]
        await asyncio.sleep(1.0)  # the re-encrypted rows reach both sidecars through the change log, under load

    def check(self, what: str) -> None:
        """No request failed or was denied, the upstream saw only the right credentials, no output showed a key."""
        loads, stat = self.loads, self.rig.envoy.stat
        total = sum(len(load.outcomes) for load in loads)
        report = (f"{what}: {total} requests ({[len(load.outcomes) for load in loads]} github, linear); "
                  f"failures: {[_windows(load.failures()) for load in loads]}")  # fmt: skip
        assert all(load.failures() == [] for load in loads), report
        assert total > 600, report  # ~7 s at 2 x 60 per second
        assert stat("http.mcp_ingress.ext_authz.ok") == total, report
        for name in ("http.mcp_ingress.ext_authz.error", "http.mcp_ingress.ext_authz.denied",
                     "http.mcp_ingress.ext_authz.failure_mode_allowed", "http.mcp_ingress.downstream_rq_5xx",
                     f"cluster.{AUTHZ_CLUSTER}.upstream_rq_503"):  # fmt: skip
            assert not stat(name), f"{name} = {stat(name)}; {report}"
        # Every value decrypted whole, under either version: the upstream saw exactly the credentials set.
        seen = dict(self.rig.upstream.authorizations)
        assert set(seen) == {f"Bearer {v}".encode() for v in self.credentials}, seen
        assert sum(seen.values()) == total, report
        # Keyring reloads name versions, never keys; no output shows key material.
        for text in [(self.rig.world.dir / "cli-output.log").read_text(), *(s.logs() for s in self.rig.sidecars)]:
            assert not any(k in text for k in self.key_material)
        for sidecar in self.rig.sidecars:
            assert "unreadable" not in sidecar.logs(), sidecar.logs()[-3000:]
        print(report)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """None: Rig's SQLite store; else a fresh PostgreSQL schema, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    base, schema = reachable_url("the rotation test on PostgreSQL"), f"rotation_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{base}?schema={schema}"
    finally:
        await drop_schema(base, schema)


async def test_online_rotation_under_load_fails_no_request(
    tmp_path: Path, process_stack: ExitStack, store_url: str | None
) -> None:
    """Both sidecars read the key file the CLI changes (one host, or a shared volume); on SQLite, and on
    PostgreSQL, where the sidecars hear of each re-encrypted batch by NOTIFY."""
    rig = await Rig.start(tmp_path, process_stack, 2, servers=("github", "linear"), store_url=store_url)
    run = Rotation(rig)
    run.start()
    try:
        await asyncio.sleep(1.5)
        await _cli(rig, "master-key", "add")
        run.remember_keys(rig.world.key_file)
        await _all_reloaded(rig, [1, 2])
        assert [(await asyncio.to_thread(_key_versions, s)) for s in rig.sidecars] == [
            {"active": 2, "oldest": 1, "newest": 2}] * 2  # fmt: skip
        await asyncio.sleep(0.5)
        await run.rotate_and_check_status(overrides=1)
        await _cli(rig, "master-key", "retire", "--version", "1")
        await _all_reloaded(rig, [2])
        await _gauges_reach(rig, "oldest", 2)
        await asyncio.sleep(1.0)
        await run.set_alice(NEW_TOKEN)  # sealed under version 2 alone: served by both sidecars
        await asyncio.sleep(1.0)
    finally:
        await run.stop()
    run.check(f"one key file, {'PostgreSQL' if store_url else 'SQLite'}")


async def test_online_rotation_with_a_key_file_per_host_fails_no_request(tmp_path: Path, process_stack: ExitStack) -> None:
    """The second sidecar reads its own copy of the key file, which the operator publishes after each step
    (`add --standby`, `activate`, `retire`). A value sealed under the new version before that host has the
    activated file still opens there: it learned the version while it was on standby."""
    rig = await Rig.start(tmp_path, process_stack, 2, servers=("github", "linear"))
    main, copy = rig.world.key_file, rig.world.dir / "host2.key"
    write_key_file(copy, read_key_file(main))
    rig.sidecar_env = {ENV_KEY_FILE: str(copy)}
    await rig.restart(1, time.monotonic())  # sidecar 2 now reads the copy

    def publish() -> None:
        replace_key_file(copy, read_key_file(main))

    run = Rotation(rig)
    run.start()
    try:
        await asyncio.sleep(1.5)
        await _cli(rig, "master-key", "add", "--standby")
        run.remember_keys(main)
        publish()
        await _gauges_reach(rig, "newest", 2)
        assert [(await asyncio.to_thread(_key_versions, s))["active"] for s in rig.sidecars] == [1, 1]

        await _cli(rig, "master-key", "activate", "--version", "2")
        await run.set_alice("ghp_alice_sealed_under_2_before_host2_has_it")  # host 2 still has 2 on standby
        publish()
        await _gauges_reach(rig, "active", 2)

        await run.rotate_and_check_status(overrides=0)  # alice's was just set under version 2
        await _cli(rig, "master-key", "retire", "--version", "1")
        publish()
        await _gauges_reach(rig, "oldest", 2)
        await run.set_alice(NEW_TOKEN)
        await asyncio.sleep(1.0)
    finally:
        await run.stop()
    run.check("a key file per host")


def test_sighup_rereads_the_key_file_and_the_sidecar_keeps_running(tmp_path: Path) -> None:
    world = seed_world(tmp_path / "world")
    with run_sidecar(world) as sidecar:
        sidecar.process.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not any('"why": "SIGHUP"' in line for line in sidecar.logs().splitlines() if "master keyring reloaded" in line):
            assert time.monotonic() < deadline and sidecar.process.alive(), sidecar.logs()[-3000:]
            time.sleep(0.05)
        assert sidecar.process.alive() and serving(sidecar.port)
        assert _injected(sidecar, world.keys["alice"], "github") == f"Bearer {GITHUB_ALICE}"
