"""The README's Administration examples, run as written against a real Envoy, sidecar and MCP
server, so they cannot rot: every fenced block after a `<!-- tested -->` line, in order, as one
bash script (`set -euo pipefail`), with the README's addresses replaced by the test's ports and
the keys it names ($ALICE_KEY, $ADMIN_KEY) in the environment."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz_server.admin.service import Actor

from .harness import REPO_ROOT, EnvoyProcess, ExampleServer, run_envoy, run_example_server
from .sidecar import Sidecar, World, add_key, admin_service, run_sidecar, seed

pytestmark = pytest.mark.e2e
README = REPO_ROOT / "README.md"
MARKER = "<!-- tested -->"
ALICE_TOKEN = "ghp_alice_new_personal_token_0001"  # what the README's alice sets; the upstream accepts only it
CREDENTIALS = (ALICE_TOKEN, "ghp_alice_rotated_token_0002", "bobs-token-from-last-year-0003", "carols-token-0004")


def readme_blocks(text: str) -> list[str]:
    """The fenced code blocks that directly follow a `<!-- tested -->` line."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == MARKER:
            assert lines[i + 1].startswith("```"), f"README line {i + 2}: a fenced block must follow {MARKER}"
            end = lines.index("```", i + 2)
            blocks.append("\n".join(lines[i + 2 : end]))
            i = end
        i += 1
    return blocks


@dataclass
class Stack:
    world: World
    sidecar: Sidecar
    upstream: ExampleServer
    envoy: EnvoyProcess
    admin_key: str


async def _add_admin(world: World) -> str:
    async with admin_service(world) as svc:
        await svc.add_principal(Actor.operator(), "ada", "ops", ["admin"])
        return await add_key(svc, world, "ada", label="readme")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("readme")
    with ExitStack() as stop:
        upstream = stop.enter_context(run_example_server(tmp, expect_tokens={"authorization": f"Bearer {ALICE_TOKEN}"}))
        world = asyncio.run(seed(tmp / "world"))
        admin_key = asyncio.run(_add_admin(world))
        sidecar = stop.enter_context(run_sidecar(world))
        envoy = stop.enter_context(run_envoy(tmp, authz_port=sidecar.port, authz_admin_port=sidecar.admin_port,
                                             upstream_port=upstream.port, servers=("github", "linear", "open")))  # fmt: skip
        yield Stack(world, sidecar, upstream, envoy, admin_key)


def test_the_readme_has_tested_administration_examples() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    text = "\n".join(blocks)
    for needed in ("mcp-authz --server 127.0.0.1:9002", "overrides set --server-name github", "overrides status",
                   "overrides test", "keys create", "audit --export", "curl", "/admin/v1/"):
        assert needed in text, needed


def test_the_readme_administration_examples_run(stack: Stack, tmp_path: Path) -> None:
    script = "\n".join(
        f"echo '### README example {i}'\n{block}" for i, block in enumerate(readme_blocks(README.read_text()), 1)
    )
    for shown, real in (
        ("http://127.0.0.1:10000", stack.envoy.base_url),
        ("http://127.0.0.1:9100", stack.upstream.base_url),
        ("127.0.0.1:9002", stack.sidecar.admin_target),
    ):
        script = script.replace(shown, real)
    env = {**stack.world.env, "ALICE_KEY": stack.world.keys["alice"], "ADMIN_KEY": stack.admin_key}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=120,
    )
    output = done.stdout + done.stderr
    (tmp_path / "output.txt").write_text(output)
    assert done.returncode == 0, output[-4000:]

    # What the examples say happens, happens.
    assert "alice (p_" in output and "roles user" in output  # whoami
    assert "Set the override of alice for github: API_KEY=…0001" in output
    assert "the upstream accepted it" in output  # alice's test
    assert "refused: a user manages only her own keys and credentials" in output
    assert re.search(r"github\s+bob\s+user\s+eng\s+🔴 invalid", output)  # bob's stale token, per the table
    assert re.search(r"github\s+carol\s+user\s+ops\s+🟢 configured", output)
    assert re.search(r"github\s+dave\s+user\s+eng\s+🟡 missing", output)
    assert re.search(r"^403$", output, re.M)  # a user reading the audit trail
    assert '"action":"overrides.set"' in output  # the audit export through Envoy, JSON lines
    exported = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert exported and all(line.startswith("{") for line in exported)
    # No credential and no pre-existing key is ever shown; new keys are, once, by `keys create`.
    for secret in (*CREDENTIALS, stack.world.keys["alice"], stack.admin_key):
        assert secret not in output, secret[:8]
        assert secret not in "\n".join(exported), secret[:8]
