"""The client-configuration generator: every client, with and without a key, read back the way
the client (or a shell) would read it; and nothing a caller passes can break out of the text."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from authz_server.console.clients import (
    AUTH_ENV, CLIENTS, DEFAULT_GATEWAY_URL, PLACEHOLDER, ClientConfig, gateway_server_url, generate, generate_all,
)  # fmt: skip
from authz_server.errors import InvalidInput
from authz_server.models import Secret

KEY = "mgw_AbC1234" + "x" * 19 + "Z9q8r7"[:2] + "Q1w2"
assert len(KEY) == 36
URL = "http://127.0.0.1:10000/mcp/demo"
KEYS = [pytest.param(None, id="placeholder"), pytest.param(KEY, id="key")]


def _gen(client: str, key: str | None, gateway: str = DEFAULT_GATEWAY_URL, server: str = "demo") -> ClientConfig:
    return generate(gateway, server, client, Secret(key) if key else None)


def _bearer(key: str | None) -> str:
    return f"Bearer {key or PLACEHOLDER}"


def _expand(template: str, env: dict[str, str]) -> str:
    """mcp-remote's substitution of ${VAR} in a --header value."""
    return re.sub(r"\$\{([^}]+)\}", lambda m: env.get(m.group(1), ""), template)


def _curl_argv(text: str) -> list[str]:
    return shlex.split(text.replace("\\\n", ""))  # bash drops backslash-newline continuations


def _headers(argv: list[str]) -> dict[str, str]:
    values = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-H"]
    return {name.lower(): value.strip() for name, value in (v.split(":", 1) for v in values)}


@pytest.mark.parametrize("key", KEYS)
def test_claude_desktop_runs_mcp_remote_with_the_key_from_env(key: str | None) -> None:
    config = _gen("claude-desktop", key)
    assert config.file == "claude_desktop_config.json"
    entry = json.loads(config.text)["mcpServers"]["demo"]
    assert entry["command"] == "npx"
    args = entry["args"]
    assert args[:3] == ["-y", "mcp-remote", URL] and "--allow-http" not in args
    header = args[args.index("--header") + 1]
    assert " " not in header  # clients that split args on spaces (Cursor, Claude Desktop on Windows) keep it whole
    assert header == f"Authorization:${{{AUTH_ENV}}}"
    assert _expand(header, entry["env"]) == f"Authorization:{_bearer(key)}"


@pytest.mark.parametrize("key", KEYS)
def test_cursor_has_url_and_header(key: str | None) -> None:
    config = _gen("cursor", key)
    assert config.file == "~/.cursor/mcp.json"
    assert json.loads(config.text) == {"mcpServers": {"demo": {"url": URL, "headers": {"Authorization": _bearer(key)}}}}


def test_vscode_prompts_for_the_key_when_none_is_given_and_never_writes_it() -> None:
    config = _gen("vscode", None)
    assert config.file == ".vscode/mcp.json"
    doc = json.loads(config.text)
    (prompt,) = doc["inputs"]
    assert prompt["type"] == "promptString" and prompt["password"] is True
    server = doc["servers"]["demo"]
    assert (server["type"], server["url"]) == ("http", URL)
    assert server["headers"] == {"Authorization": f"Bearer ${{input:{prompt['id']}}}"}
    assert PLACEHOLDER not in config.text and "mgw_" not in config.text.replace("(mgw_…)", "")


def test_vscode_with_a_key_fills_it_in_and_says_so() -> None:
    config = _gen("vscode", KEY)
    doc = json.loads(config.text)
    assert "inputs" not in doc
    assert doc["servers"] == {"demo": {"type": "http", "url": URL, "headers": {"Authorization": f"Bearer {KEY}"}}}
    assert "version control" in config.instruction


@pytest.mark.parametrize("key", KEYS)
def test_claude_code_is_one_command(key: str | None) -> None:
    config = _gen("claude-code", key)
    assert config.file is None
    assert shlex.split(config.text) == [
        "claude", "mcp", "add", "--transport", "http", "demo", URL, "--header", f"Authorization: {_bearer(key)}",
    ]  # fmt: skip


@pytest.mark.parametrize("key", KEYS)
def test_curl_posts_an_initialize_with_the_mcp_headers(key: str | None) -> None:
    config = _gen("curl", key)
    argv = _curl_argv(config.text)
    assert argv[:5] == ["curl", "-sS", "-X", "POST", URL]
    assert _headers(argv) == {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "authorization": _bearer(key),
    }
    body = json.loads(argv[argv.index("--data") + 1])
    assert body["method"] == "initialize" and body["params"]["protocolVersion"]


@pytest.mark.parametrize("key", KEYS)
def test_every_client_the_key_or_the_placeholder_and_never_the_key_in_a_url(key: str | None) -> None:
    configs = generate_all(DEFAULT_GATEWAY_URL, "demo", Secret(key) if key else None)
    assert [c.client for c in configs] == list(CLIENTS)
    for c in configs:
        assert set(c.to_json()) == {"file", "text", "instruction"} and c.instruction
        assert not re.search(r"https?://\S*mgw_", c.text)
        if key:
            assert key in c.text and PLACEHOLDER not in c.text + c.instruction
        else:
            assert "mgw_" not in c.text.replace("(mgw_…)", "")
            assert (PLACEHOLDER in c.text) == (c.client != "vscode")


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [
        ("http://127.0.0.1:10000/", URL),
        ("https://gateway.example.com", "https://gateway.example.com/mcp/demo"),
        ("https://gateway.example.com/tools/", "https://gateway.example.com/tools/mcp/demo"),
        ("http://[::1]:10000", "http://[::1]:10000/mcp/demo"),
    ],
)
def test_the_server_url_is_the_envoy_route(gateway: str, expected: str) -> None:
    assert gateway_server_url(gateway, "demo") == expected


def test_plain_http_to_another_host_warns_and_lets_mcp_remote_use_it() -> None:
    for client in CLIENTS:
        config = _gen(client, None, gateway="http://gateway.internal:10000")
        assert "clear text" in config.instruction
    args = json.loads(_gen("claude-desktop", None, gateway="http://gateway.internal:10000").text)["mcpServers"]["demo"]["args"]
    assert args[-1] == "--allow-http"
    assert "clear text" not in _gen("cursor", None, gateway="https://gateway.internal").instruction
    loopback6 = _gen("claude-desktop", None, gateway="http://[::1]:10000")  # on this host, but mcp-remote asks
    assert "clear text" not in loopback6.instruction
    assert json.loads(loopback6.text)["mcpServers"]["demo"]["args"][-1] == "--allow-http"


@pytest.mark.parametrize("client", ["claude-code", "curl"])
def test_a_shell_runs_the_command_with_the_exact_arguments(client: str) -> None:
    # [::1] is a glob: unquoted, failglob would stop bash. The command is echoed, one argument a line.
    config = _gen(client, KEY, gateway="http://[::1]:10000/p.x~y")
    script = f"shopt -s failglob; {client.split('-')[0]}() {{ printf '%s\\n' \"$@\"; }}\n{config.text}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    expected = shlex.split(config.text) if client == "claude-code" else _curl_argv(config.text)
    assert done.stdout.splitlines() == expected[1:]
    assert "http://[::1]:10000/p.x~y/mcp/demo" in expected


BAD_NAMES = ["demo'; touch /tmp/pwned; '", "$(id)", "a b", "Demo", "", "demo\n", "-rf", "x" * 64, "a\"b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_server_name_that_could_break_out_is_refused_without_echo(name: str) -> None:
    for client in CLIENTS:
        with pytest.raises(InvalidInput) as caught:
            _gen(client, None, server=name)
        assert "server name is invalid" in caught.value.message
        assert not name or name.strip() not in caught.value.message


BAD_URLS = [
    "http://x'y", "http://x/$(id)", "http://h/a b", "http://h/`id`", "http://h/${HOME}", "http://h/a\"b",
    "ftp://h", "http://user:pw@h", "http://h?q=1", "http://h#f", "http://h:99999", "http://h:0", "h:10000",
    "http:///x", "http://h/a;b", "http://h\n/", "http://h/%2e%2e", f"http://h/mcp/{KEY}",
]


@pytest.mark.parametrize("gateway", BAD_URLS)
def test_a_gateway_url_that_could_break_out_is_refused_without_echo(gateway: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        _gen("curl", None, gateway=gateway)
    assert "gateway" in caught.value.message.lower() and gateway not in caught.value.message
    assert KEY not in caught.value.message


def test_a_key_that_is_not_key_shaped_is_refused_without_echo() -> None:
    with pytest.raises(InvalidInput) as caught:
        generate(DEFAULT_GATEWAY_URL, "demo", "cursor", Secret("ghp_not_a_gateway_key' $(id)"))
    assert "not a gateway key" in caught.value.message and "ghp_" not in caught.value.message


def test_an_unknown_client_names_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match="claude-desktop, cursor, vscode, claude-code, curl"):
        generate(DEFAULT_GATEWAY_URL, "demo", "emacs")


def _all_json(key: str | None) -> dict[str, Any]:
    return {c.client: c.to_json() for c in generate_all(DEFAULT_GATEWAY_URL, "demo", Secret(key) if key else None)}


def test_json_documents_are_valid_for_every_json_client() -> None:
    for key in (None, KEY):
        docs = _all_json(key)
        for client in ("claude-desktop", "cursor", "vscode"):
            assert docs[client]["file"].endswith(".json")
            assert isinstance(json.loads(docs[client]["text"]), dict)


def test_the_readme_shows_what_connect_prints() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Connect a client\n") :]
    shown = section[section.index("```json\n") + 8 : section.index("\n```", section.index("```json\n"))]
    assert json.loads(shown) == json.loads(_gen("claude-desktop", None, server="demo").text)
