"""Connect a client: the ready-to-paste configuration of one MCP client for one server behind the gateway.

One pure generator, shared by `mcp-authz connect` and the console's "Connect a client" page:
`generate(gateway_url, server, client, key)` returns a `ClientConfig` (where the text goes, the
text, and one line saying what to do with it). Without a key the text holds `PLACEHOLDER`
(VS Code prompts for the key instead, so it is never written into the file).

Every form sends the key in a header (`Authorization: Bearer mgw_…`), never in the URL. The
gateway refuses a key in a query string or inside a path segment with 400 `key_in_url`, and it
accepts a whole path segment (`/mcp/<server>/mgw_…`) only while `MCP_AUTHZ_PATH_KEYS` is on; a
URL is kept in client logs, shell histories and proxies' access logs, and every client here
takes headers, so no URL form is produced. The server's URL is `<gateway_url>/mcp/<server>`,
the route Envoy forwards to that server.

Safety of the output: JSON is built with `json.dumps`, shell commands with `shlex.quote`; the
server name must match the shared name rule and the gateway URL a strict shape (scheme, host,
port, and a plain path prefix), so neither can break out of a quoted string or a JSON value.
Validation messages never echo what was rejected.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from authz_server.admin.probe import INITIALIZE
from authz_server.admin.validate import check_name
from authz_server.crypto import keys as gateway_keys
from authz_server.errors import InvalidInput
from authz_server.models import Secret

DEFAULT_GATEWAY_URL = "http://127.0.0.1:10000"
PLACEHOLDER = "<YOUR_GATEWAY_KEY>"
MCP_REMOTE = "mcp-remote"  # the npm package Claude Desktop runs to reach a remote server over stdio
AUTH_ENV = "MCP_GATEWAY_AUTH"  # Claude Desktop: mcp-remote expands ${MCP_GATEWAY_AUTH} in its --header
VSCODE_INPUT = "mcp-gateway-key"  # VS Code: the prompted input's id

# http(s)://host[:port][/prefix]: a DNS name or IPv4 (or [IPv6]), an optional port and a plain path.
# Nothing a shell, JSON, VS Code (${…}) or mcp-remote (${…}) would read as syntax.
_GATEWAY_URL_RE = re.compile(
    r"^(?P<scheme>https?)://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?(?P<path>(?:/[A-Za-z0-9._~-]*)*)$"
)
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # plain http stays on this host
_MCP_REMOTE_HTTP_HOSTS = ("localhost", "127.0.0.1")  # where mcp-remote takes plain http without --allow-http


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """One client's configuration. `file`: where `text` goes (None: `text` is a command to run)."""

    client: str
    title: str
    file: str | None
    text: str
    instruction: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "text": self.text, "instruction": self.instruction}


@dataclass(frozen=True, slots=True)
class _Target:
    server: str
    url: str  # the server's URL through the gateway
    key: str | None
    plain_http_remote: bool  # http:// to another host: the key would cross the network in clear text
    allow_http: bool  # http:// where mcp-remote wants --allow-http

    @property
    def bearer(self) -> str:
        return f"Bearer {self.key or PLACEHOLDER}"


def gateway_server_url(gateway_url: str, server: str) -> str:
    """`<gateway_url>/mcp/<server>`, after checking both (InvalidInput, naming neither value)."""
    check_name(server, "server")
    match = _GATEWAY_URL_RE.match(gateway_url) if isinstance(gateway_url, str) else None
    port = match.group("port") if match else None
    if match is None or (port is not None and not 0 < int(port) < 65536):
        raise InvalidInput(
            "The gateway URL must be http:// or https://, a host, an optional port and an optional plain path, "
            f"e.g. {DEFAULT_GATEWAY_URL} or https://gateway.example.com (no query, user info or key)."
        )
    if gateway_keys.contains_key(gateway_url):
        raise InvalidInput("The gateway URL holds a gateway key: leave it out, the configuration sends the key in a header.")
    return f"{gateway_url.rstrip('/')}/mcp/{server}"


def _target(gateway_url: str, server: str, key: Secret | None) -> _Target:
    url = gateway_server_url(gateway_url, server)
    if key is not None and not gateway_keys.looks_like_key(key.reveal()):
        raise InvalidInput("That is not a gateway key (mgw_ followed by 32 letters and digits).")
    match = _GATEWAY_URL_RE.match(gateway_url)
    assert match is not None  # checked by gateway_server_url
    http, host = match.group("scheme") == "http", match.group("host").lower()
    return _Target(server, url, key.reveal() if key is not None else None,
                   http and host not in _LOOPBACK_HOSTS, http and host not in _MCP_REMOTE_HTTP_HOSTS)


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _key_note(t: _Target, placeholder: bool = True) -> str:
    """What every instruction ends with: the placeholder to replace, and a warning for plain http."""
    note = "" if t.key or not placeholder else f" Replace {PLACEHOLDER} with your gateway key."
    if t.plain_http_remote:
        note += " Plain http to another host sends the key in clear text: use an https gateway URL."
    return note


def _claude_desktop(t: _Target) -> ClientConfig:
    # mcp-remote's documented workaround for clients that mangle spaces inside args (Cursor, Claude
    # Desktop on Windows): no space in the --header argument; the "Bearer …" value comes from env.
    args = ["-y", MCP_REMOTE, t.url, "--header", f"Authorization:${{{AUTH_ENV}}}"]
    if t.allow_http:
        args.append("--allow-http")  # mcp-remote refuses plain http beyond localhost otherwise
    entry = {"command": "npx", "args": args, "env": {AUTH_ENV: t.bearer}}
    return ClientConfig(
        "claude-desktop", "Claude Desktop (through mcp-remote)", "claude_desktop_config.json",
        _json({"mcpServers": {t.server: entry}}),
        "Merge into mcpServers in claude_desktop_config.json (Settings > Developer > Edit Config), then restart "
        f"Claude Desktop; it needs Node.js for npx.{_key_note(t)}",
    )  # fmt: skip


def _cursor(t: _Target) -> ClientConfig:
    entry = {"url": t.url, "headers": {"Authorization": t.bearer}}
    return ClientConfig(
        "cursor", "Cursor", "~/.cursor/mcp.json", _json({"mcpServers": {t.server: entry}}),
        f"Merge into mcpServers in ~/.cursor/mcp.json (or .cursor/mcp.json in a project).{_key_note(t)}",
    )  # fmt: skip


def _vscode(t: _Target) -> ClientConfig:
    doc: dict[str, Any] = {}
    if t.key:
        authorization = t.bearer
        note = "The key is written in this file: keep it out of version control."
    else:
        # VS Code asks once and keeps the answer in its secret storage, never in the file.
        authorization = f"Bearer ${{input:{VSCODE_INPUT}}}"
        doc["inputs"] = [
            {"type": "promptString", "id": VSCODE_INPUT, "description": "Gateway key (mgw_…)", "password": True}
        ]
        note = "VS Code prompts for your gateway key when the server first starts."
    doc["servers"] = {t.server: {"type": "http", "url": t.url, "headers": {"Authorization": authorization}}}
    return ClientConfig("vscode", "VS Code", ".vscode/mcp.json", _json(doc),
                        f"Merge into .vscode/mcp.json in your workspace. {note}{_key_note(t, placeholder=False)}")  # fmt: skip


def _claude_code(t: _Target) -> ClientConfig:
    argv = ["claude", "mcp", "add", "--transport", "http", t.server, t.url, "--header", f"Authorization: {t.bearer}"]
    return ClientConfig("claude-code", "Claude Code", None, shlex.join(argv) + "\n",
                        f"Run once in a shell.{_key_note(t)}")  # fmt: skip


def _curl(t: _Target) -> ClientConfig:
    params = {**cast(dict[str, Any], INITIALIZE["params"]), "clientInfo": {"name": "curl", "version": "1"}}
    body = {**INITIALIZE, "params": params}
    lines = [
        f"curl -sS -X POST {shlex.quote(t.url)}",
        f"-H {shlex.quote('content-type: application/json')}",
        f"-H {shlex.quote('accept: application/json, text/event-stream')}",
        f"-H {shlex.quote(f'Authorization: {t.bearer}')}",
        f"--data {shlex.quote(json.dumps(body, separators=(',', ':')))}",
    ]
    return ClientConfig("curl", "curl (an MCP initialize)", None, " \\\n  ".join(lines) + "\n",
                        f"Run in a shell: a 200 with the server's initialize result means the key works.{_key_note(t)}")  # fmt: skip


_GENERATORS: dict[str, Callable[[_Target], ClientConfig]] = {
    "claude-desktop": _claude_desktop,
    "cursor": _cursor,
    "vscode": _vscode,
    "claude-code": _claude_code,
    "curl": _curl,
}
CLIENTS: tuple[str, ...] = tuple(_GENERATORS)
"""The client kinds, in the order they are shown."""


def generate(gateway_url: str, server: str, client: str, key: Secret | None = None) -> ClientConfig:
    """`client`'s configuration for `server` behind the gateway at `gateway_url`, with `key` filled
    in (else `PLACEHOLDER`, or a prompt where the client has one). Raises InvalidInput for an
    unknown client, an invalid server name or gateway URL, or a `key` that is not key-shaped."""
    make = _GENERATORS.get(client) if isinstance(client, str) else None
    if make is None:
        raise InvalidInput(f"Unknown client: use one of {', '.join(CLIENTS)}.")
    return make(_target(gateway_url, server, key))


def generate_all(gateway_url: str, server: str, key: Secret | None = None) -> list[ClientConfig]:
    """Every client's configuration, in `CLIENTS` order."""
    return [generate(gateway_url, server, client, key) for client in CLIENTS]


def title(client: str) -> str:
    """A client kind's name for people, e.g. "Claude Desktop (through mcp-remote)"."""
    return generate(DEFAULT_GATEWAY_URL, "example", client).title
