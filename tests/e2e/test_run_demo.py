"""`make run` as a newcomer meets it: examples/run_demo.py (what `make run` runs) on free ports,
then exactly what it prints: the tool call, the walkthrough's commands, the admin key file.
Two demos run at once, so two Envoys share the host (a dynamic base id each)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .harness import REPO_ROOT, ManagedProcess, _spawn, free_port, wait_until

pytestmark = pytest.mark.e2e
RUN_DEMO = REPO_ROOT / "examples" / "run_demo.py"
READY_LINE = "Ctrl-C stops everything."
SHARED_TOKEN = "demo-shared-upstream-token"  # what run_demo.py sets as the demo server's shared value


@dataclass
class Demo:
    process: ManagedProcess
    data: Path
    port: int

    @property
    def output(self) -> str:
        return self.process.stdout_path.read_text(encoding="utf-8")

    def printed(self, label: str) -> str:
        """The value printed after `label:` on its own line."""
        found = re.search(rf"^\s*{re.escape(label)}:\s+(\S+)", self.output, re.M)
        assert found, f"{label!r} not in the output:\n{self.output}"
        return found.group(1)

    def line_after(self, heading: str) -> str:
        lines = self.output.splitlines()
        return lines[lines.index(heading) + 1].strip()

    def exports(self) -> dict[str, str]:
        """The environment the printed 'Manage it from another terminal' lines set, run by a shell."""
        block = self.output.split("Manage it from another terminal", 1)[1].splitlines()[1:]
        script = "\n".join(line.strip() for line in block if line.strip().startswith("export "))
        out = subprocess.run(["bash", "-c", f"{script}\nenv -0"], capture_output=True, check=True, cwd=REPO_ROOT)
        env = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
        return {k: env[k] for k in ("MCP_AUTHZ_STORE", "ADMIN_KEY")}


@contextmanager
def run_demo(tmp_path: Path, name: str) -> Iterator[Demo]:
    port = free_port()
    argv = [sys.executable, str(RUN_DEMO), "--port", str(port), "--free-ports", "--data-dir", str(tmp_path / name)]
    process = _spawn(name, argv, tmp_path)
    demo = Demo(process, tmp_path / name, port)
    try:
        wait_until(lambda: READY_LINE in demo.output, timeout=90, what=f"{name} ready", process=process)
        yield demo
    finally:
        assert process.stop(timeout=20) == 0, process.log_tail()  # SIGTERM stops it as Ctrl-C does


def _readme_block_after(heading: str) -> str:
    """The first fenced block after the README paragraph that starts with `heading`."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(heading) :]
    start = after.index("```sh\n") + len("```sh\n")
    return after[start : after.index("```", start)]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).parent / "mcp-authz"
    full = {**os.environ, **env}
    full.pop("MCP_AUTHZ_MASTER_KEY_FILE", None)
    return subprocess.run([str(cli), *args], capture_output=True, text=True, env=full, cwd=REPO_ROOT, timeout=60)


def test_make_run_prints_what_a_newcomer_needs_and_a_tool_call_works_as_printed(tmp_path: Path) -> None:
    with ExitStack() as stack:
        first = stack.enter_context(run_demo(tmp_path, "demo-a"))
        second = stack.enter_context(run_demo(tmp_path, "demo-b"))  # a second Envoy on the same host
        for demo in (first, second):
            assert demo.printed("Gateway URL") == f"http://127.0.0.1:{demo.port}/mcp/demo"
            key, key_id = demo.printed("Demo key (shown once)"), demo.printed("Demo key id")
            assert key.startswith("mgw_")

            # The tool call, exactly as printed (a shell line, from the repository).
            command = demo.line_after("Call a tool through the gateway:")
            assert command.startswith(f"MCP_AUTHZ_KEY={key} ")
            call = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
            assert call.returncode == 0, call.stderr
            headers = json.loads(call.stdout)
            assert headers["authorization"] == f"Bearer {SHARED_TOKEN}"
            assert headers["x-user-id"] == "demo" and "x-mcp-authz-signature" in headers
            assert "mgw_" not in call.stdout  # the upstream never sees a gateway key

            # The admin key: in a 0600 file, never printed; the printed exports find it and the store.
            admin_file = demo.data / "admin.key"
            assert admin_file.stat().st_mode & 0o777 == 0o600
            admin_key = admin_file.read_text().strip()
            assert admin_key.startswith("mgw_") and admin_key not in demo.output
            env = demo.exports()
            assert env["ADMIN_KEY"] == admin_key

            # The printed key id is the demo key's; the admin key works on the printed admin listener.
            keys = json.loads(_cli(env, "--json", "keys", "list", "--principal", "demo").stdout)["keys"]
            assert [k["key_id"] for k in keys if k["status"] == "active"] == [key_id]
            admin_listen = re.search(r"gRPC at (\S+)", demo.output)
            assert admin_listen
            whoami = _cli({"MCP_AUTHZ_KEY": admin_key}, "--server", admin_listen.group(1), "whoami")
            assert whoami.returncode == 0 and "admin" in whoami.stdout, whoami.stderr
            # The printed console URL serves the console through Envoy, and the demo key signs in there.
            console = demo.printed("Console (browser)").split()[0]
            assert console == f"http://127.0.0.1:{demo.port}/console/"
            assert httpx.get(console, timeout=10).status_code == 200
            signed_in = httpx.post(f"{console}api/session", json={"key": key}, timeout=10)
            assert signed_in.status_code == 200 and signed_in.json()["name"] == "demo", signed_in.text
        # The README walkthrough on what `make run` created: alice, her key (whose id `keys create`
        # prints: step 6's <KEY_ID>), her override, `overrides test` against the demo's upstream URL.
        env = first.exports()
        assert _cli(env, "principals", "add", "alice", "--team", "eng", "--roles", "user").returncode == 0
        created = _cli(env, "keys", "create", "alice", "--label", "laptop")
        alice_key_id = re.search(r"Created key (\S+) for alice", created.stdout)
        assert alice_key_id, created.stdout + created.stderr
        override = subprocess.run([str(Path(sys.executable).parent / "mcp-authz"), "overrides", "set", "--principal",
                                   "alice", "--server", "demo"], input="alice-personal-token-42\n", text=True,
                                  capture_output=True, env={**os.environ, **env}, cwd=REPO_ROOT, timeout=60)  # fmt: skip
        assert override.returncode == 0, override.stderr
        tested = _cli(env, "overrides", "test", "--server", "demo", "--principal", "alice")
        assert tested.returncode == 0, tested.stdout + tested.stderr
        revoked = _cli(env, "keys", "revoke", alice_key_id.group(1))
        assert revoked.returncode == 0, revoked.stderr
        # The README's block that makes what the Administration examples need, then their keys at work.
        block = _readme_block_after("**The Administration examples below on the demo.**")
        made = subprocess.run(["bash", "-euo", "pipefail", "-c", f'{block}\necho "ALICE_KEY=$ALICE_KEY"'],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                              env={**os.environ, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        alice_key = made.stdout.rsplit("ALICE_KEY=", 1)[1].strip()
        gateway = first.printed("Gateway URL").removesuffix("/mcp/demo")
        for key, name in ((alice_key, "alice"), (env["ADMIN_KEY"], "admin")):
            who = httpx.get(f"{gateway}/admin/v1/whoami", headers={"authorization": f"Bearer {key}"}, timeout=10)
            assert who.status_code == 200 and who.json()["name"] == name, who.text
        shown = json.loads(_cli(env, "--json", "servers", "show", "github").stdout)["server"]
        assert shown["mode"] == "individual" and shown["upstream_url"] == "http://127.0.0.1:9100/mcp/github"
        # Envoy's work-in-progress warnings about the MCP filter are not shown.
        # Nor is any other Envoy warning at start (the connection limit is configured).
        for demo in (first, second):
            assert "work-in-progress" not in demo.process.log_tail(100_000)
            assert "][warning][" not in demo.process.log_tail(100_000), demo.process.log_tail(100_000)


def test_a_second_make_run_revokes_the_previous_key_and_follows_the_moved_example(tmp_path: Path) -> None:
    with run_demo(tmp_path, "demo") as before:
        old_key_id = before.printed("Demo key id")
    with run_demo(tmp_path, "demo") as after:
        env = after.exports()
        keys = json.loads(_cli(env, "--json", "keys", "list", "--principal", "demo").stdout)["keys"]
        statuses = {k["key_id"]: k["status"] for k in keys}
        assert statuses[after.printed("Demo key id")] == "active"
        assert statuses[old_key_id] == "revoked"
        shown = json.loads(_cli(env, "--json", "servers", "show", "demo").stdout)
        example_port = re.search(r"example MCP server on http://127\.0\.0\.1:(\d+)", after.output)
        assert example_port and shown["server"]["upstream_url"] == f"http://127.0.0.1:{example_port.group(1)}/mcp/demo"
        assert "Created the demo store" not in after.output  # the world is made once


def test_setup_only_makes_the_world_and_prints_no_secret(tmp_path: Path) -> None:
    """What docker-compose's `init` runs: the world, an admin key file, a signing secret file; no key in the output."""
    signing = tmp_path / "signing" / "demo-signing.secret"
    signing.parent.mkdir()
    argv = [sys.executable, str(RUN_DEMO), "--setup-only", "--data-dir", str(tmp_path / "data"),
            "--upstream-url", "http://127.0.0.1:9100/mcp/demo", "--signing-secret-file", str(signing)]  # fmt: skip
    for _ in range(2):  # a later start finds it made and changes nothing
        out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True)
        assert "mgw_" not in out.stdout + out.stderr
    for path in (tmp_path / "data" / "admin.key", tmp_path / "data" / "mcp-authz.key", signing):
        assert path.stat().st_mode & 0o777 == 0o600, path
    # A store it cannot use: one line, no traceback.
    bad = subprocess.run([*argv, "--store", f"sqlite:///{tmp_path}/missing/dir/x.db"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr, bad.stderr
    assert "directory does not exist" in bad.stderr
