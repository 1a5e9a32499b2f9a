"""`mcp-authz connect`, end to end: the configuration it prints is run as written, through a real
Envoy, the real sidecar and the example MCP server, by bash (curl) and by mcp-remote (Claude
Desktop's configuration), whose tools an MCP SDK stdio client then lists and calls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from .harness import parse_tool_result
from .sidecar import CLI, GITHUB_ALICE, Gateway, run_gateway

pytestmark = pytest.mark.e2e
MCP_REMOTE = "mcp-remote@0.1.38"  # pinned: the test runs the package, the printed configuration names it unpinned
MCP_REMOTE_TIMEOUT = 120  # seconds, the first npx install included


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("connect"), ("github",)) as gateway:
        yield gateway


def connect(gw: Gateway, client: str) -> subprocess.CompletedProcess[str]:
    """`mcp-authz connect` for alice's key (from $MCP_AUTHZ_KEY, as a user would run it)."""
    env = {**gw.world.env, "MCP_AUTHZ_KEY": gw.key("alice"), "MCP_AUTHZ_GATEWAY_URL": gw.envoy.base_url}
    done = subprocess.run([CLI, "connect", "--server-name", "github", "--client", client, "--key-from-env"],
                          capture_output=True, text=True, env=env, timeout=30, cwd=gw.world.dir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def test_the_printed_curl_command_gets_an_initialize_result(gw: Gateway) -> None:
    command = connect(gw, "curl").stdout
    assert gw.envoy.url("github") in command and "mgw_" not in command.split("'")[1]  # the URL holds no key
    # As printed, plus a last line with the HTTP status.
    done = subprocess.run(["bash", "-c", command.rstrip() + " -w '\\n%{http_code}'"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "200", done.stdout
    data = [line.removeprefix("data:").strip() for line in body.splitlines() if line.startswith("data:")]
    reply = json.loads(data[0] if data else body)  # an SSE event or plain JSON: both are MCP
    assert reply["id"] == 1 and reply["result"]["serverInfo"]["name"]
    assert gw.upstream.stats()["paths"][-1] == "/mcp/github"


def test_a_wrong_key_in_the_printed_command_is_refused(gw: Gateway) -> None:
    command = connect(gw, "curl").stdout.replace(gw.key("alice"), "mgw_" + "A" * 32)
    done = subprocess.run(["bash", "-c", command.rstrip() + " -o /dev/null -w '%{http_code}'"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.stdout == "401"


def test_remote_mode_for_a_plain_user_and_a_typo(gw: Gateway) -> None:
    env = {**gw.world.env, "MCP_AUTHZ_KEY": gw.key("bob")}  # a user, no store or master key needed
    base = [CLI, "--server", gw.sidecar.admin_target, "connect", "--client", "cursor", "--server-name"]
    done = subprocess.run([*base, "github"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["mcpServers"]["github"]["url"] == "http://127.0.0.1:10000/mcp/github"
    typo = subprocess.run([*base, "githib"], capture_output=True, text=True, env=env, timeout=30)
    assert (typo.returncode, typo.stdout) == (1, "") and "No server named githib" in typo.stderr, typo.stderr


def _npx_ready() -> str | None:
    """Why mcp-remote cannot run here, or None."""
    if shutil.which("npx") is None:
        return "npx is not installed (Node.js)"
    try:
        done = subprocess.run(["npm", "view", MCP_REMOTE, "version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"npm could not reach its registry: {exc}"
    return None if done.returncode == 0 else f"npm could not reach its registry for {MCP_REMOTE}: {done.stderr[-300:]}"


async def test_claude_desktop_config_runs_mcp_remote_through_envoy(gw: Gateway, tmp_path: Path) -> None:
    reason = _npx_ready()
    if reason:
        pytest.skip(reason)
    entry = json.loads(connect(gw, "claude-desktop").stdout)["mcpServers"]["github"]
    args = [MCP_REMOTE if arg == "mcp-remote" else arg for arg in entry["args"]]
    assert args != entry["args"], entry  # the configuration runs mcp-remote
    # mcp-remote keeps OAuth state under its config dir: the test's own, not the user's.
    env = {**entry["env"], "MCP_REMOTE_CONFIG_DIR": str(tmp_path / "mcp-auth")}
    if "npm_config_cache" in os.environ:
        env["npm_config_cache"] = os.environ["npm_config_cache"]
    params = StdioServerParameters(command=entry["command"], args=args, env=env)
    with (tmp_path / "mcp-remote.log").open("w") as errlog:
        try:
            with anyio.fail_after(MCP_REMOTE_TIMEOUT):
                async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                    await session.initialize()
                    tools = {tool.name for tool in (await session.list_tools()).tools}
                    headers = parse_tool_result(await session.call_tool("echo_headers", {}))
        except TimeoutError:
            pytest.fail(f"mcp-remote did not answer within {MCP_REMOTE_TIMEOUT}s; its log: {tmp_path / 'mcp-remote.log'}")
    assert "echo_headers" in tools
    assert headers["authorization"] == f"Bearer {GITHUB_ALICE}"  # alice's credential, injected by the gateway
    assert headers["x-user-id"] == "alice"
    assert "mgw_" not in json.dumps(gw.upstream.stats())
