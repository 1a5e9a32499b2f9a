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
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server.crypto.cipher import read_key_file

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


def _key_versions(sidecar: Sidecar) -> tuple[float, float]:
    """(active, oldest) from the sidecar's mcp_authz_master_key_version gauge."""
    text = sidecar.http("/metrics").text
    found = dict(re.findall(r'^mcp_authz_master_key_version\{role="(\w+)"\} (\S+)$', text, re.M))
    return float(found["active"]), float(found["oldest"])


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


async def test_online_rotation_under_load_fails_no_request(tmp_path: Path, process_stack: ExitStack) -> None:
    rig = await Rig.start(tmp_path, process_stack, 2, servers=("github", "linear"))
    world = rig.world
    key_material = set()

    def remember_keys() -> None:
        key_material.update(e.split(":", 1)[1] for e in read_key_file(world.key_file).split(","))

    remember_keys()
    loads = [Load(rig.envoy.url("github"), _headers(world.keys["alice"]), RATE),
             Load(rig.envoy.url("linear"), _headers(world.keys["bob"]), RATE)]  # fmt: skip
    running = [asyncio.create_task(load.run()) for load in loads]
    steps: dict[str, float] = {}
    try:
        await asyncio.sleep(1.5)
        await _cli(rig, "master-key", "add")
        remember_keys()
        steps["learned"] = await _all_reloaded(rig, [1, 2])
        assert [await asyncio.to_thread(_key_versions, s) for s in rig.sidecars] == [(2, 1)] * 2
        await asyncio.sleep(0.5)

        rotated = json.loads(await _cli(rig, "--json", "master-key", "rotate", "--batch", "1"))
        assert (rotated["resealed_servers"], rotated["resealed_overrides"]) == (3, 1), rotated  # github, linear, open (signing secrets); alice on github
        assert rotated["unreadable"] == [] and rotated["rows_under_old_versions"] == 0, rotated
        status = json.loads(await _cli(rig, "--json", "master-key", "status"))
        assert status["rows_under_old_versions"] == 0 and status["active_version"] == 2, status
        assert [(v["version"], v["servers"], v["overrides"]) for v in status["versions"]] == [(2, 3, 1), (1, 0, 0)]
        await asyncio.sleep(1.0)  # the re-encrypted rows reach both sidecars through the change log, under load

        await _cli(rig, "master-key", "retire", "--version", "1")
        steps["dropped"] = await _all_reloaded(rig, [2])
        assert [await asyncio.to_thread(_key_versions, s) for s in rig.sidecars] == [(2, 2)] * 2
        await asyncio.sleep(1.0)

        # Written after the rotation, sealed under version 2 alone: served by both sidecars.
        await _cli(rig, "overrides", "set", "--principal", "alice", "--server-name", "github", stdin=f"API_KEY={NEW_TOKEN}\n")
        for sidecar in rig.sidecars:
            deadline = time.monotonic() + 2
            while (got := await asyncio.to_thread(_injected, sidecar, world.keys["alice"], "github")) != f"Bearer {NEW_TOKEN}":
                assert time.monotonic() < deadline, f"{sidecar.process.name} still injects the old credential"
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(_injected, sidecar, world.keys["bob"], "linear") == f"Bearer {LINEAR_SHARED}"
        await asyncio.sleep(1.0)
    finally:
        for load in loads:
            load.stop()
        await asyncio.gather(*running)

    total = sum(len(load.outcomes) for load in loads)
    report = (f"{total} requests ({[len(load.outcomes) for load in loads]} github, linear); both sidecars had the new "
              f"version {steps.get('learned', -1):.2f} s after 'add' returned, dropped the old {steps.get('dropped', -1):.2f} s "
              f"after 'retire' returned; "
              f"failures: {[_windows(load.failures()) for load in loads]}")  # fmt: skip
    assert all(load.failures() == [] for load in loads), report
    assert total > 600, report  # ~7 s at 2 x 60 per second
    stat = rig.envoy.stat
    assert stat("http.mcp_ingress.ext_authz.ok") == total, report
    for name in ("http.mcp_ingress.ext_authz.error", "http.mcp_ingress.ext_authz.denied",
                 "http.mcp_ingress.ext_authz.failure_mode_allowed", "http.mcp_ingress.downstream_rq_5xx",
                 f"cluster.{AUTHZ_CLUSTER}.upstream_rq_503"):  # fmt: skip
        assert not stat(name), f"{name} = {stat(name)}; {report}"
    # The upstream only ever saw the right credentials: every value decrypted whole, under either version.
    seen = dict(rig.upstream.authorizations)
    assert set(seen) == {f"Bearer {v}".encode() for v in (GITHUB_ALICE, LINEAR_SHARED, NEW_TOKEN)}, seen
    assert sum(seen.values()) == total, report
    # Keyring reloads name versions, never keys; no output shows key material.
    outputs = [(world.dir / "cli-output.log").read_text(), *(s.logs() for s in rig.sidecars)]
    for text in outputs:
        assert not any(k in text for k in key_material)
    for sidecar in rig.sidecars:
        assert "unreadable" not in sidecar.logs(), sidecar.logs()[-3000:]
    print(report)


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
