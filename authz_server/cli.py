"""The `mcp-authz` command: management, locally or against a remote sidecar, and running the sidecar.

Every management command runs one use case and renders its result, in one of two modes:
- local (the default): resolve settings, load the master key, open the store,
  check the master key against it (`AdminService.verify_master_key`), run the
  use case as the local operator (an admin), close the store;
- remote (`--server HOST:PORT` before the command, or `MCP_AUTHZ_SERVER`): run
  it through the sidecar's admin gRPC API (`RemoteAdmin`) as the principal whose
  gateway key is in `MCP_AUTHZ_KEY`; that principal's roles decide what it may do.
Both implement `AdminOps`, with the same views. The mode is picked once, in
`_admin_session`, which hands each handler the operations and the actor to pass
them; the handlers do not know which mode it is.

Output contract:
- tables for people; with `--json`, exactly one JSON document on stdout
  (`usage --export` alone writes JSON lines, one record a line, streamed);
- one-time secrets (gateway keys, signing secrets) appear only in the output
  of the command that created them; nothing else ever prints a secret;
- secrets are never read from the command line, only from stdin or a prompt;
- exit 0 on success, 1 for an operation error (not found, conflict, invalid
  input, refused, store failure), 2 for a usage or configuration error
  (argparse, settings, master key) and for any refusal of `serve`/`run` to
  start (a store it cannot open included); expected errors never print a
  traceback, and a refusal to start is that one `error:` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import re
import sys
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn, TextIO

from authz_server import __version__
from authz_server.admin.masterkey import DEFAULT_BATCH, MasterKeyAdmin
from authz_server.admin.ops import DEFAULT_LIMIT, AdminOps
from authz_server.admin.policy import Actor
from authz_server.admin.service import AdminService
from authz_server.admin.views import (
    STATUS_INDICATORS, AuditView, CredentialStatusView, GatewayKeyView, OverrideView, PrincipalView, ServerFormView,
    ServerView, TeamView, UsageView,
)  # fmt: skip
from authz_server.config import Settings, TlsFiles, is_local, parse_hostport, read_pem
from authz_server.console import clients
from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.cipher import (
    ENV_KEY, ENV_KEY_FILE, Keyring, load_keyring, read_key_file, replace_key_file, spec_activating,
    spec_with_new_version, spec_without_version, write_key_file,
)  # fmt: skip
from authz_server.crypto.keys import KeyHasher
from authz_server.errors import AuthzError, ConfigError, Conflict, InvalidInput, StoreError
from authz_server.models import AuthMode, Entity, Placeholder, Secret
from authz_server.rules import NAME_RE, PLACEHOLDER_NAME_RE
from authz_server.store.base import Store

PROG = "mcp-authz"
DEFAULT_KEY_FILE = "mcp-authz.key"
ENV_ENVOY_CONFIG = "MCP_AUTHZ_ENVOY_CONFIG"
ENV_SERVER = "MCP_AUTHZ_SERVER"  # remote mode: the sidecar's admin API, HOST:PORT
ENV_CA = "MCP_AUTHZ_CA"  # remote mode: the CA file that signed the admin listener's certificate
ENV_GATEWAY_KEY = "MCP_AUTHZ_KEY"  # remote mode: the caller's gateway key
DEFAULT_ENVOY_CONFIG = "envoy/envoy.yaml"
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ONCE_NOTE = "This is shown once and cannot be retrieved later: store it now (e.g. in a password manager)."


# --- errors and output ---------------------------------------------------------------


class UsageError(Exception):
    """A bad command line: exit 2 with the parser's usage line."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse echoes stray arguments; one could be a secret pasted where it does not belong.
        if message.startswith("unrecognized arguments"):
            message = (
                "unexpected extra arguments (not shown). Secrets are read from stdin or a prompt, "
                "never from the command line."
            )
        raise UsageError(self.format_usage(), message)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A command's result: the JSON document and the text for people."""

    doc: dict[str, Any]
    text: str


def _print_error(json_mode: bool, reason: str, message: str, usage: str = "") -> None:
    # argparse quotes bad values ("invalid choice: 'mgw_…'"): a pasted key is cut to its key id.
    message = gateway_keys.redact(message)
    if json_mode:
        print(json.dumps({"error": {"reason": reason, "message": message}}), file=sys.stdout)
    else:
        if usage:
            print(usage.rstrip(), file=sys.stderr)
        print(f"error: {message}", file=sys.stderr)


def _width(text: str) -> int:
    """Terminal columns: wide characters (the status indicators 🟢 🟡 🔴 ⏰) take two."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


MAX_COLUMN = 80  # terminal columns of one table cell; --json shows every value whole


def _clip(text: str, width: int = MAX_COLUMN) -> str:
    """`text`, cut to `width` columns with '…' when wider."""
    if _width(text) <= width:
        return text
    out, used = "", 1  # the '…'
    for c in text:
        used += _width(c)
        if used > width:
            break
        out += c
    return out + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return empty
    rows = [[_clip(c) for c in r] for r in rows]
    widths = [max(_width(h), *(_width(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(_pad(h, w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(_pad(c, w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%MZ")


def _once_block(title: str, secret: Secret) -> str:
    return f"{title}:\n\n    {secret.reveal()}\n\n{_ONCE_NOTE}"


# --- argument types ------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '15m', '45s', '2w'."""
    m = _DURATION_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError("expected a duration such as 30d, 12h, 15m, 45s or 2w")
    try:
        return timedelta(seconds=int(m.group(1)) * _DURATION_UNITS[m.group(2)])
    except OverflowError:
        raise argparse.ArgumentTypeError("the duration is too long") from None


def _shifted(now: datetime | None, text: str, sign: int) -> datetime:
    """Now plus (sign 1) or minus (sign -1) the duration `text`, within the years a date can hold."""
    try:
        return (now or datetime.now(timezone.utc)) + sign * parse_duration(text)
    except OverflowError:
        raise argparse.ArgumentTypeError("the duration reaches past the years 1 to 9999") from None


def _parse_instant(text: str, expected: str) -> datetime:
    """An ISO date (midnight UTC) or date-time (UTC unless it has an offset); `expected` is the error."""
    try:
        if len(text.strip()) == 10:
            d = date.fromisoformat(text.strip())
            return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """An ISO date (midnight UTC), an ISO date-time (UTC unless it has an offset) or a duration from now."""
    if _DURATION_RE.match(text):
        return _shifted(now, text, 1)
    return _parse_instant(
        text, "expected an ISO date (2026-12-31), date-time (2026-12-31T18:00Z) or a duration (30d, 12h)"
    )


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """A point in the past for --since/--until: an ISO date or date-time as for --expires, or a
    duration *ago* ('1h' is an hour before now, '7d' a week)."""
    if _DURATION_RE.match(text):
        return _shifted(now, text, -1)
    return _parse_instant(
        text, "expected an ISO date (2026-03-01), date-time (2026-03-01T18:00Z) or a duration ago (1h, 7d)"
    )


def parse_limit(text: str) -> int:
    """A positive number of records."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()) or int(digits) < 1:
        raise argparse.ArgumentTypeError("expected a positive number of records")
    return int(digits)


def parse_grace(text: str) -> int:
    """Seconds, or a duration: '300', '10m', '1h'."""
    if text.strip().isdigit():
        return int(text)
    return int(parse_duration(text).total_seconds())


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --- settings, master key and store ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    """What every command resolved from flags and the environment."""

    json: bool
    settings: Settings
    env: dict[str, str]  # the environment as load_keyring should see it
    remote: str | None = None  # HOST:PORT of a sidecar's admin API: remote mode
    remote_tls: bool = False  # remote mode over TLS
    remote_ca: bytes | None = None  # the CA that signed the admin listener's certificate (None: system roots)


def _context(args: argparse.Namespace, *, local: bool = False, **overrides: Any) -> _Context:
    """Flags over the environment. `local`: a command that works on this host only, so
    $MCP_AUTHZ_SERVER does not apply (and `--server` was refused already)."""
    env = dict(os.environ)
    key_file = getattr(args, "master_key_file", None)
    if key_file:
        # An explicit flag wins over whatever the environment says.
        env.pop(ENV_KEY, None)
        env[ENV_KEY_FILE] = key_file
    settings = Settings.from_env(env, store_url=getattr(args, "store", None), **overrides)
    remote = None if local else _remote_target(args, env)
    tls, ca = False, None
    if remote is not None:
        ca_path = getattr(args, "ca", None) or env.get(ENV_CA) or None
        tls = bool(ca_path or getattr(args, "tls", False))
        ca = read_pem(ca_path, "CA certificate (--ca)") if ca_path else None
        if not tls and not is_local(remote):
            raise UsageError(
                "",
                f"--server {remote} is not on this host: your gateway key would cross the network in clear text. "
                f"Give --ca FILE (the CA that signed the admin listener's certificate; or ${ENV_CA}), or --tls "
                "to verify it against the system's roots.",
            )
    return _Context(bool(getattr(args, "json", False)), settings, env, remote, tls, ca)


def _remote_target(args: argparse.Namespace, env: dict[str, str]) -> str | None:
    """`--server HOST:PORT`, else $MCP_AUTHZ_SERVER, else None (local mode)."""
    target = getattr(args, "remote", None) or env.get(ENV_SERVER) or None
    if target is None:
        return None
    try:
        parse_hostport(target, "--server")
    except ConfigError:
        raise UsageError(
            "",
            "--server (or $MCP_AUTHZ_SERVER) is the sidecar's admin API address, HOST:PORT (e.g. 127.0.0.1:9002). "
            "Name an MCP server with --server-name after the command.",
        ) from None
    given = [f for f, n in (("--store", "store"), ("--master-key-file", "master_key_file")) if getattr(args, n, None)]
    if given:
        raise UsageError("", f"{' and '.join(given)} open a store locally: leave them out with --server.")
    return target


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite URL (`sqlite:///rel.db`, `sqlite:////abs.db`), else None."""
    if not url.startswith("sqlite://"):
        return None
    rest = url[len("sqlite://") :].split("?", 1)[0]
    if rest.startswith("/"):
        rest = rest[1:]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


def _default_key_path(store_url: str) -> Path:
    db = sqlite_path(store_url)
    return (db.parent if db is not None else Path(".")) / DEFAULT_KEY_FILE


def _key_configured(env: dict[str, str]) -> bool:
    return bool(env.get(ENV_KEY) or env.get(ENV_KEY_FILE))


def _load_keyring(ctx: _Context) -> Keyring:
    """The configured master key; failing that, the key file `init` writes beside a SQLite database."""
    env = ctx.env
    if not _key_configured(env):
        beside = _default_key_path(ctx.settings.store_url)
        if sqlite_path(ctx.settings.store_url) is not None and beside.exists():
            env = {**env, ENV_KEY_FILE: str(beside)}
    return load_keyring(env)


def _require_store(url: str) -> None:
    # Opening a missing SQLite file would silently create an empty database.
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise ConfigError(f"No store at {db}: run 'mcp-authz init' first, or pass --store.")


async def _open_store(url: str, *, create: bool = True) -> Store:
    from authz_server.store import open_store  # the store package is wired at run time

    return await open_store(url, create=create)


def _service(store: Store, keyring: Keyring, settings: Settings) -> AdminService:
    """The use cases on the local store, with the sidecar's settings (its signature header names)."""
    return AdminService(store, keyring, KeyHasher(settings.argon2), signature_header=settings.signature_header,
                        timestamp_header=settings.timestamp_header)  # fmt: skip


@contextlib.asynccontextmanager
async def _local_store(ctx: _Context) -> AsyncIterator[tuple[Store, Keyring]]:
    """An initialised local store and the master keyring, checked against it."""
    _require_store(ctx.settings.store_url)  # "run init first" says more than a missing key file
    keyring = _load_keyring(ctx)  # before opening the store: a missing key fails fast
    store = await _open_store(ctx.settings.store_url, create=False)  # a missing store or schema is not made
    try:
        await _service(store, keyring, ctx.settings).verify_master_key()
        await store.migrate()  # an older schema is upgraded, once the master key is known to fit
        yield store, keyring
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _admin_session(ctx: _Context) -> AsyncIterator[tuple[AdminOps, Actor]]:
    """The use cases and who runs them: in remote mode the sidecar's admin API, as the holder of
    the gateway key in $MCP_AUTHZ_KEY; else an initialised local store whose master key matches
    ours, as the operator (an admin)."""
    if ctx.remote is None:
        async with _local_store(ctx) as (store, keyring):
            yield _service(store, keyring, ctx.settings), Actor.operator()
        return
    key = _env_gateway_key(ctx.env, "Remote mode")
    from authz_server.admin.remote import RemoteAdmin  # gRPC only for remote mode

    async with RemoteAdmin(ctx.remote, key, tls=ctx.remote_tls, ca=ctx.remote_ca) as remote:
        yield remote, Actor.key_holder()


def _env_gateway_key(env: dict[str, str], who: str) -> Secret:
    """The caller's gateway key, from $MCP_AUTHZ_KEY only: a key on a command line leaks into shell history."""
    key = env.get(ENV_GATEWAY_KEY, "").strip()
    if not key:
        raise ConfigError(f"{who} needs your gateway key in ${ENV_GATEWAY_KEY} (never on the command line).")
    if not gateway_keys.looks_like_key(key):
        raise ConfigError(f"${ENV_GATEWAY_KEY} does not hold a gateway key (mgw_ followed by 32 letters and digits).")
    return Secret(key)


def _local_only(args: argparse.Namespace, what: str) -> None:
    """Refuse `--server` for a command that works on the local store or process only."""
    if getattr(args, "remote", None):
        raise UsageError("", f"{what} runs locally only: leave out --server.")


# --- reading secrets -------------------------------------------------------------------


def read_values(placeholders: Sequence[Placeholder], stdin: TextIO, server: str) -> dict[str, str]:
    """Placeholder values from stdin, never from argv.

    On a TTY: one hidden prompt per placeholder (optional ones may be left
    blank). Otherwise: a single bare line when the server has exactly one
    placeholder (`NAME=VALUE` is accepted too), else `NAME=VALUE` lines.
    Messages never echo what was read.
    """
    names = [p.name for p in placeholders]
    optional = {p.name for p in placeholders if not p.required}
    if stdin.isatty():
        values: dict[str, str] = {}
        for p in placeholders:
            hint = " (optional, Enter to skip)" if not p.required else ""
            value = getpass.getpass(f"{p.name} for {server}{hint}: ").strip()
            if value:
                values[p.name] = value
            elif p.required:
                raise InvalidInput(f"{p.name} is required.")
        if not values:
            raise InvalidInput("No values entered.")
        return values
    lines = [line.strip() for line in stdin.read().splitlines() if line.strip()]
    if not lines:
        raise InvalidInput(
            f"No values on stdin. Pipe them in: {'a single line' if len(names) == 1 else 'NAME=VALUE lines'} "
            f"for {', '.join(names)}."
        )
    if len(names) == 1:
        (name,) = names
        if len(lines) != 1:
            raise InvalidInput(f"Server {server} has one placeholder, {name}: give its value as a single line.")
        line = lines[0]
        if line.startswith(name + "="):
            line = line[len(name) + 1 :].strip()
        return {name: line}
    values = {}
    for i, line in enumerate(lines, 1):
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not PLACEHOLDER_NAME_RE.match(name):
            raise InvalidInput(f"Line {i} of stdin is not NAME=VALUE (placeholders of {server}: {', '.join(names)}).")
        if name in values:
            raise InvalidInput(f"{name} is given twice on stdin.")
        value = value.strip()
        if value or name not in optional:  # a blank optional value means "not set"
            values[name] = value
    return values


# --- commands -----------------------------------------------------------------------------



def _server_text(v: ServerView) -> str:
    lines = [
        f"name:         {v.name}",
        f"mode:         {v.mode}",
        f"description:  {v.description or '-'}",
        f"created:      {_when(v.created_at)}",
        f"updated:      {_when(v.updated_at)}",
        f"signing:      {'configured' if v.has_signing_secret else 'none'}",
        f"upstream:     {v.upstream_url or '-'}",
    ]
    if v.headers:
        lines.append("headers:")
        lines += [f"  {h}" for h in v.headers]
    if v.placeholders:
        lines.append("placeholders:")
        lines += [f"  {n} ({'required' if r else 'optional'})" for n, r in v.placeholders]
    if v.shared_status is not None:
        lines.append(f"shared values: {v.shared_status}")
        lines += [f"  {n} = {m}" for n, m in v.shared_masks]
    return "\n".join(lines)


def _servers_table(views: Sequence[ServerView]) -> str:
    rows = [
        [v.name, v.mode, ", ".join(n + ("" if r else "?") for n, r in v.placeholders) or "-", v.shared_status or "-",
         v.description or "-"]
        for v in views
    ]
    return _table(["NAME", "MODE", "PLACEHOLDERS", "SHARED", "DESCRIPTION"], rows, "(no servers)")


def _principals_table(views: Sequence[PrincipalView]) -> str:
    rows = [
        [v.name, v.id, v.kind, v.team, ",".join(v.roles), "disabled" if v.disabled else "enabled",
         str(v.rate_limit_per_minute) if v.rate_limit_per_minute else "-"]
        for v in views
    ]
    return _table(["NAME", "ID", "KIND", "TEAM", "ROLES", "STATE", "RATE/MIN"], rows, "(no principals)")


def _teams_table(views: Sequence[TeamView]) -> str:
    rows = [[v.name, "disabled" if v.disabled else "enabled", _when(v.created_at)] for v in views]
    return _table(["NAME", "STATE", "CREATED"], rows, "(no teams)")


def _keys_table(views: Sequence[GatewayKeyView]) -> str:
    rows = [
        [v.key_id, v.principal, v.label or "-", v.status, _when(v.created_at), _when(v.last_used_at),
         _when(v.expires_at), _when(v.revoked_at), ",".join(v.scope) or "*"]
        for v in views
    ]
    headers = ["KEY ID", "PRINCIPAL", "LABEL", "STATUS", "CREATED", "LAST USED", "EXPIRES", "REVOKED", "SCOPE"]
    return _table(headers, rows, "(no keys)")


def _overrides_table(views: Sequence[OverrideView]) -> str:
    rows = [
        [v.server, v.principal, v.kind, ", ".join(f"{n}={m}" for n, m in v.masks),
         f"{STATUS_INDICATORS.get(v.status, '?')} {v.status}", v.updated_by, _when(v.updated_at), _when(v.expires_at)]
        for v in views
    ]
    headers = ["SERVER", "PRINCIPAL", "KIND", "VALUES", "STATUS", "UPDATED BY", "UPDATED", "EXPIRES"]
    return _table(headers, rows, "(no overrides)")


def _status_table(views: Sequence[CredentialStatusView]) -> str:
    """The seed's key status table: one row per (server, principal), with its indicator."""
    rows = [
        [v.server, v.principal, v.kind, v.team, f"{v.indicator} {v.status}", v.source or "-",
         ", ".join(f"{n}={m}" for n, m in v.masks) or "-", v.updated_by or "-", _when(v.updated_at),
         _printable(v.reason)]
        for v in views
    ]
    headers = ["SERVER", "PRINCIPAL", "KIND", "TEAM", "STATUS", "SOURCE", "VALUES", "UPDATED BY", "UPDATED", "REASON"]
    legend = "  ".join(f"{i} {s}" for s, i in STATUS_INDICATORS.items())
    table = _table(headers, rows, "(no principals, or no server that takes credentials)")
    return f"{table}\n\n{legend}" if rows else table


def _audit_table(views: Sequence[AuditView]) -> str:
    rows = [
        [str(v.id or "-"), v.at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"), _printable(v.actor),
         _printable(v.action), _printable(v.target), _printable(v.outcome), _printable(v.request_id),
         _printable(" ".join(f"{k}={val}" for k, val in v.details))]
        for v in views
    ]
    headers = ["ID", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "REQUEST ID", "DETAILS"]
    return _table(headers, rows, "(no audit events)")


def _printable(text: str) -> str:
    # Tool names, methods and request ids come from clients: no terminal escapes in a table.
    return "".join("?" if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text) or "-"


def _usage_table(views: Sequence[UsageView]) -> str:
    rows = [
        [v.at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"), _printable(v.principal),
         _printable(v.key_id), _printable(v.server), _printable(v.mcp_method), _printable(v.tool),
         v.decision + (f" ({_printable(v.reason)})" if v.reason else ""),
         str(v.upstream_status) if v.upstream_status else "-", str(v.request_bytes), str(v.response_bytes),
         f"{v.duration_ms:.1f}", _printable(v.request_id)]
        for v in views
    ]
    headers = ["TIME", "PRINCIPAL", "KEY ID", "SERVER", "METHOD", "TOOL", "DECISION", "STATUS", "BYTES IN",
               "BYTES OUT", "MS", "REQUEST ID"]
    return _table(headers, rows, "(no usage records)")


def _key_line(v: GatewayKeyView) -> str:
    extra = []
    if v.label:
        extra.append(f"label {v.label!r}")
    if v.expires_at:
        extra.append(f"expires {_when(v.expires_at)}")
    if v.scope:
        extra.append(f"scope {','.join(v.scope)}")
    return f"key {v.key_id} for {v.principal}" + (f" ({'; '.join(extra)})" if extra else "")


Handler = Callable[[AdminOps, Actor, argparse.Namespace], Awaitable[Rendered]]


async def _servers_add(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    optional = {n for item in a.optional for n in _csv(item)}
    view, signing = await admin.add_server(me, a.name, a.mode, a.header, optional, a.description, a.upstream_url)
    text = f"Added server {view.name} ({view.mode}).\n\n"
    text += _once_block("Signing secret for upstream verification", signing)
    if view.mode == AuthMode.SHARED.value:
        text += f"\n\nSet its shared values with: mcp-authz servers set-shared {view.name} < values.txt"
    return Rendered({"server": view.to_json(), "signing_secret": signing.reveal()}, text)


async def _servers_list(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    views = await admin.list_servers(me)
    return Rendered({"servers": [v.to_json() for v in views]}, _servers_table(views))


async def _servers_show(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    view = await admin.show_server(me, a.name)
    return Rendered({"server": view.to_json()}, _server_text(view))


async def _servers_update(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    def names(items: list[str] | None) -> set[str] | None:
        return None if items is None else {n for item in items for n in _csv(item)}

    view, issues = await admin.update_server(
        me, a.name, upstream_url=a.upstream_url, description=a.description, mode=a.mode, headers=a.header,
        optional=names(a.optional), required=names(a.required),
    )  # fmt: skip
    text = f"Updated server {view.name}.\n\n{_server_text(view)}"
    if issues:
        text += (f"\n\n{len(issues)} override(s) no longer fit and are now missing (kept, not deleted):\n"
                 + "\n".join(f"  {i.principal}: needs {', '.join(i.missing)}" for i in issues))  # fmt: skip
    return Rendered({"server": view.to_json(), "incompatible": [i.to_json() for i in issues]}, text)


async def _servers_set_shared(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    server = await _form_for_input(admin, me, a.name)
    # Unknown server or wrong mode: let the use case refuse (and audit) before reading any secret.
    shared = server is not None and server.mode == AuthMode.SHARED.value
    values = read_values(server.placeholders, sys.stdin, a.name) if server and shared else {}
    view = await admin.set_shared(me, a.name, values)
    return Rendered(
        {"server": view.to_json()},
        f"Set shared values of {view.name}: " + ", ".join(f"{n}={m}" for n, m in view.shared_masks),
    )


async def _servers_remove(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    await admin.remove_server(me, a.name)
    return Rendered({"removed": {"server": a.name}}, f"Removed server {a.name} and its overrides.")


async def _servers_rotate(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    signing = await admin.rotate_signing_secret(me, a.name)
    return Rendered(
        {"server": a.name, "signing_secret": signing.reveal()},
        f"Rotated the signing secret of {a.name}; the old one no longer signs.\n\n"
        + _once_block("New signing secret", signing),
    )


async def _principals_add(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    view = await admin.add_principal(me, a.name, a.team, _csv(a.roles), a.kind, a.rate_limit)
    return Rendered(
        {"principal": view.to_json()},
        f"Added {view.kind} {view.name} ({view.id}) to team {view.team} with roles {','.join(view.roles)}.\n"
        f"Create a key with: mcp-authz keys create {view.name} --label LABEL",
    )


async def _principals_list(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    views = await admin.list_principals(me, a.team)
    return Rendered({"principals": [v.to_json() for v in views]}, _principals_table(views))


async def _principals_update(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    roles = None if a.roles is None else _csv(a.roles)
    view = await admin.update_principal(me, a.name, roles=roles, team=a.team, kind=a.kind,
                                        rate_limit_per_minute=a.rate_limit)  # fmt: skip
    return Rendered({"principal": view.to_json()}, f"Updated principal {view.name}.\n\n{_principals_table([view])}")


async def _principals_delete(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    gone = await admin.delete_principal(me, a.name)
    return Rendered(
        {"deleted": gone.to_json()},
        f"Deleted principal {gone.name} ({gone.id}): {gone.keys_revoked} key(s) revoked, "
        f"{gone.overrides_deleted} override(s) deleted. Its audit events and usage records are kept.",
    )


async def _teams_list(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    views = await admin.list_teams(me)
    return Rendered({"teams": [v.to_json() for v in views]}, _teams_table(views))


def _toggle(kind: str, disabled: bool) -> Handler:
    """`principals disable|enable` and `teams disable|enable`: every key of the principal, or of
    every principal in the team, is refused while it is disabled."""
    whose = "this principal" if kind == "principal" else "every principal in it"

    async def handler(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
        toggle = admin.set_principal_disabled if kind == "principal" else admin.set_team_disabled
        view = await toggle(me, a.name, disabled)
        state = "Disabled" if disabled else "Enabled"
        note = f" Every key of {whose} is refused." if disabled else ""
        return Rendered({kind: view.to_json()}, f"{state} {kind} {view.name}.{note}")

    return handler


async def _keys_create(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    scope = [s for item in a.servers for s in _csv(item)]
    view, key = await admin.create_key(me, a.principal, a.label, a.expires, scope)
    return Rendered(
        {"key": view.to_json(), "api_key": key.reveal()},
        f"Created {_key_line(view)}.\n\n" + _once_block("Gateway key", key),
    )


async def _keys_list(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    views = await admin.list_keys(me, a.principal)
    return Rendered({"keys": [v.to_json() for v in views]}, _keys_table(views))


async def _keys_revoke(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    view = await admin.revoke_key(me, a.key_id)
    text = f"Revoked key {view.key_id} of {view.principal} at {_when(view.revoked_at)}."
    return Rendered({"key": view.to_json()}, text)


async def _keys_regenerate(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    view, key = await admin.regenerate_key(me, a.key_id, a.grace)
    old = (
        f"The old key {a.key_id} stops working in {a.grace} seconds."
        if a.grace
        else f"The old key {a.key_id} is revoked now."
    )
    return Rendered(
        {"key": view.to_json(), "api_key": key.reveal(), "replaced": a.key_id, "grace_seconds": a.grace},
        f"Created {_key_line(view)}. {old}\n\n" + _once_block("Gateway key", key),
    )


async def _overrides_set(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    server = await _form_for_input(admin, me, a.server_name)
    ok = server is not None and server.mode != AuthMode.NONE.value
    values = read_values(server.placeholders, sys.stdin, a.server_name) if ok and server else {}
    view = await admin.set_override(me, a.principal, a.server_name, values, a.expires)
    return Rendered(
        {"override": view.to_json()},
        f"Set the override of {view.principal} for {view.server}: "
        + ", ".join(f"{n}={m}" for n, m in view.masks),
    )


async def _overrides_list(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    views = await admin.list_overrides(me, a.server_name, a.principal)
    return Rendered({"overrides": [v.to_json() for v in views]}, _overrides_table(views))


async def _overrides_delete(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    await admin.delete_override(me, a.principal, a.server_name)
    return Rendered(
        {"deleted": {"principal": a.principal, "server": a.server_name}},
        f"Deleted the override of {a.principal} for {a.server_name}." if a.principal
        else f"Deleted your override for {a.server_name}.",
    )


async def _overrides_status(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    views = await admin.credential_status(me, a.server_name, a.principal)
    return Rendered({"statuses": [v.to_json() for v in views]}, _status_table(views))


async def _overrides_test(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    view = await admin.test_override(me, a.server_name, a.principal)
    verdict = {
        "ok": "the upstream accepted it",
        "rejected": "the upstream REJECTED it: it is marked invalid",
        "inconclusive": "inconclusive, the status is unchanged",
    }.get(view.result, view.result)
    indicator = STATUS_INDICATORS.get(view.status, "?")
    return Rendered(
        {"test": view.to_json()},
        f"Tested the credential of {view.principal} for {view.server}: {verdict} ({view.detail}).\n"
        f"Status: {indicator} {view.status}",
    )


async def _whoami(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    who = await admin.whoami(me)
    text = f"{who.name} ({who.id}), {who.kind}" + (f" in team {who.team}" if who.team else "")
    return Rendered({"whoami": who.to_json()}, f"{text}, roles {','.join(who.roles)}")


async def _backup(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    """A consistent copy of the local SQLite store, taken while sidecars run (README, "Backup and restore")."""
    from authz_server.store.sqlite import backup  # the store package is wired at run time

    ctx = _context(a, local=True)
    source = sqlite_path(ctx.settings.store_url)
    if source is None:
        raise ConfigError("Only a SQLite store is backed up by mcp-authz; back up PostgreSQL with pg_dump "
                          "(README, \"Backup and restore\"), and keep the master key with it.")  # fmt: skip
    size = await asyncio.to_thread(backup, str(source), a.out)
    key_file = ctx.env.get(ENV_KEY_FILE, "") or "your master key file"
    text = (f"Backed up {source} to {a.out} ({size} bytes, mode 0600). It is useless without the master key "
            f"({key_file}), and with it anyone can read every credential: keep the two apart, both safe.")
    return Rendered({"store": str(source), "backup": a.out, "bytes": size}, text)


# --- connect: client configuration (README, "Connect a client") ---
ENV_GATEWAY_URL = "MCP_AUTHZ_GATEWAY_URL"  # the gateway's base URL, as clients reach it


async def _connect(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    env = dict(os.environ)
    gateway = a.gateway_url or env.get(ENV_GATEWAY_URL) or clients.DEFAULT_GATEWAY_URL
    key = _env_gateway_key(env, "--key-from-env") if a.key_from_env else None
    configs = [clients.generate(gateway, a.server_name, c, key) for c in ([a.client] if a.client else clients.CLIENTS)]
    await admin.server_form(me, a.server_name)  # any principal may: an unknown server is NOT_FOUND
    doc = {c.client: c.to_json() for c in configs}
    if a.client:  # exactly the text, ready to paste or pipe; what to do with it goes to stderr
        if not getattr(a, "json", False):
            print(configs[0].instruction, file=sys.stderr)
        return Rendered(doc, configs[0].text.rstrip("\n"))
    blocks = [f"== {c.title}" + (f": {c.file}" if c.file else "") + f" ==\n{c.instruction}\n\n{c.text}" for c in configs]
    return Rendered(doc, "\n".join(blocks).rstrip("\n"))


async def _audit_query(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    limit = a.limit or DEFAULT_LIMIT
    views = await admin.query_audit(me, a.actor, a.action, a.target, a.since, a.until, limit)
    text = _audit_table(views)
    if len(views) == limit:
        text += f"\n(the oldest {limit} matching events; there may be more: narrow the filters, raise --limit, or --export)"
    return Rendered({"events": [v.to_json() for v in views], "limit": limit}, text)


async def _usage_query(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    limit = a.limit or DEFAULT_LIMIT
    views = await admin.query_usage(me, a.principal, a.server_name, a.tool, a.since, a.until, limit)
    text = _usage_table(views)
    if len(views) == limit:
        text += (
            f"\n(the oldest {limit} matching records; there may be more: narrow with --since/--until, "
            "raise --limit, or use --export)"
        )
    return Rendered({"usage": [v.to_json() for v in views], "limit": limit}, text)


async def _usage_prune(admin: AdminOps, me: Actor, a: argparse.Namespace) -> Rendered:
    before = datetime.now(timezone.utc) - a.older_than
    pruned = await admin.prune_usage(me, before)
    return Rendered(
        {"pruned": pruned, "before": before.isoformat().replace("+00:00", "Z")},
        f"Deleted {pruned} usage record{'' if pruned == 1 else 's'} older than {_when(before)}.",
    )


def _cmd_usage_export(args: argparse.Namespace) -> int:
    """Usage records as JSON lines on stdout, one record each, written page by page as the store is read."""

    async def pages(admin: AdminOps, me: Actor) -> AsyncIterator[list[Any]]:
        return await admin.export_usage(me, args.principal, args.server_name, args.tool, args.since, args.until,
                                        args.limit)  # fmt: skip

    return _export(args, pages, "usage record")


def _cmd_audit_export(args: argparse.Namespace) -> int:
    """The audit trail as JSON lines, page by page."""

    async def pages(admin: AdminOps, me: Actor) -> AsyncIterator[list[Any]]:
        return await admin.export_audit(me, args.actor, args.action, args.target, args.since, args.until, args.limit)

    return _export(args, pages, "audit event")


def _export(
    args: argparse.Namespace, start: Callable[[AdminOps, Actor], Awaitable[AsyncIterator[list[Any]]]], what: str
) -> int:
    ctx = _context(args)

    async def go() -> int:
        count = 0
        async with _admin_session(ctx) as (admin, me):
            async for page in await start(admin, me):
                sys.stdout.write("".join(json.dumps(v.to_json(), separators=(",", ":")) + "\n" for v in page))
                sys.stdout.flush()
                count += len(page)
        return count

    try:
        count = asyncio.run(go())
    except BrokenPipeError:
        # The reader stopped early (`| head`): not an error, and nothing more to write.
        _discard_stdout()
        return 0
    if sys.stderr.isatty():
        print(f"Exported {count} {what}{'' if count == 1 else 's'}.", file=sys.stderr)
    return 0


def _discard_stdout() -> None:
    # Point stdout at /dev/null so the interpreter's final flush does not fail again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _cmd_usage(args: argparse.Namespace) -> int:
    if args.export:
        return _cmd_usage_export(args)
    return _run_managed(_usage_query)(args)


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.export:
        return _cmd_audit_export(args)
    return _run_managed(_audit_query)(args)


def _cmd_usage_prune(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    run = _run_managed(_usage_prune, local_only="usage prune")

    def cmd(args: argparse.Namespace) -> int:
        # `usage --principal x prune` would delete everyone's records: refuse filters rather than ignore them.
        given = [
            f"--{n.replace('_name', '')}"
            for n in ("principal", "server_name", "tool", "since", "until", "limit")
            if getattr(args, n)
        ]
        if args.export:
            given.append("--export")
        if given:
            parser.error(f"usage prune deletes by age only, for everyone: remove {', '.join(given)}")
        return run(args)

    return cmd


async def _form_for_input(admin: AdminOps, me: Actor, name: str) -> ServerFormView | None:
    """Which placeholders to read from stdin; None when the server is unknown or the name
    invalid, so the use case itself refuses (and audits) before any secret is read."""
    if not NAME_RE.match(name):
        return None
    try:
        return await admin.server_form(me, name)
    except AuthzError as exc:
        if exc.reason in ("not_found", "invalid_input"):
            return None
        raise


def _run_managed(handler: Handler, local_only: str = "") -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if local_only:
            _local_only(args, local_only)
        ctx = _context(args, local=bool(local_only))

        async def go() -> Rendered:
            async with _admin_session(ctx) as (admin, me):
                return await handler(admin, me, args)

        _emit(ctx.json, asyncio.run(go()))
        return 0

    return run


def _emit(json_mode: bool, result: Rendered) -> None:
    if json_mode:
        print(json.dumps(result.doc, indent=2), file=sys.stdout)
    else:
        print(result.text, file=sys.stdout)


# --- init, serve, run ------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    _local_only(args, "init")
    ctx = _context(args, local=True)
    for name, what in ((args.admin_name, "admin"), (args.team, "team")):
        if not NAME_RE.match(name):
            # Checked before a key file is written, so a typo leaves nothing behind.
            raise InvalidInput(f"The {what} name is invalid: use lowercase letters, digits, '.', '_' or '-'.")

    async def go() -> Rendered:
        url = ctx.settings.store_url
        try:
            store = await _open_store(url, create=False)  # one that exists already: its state decides
            keyring, new_key = None, None
        except ConfigError:  # none yet: settle the master key first, so a bad one leaves no empty store behind
            keyring, new_key = _init_keyring(ctx)
            store = await _open_store(url)
        try:
            await store.migrate()
            if await store.get_key_checks():
                raise Conflict(
                    "The store is already initialised. Use the existing admin key, or create another with "
                    "'mcp-authz keys create'."
                )
            if keyring is None:
                keyring, new_key = _init_keyring(ctx)
            written = _write_new_key(*new_key) if new_key else None
            svc = _service(store, keyring, ctx.settings)
            principal, view, key = await svc.initialize(Actor.operator(), args.admin_name, args.team)
        finally:
            await store.close()
        doc = {
            "store": ctx.settings.store_url,
            "master_key_file": str(written) if written else None,
            "principal": PrincipalView.of(principal).to_json(),
            "key": view.to_json(),
            "api_key": key.reveal(),
        }
        lines = [f"Initialised the store {ctx.settings.store_url}."]
        if written:
            lines.append(
                f"Generated a master key and wrote it to {written} (mode 0600). Back it up: without it the "
                f"stored credentials cannot be decrypted. Point the sidecar at it with {ENV_KEY_FILE}={written}."
            )
        lines.append(f"Created admin {principal.name} ({principal.id}) in team {principal.team}.")
        lines.append("")
        lines.append(_once_block(f"Admin gateway key ({view.key_id})", key))
        return Rendered(doc, "\n".join(lines))

    _emit(ctx.json, asyncio.run(go()))
    return 0


def _init_keyring(ctx: _Context) -> tuple[Keyring, tuple[Path, str] | None]:
    """The configured master key; else a new one and the 0600 file to write it to, checked but not yet
    written (`_write_new_key`, once the store has taken the initialisation). Returns (keyring, new key)."""
    env = ctx.env
    path_text = env.get(ENV_KEY_FILE, "")
    if env.get(ENV_KEY) or (path_text and Path(path_text).exists()):
        return load_keyring(env), None
    path = Path(path_text) if path_text else _default_key_path(ctx.settings.store_url)
    if not path_text and path.exists():
        raise ConfigError(
            f"{path} exists already but no master key is configured; pass --master-key-file {path} to use it."
        )
    if not path.parent.is_dir():
        raise ConfigError(f"Cannot write the master key file {path}: its directory does not exist.")
    spec = Keyring.generate_spec()
    return Keyring.from_spec(spec), (path, spec)


def _write_new_key(path: Path, spec: str) -> Path:
    try:
        write_key_file(path, spec)
    except OSError as exc:
        raise ConfigError(f"Cannot write the master key file {path}: {exc.strerror}.") from None
    return path


def _serve_settings(args: argparse.Namespace) -> tuple[Settings, Keyring]:
    _local_only(args, args.command)
    env = os.environ
    ctx = _context(
        args,
        local=True,
        listen=args.listen,
        admin_listen=args.admin_listen,
        metrics_listen=args.metrics_listen,
        key_header=args.key_header,
        poll_interval=args.poll_interval,
        drain_seconds=args.drain,
        # A flag wins over its variable, one file at a time.
        check_tls=TlsFiles.of(args.tls_cert or env.get("MCP_AUTHZ_TLS_CERT"), args.tls_key or env.get("MCP_AUTHZ_TLS_KEY"),
                              args.client_ca or env.get("MCP_AUTHZ_CLIENT_CA"), "--tls-cert, --tls-key"),
        admin_tls=TlsFiles.of(args.admin_tls_cert or env.get("MCP_AUTHZ_ADMIN_TLS_CERT"),
                              args.admin_tls_key or env.get("MCP_AUTHZ_ADMIN_TLS_KEY"), None,
                              "--admin-tls-cert, --admin-tls-key"),
        insecure_check_listener=args.insecure_check_listener or None,
        insecure_admin_listener=args.insecure_admin_listener or None,
        console_listen=args.console_listen,
        insecure_console_listener=args.insecure_console_listener or None,
    )  # fmt: skip
    return ctx.settings, _load_keyring(ctx)


@contextlib.contextmanager
def _refusing_to_start() -> Iterator[None]:
    """A store the sidecar cannot open or read is a refusal to start, like a bad setting: exit 2."""
    try:
        yield
    except StoreError as exc:
        refusal = ConfigError(exc.message)
        refusal.reason = exc.reason
        raise refusal from None


def _cmd_serve(args: argparse.Namespace) -> int:
    settings, keyring = _serve_settings(args)
    from authz_server import app  # imported here: the management commands do not need gRPC

    with _refusing_to_start():
        asyncio.run(app.serve(settings, keyring))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    settings, keyring = _serve_settings(args)
    config = Path(args.envoy_config or os.environ.get(ENV_ENVOY_CONFIG) or DEFAULT_ENVOY_CONFIG)
    from authz_server import app

    with _refusing_to_start():
        asyncio.run(app.run_with_envoy(settings, keyring, envoy_config=config))
    return 0


# --- master-key ------------------------------------------------------------------------------


def _run_master_key(
    handler: Callable[[MasterKeyAdmin, Actor, argparse.Namespace], Awaitable[Rendered]],
) -> Callable[[argparse.Namespace], int]:
    """A `master-key` verb: local only, on the store whose check values the key file opens."""

    def run(args: argparse.Namespace) -> int:
        _local_only(args, f"master-key {args.action}")
        ctx = _context(args, local=True)

        async def go() -> Rendered:
            async with _local_store(ctx) as (store, keyring):
                admin = MasterKeyAdmin(store, keyring, KeyHasher(ctx.settings.argon2))
                return await handler(admin, Actor.operator(), args)

        result = asyncio.run(go())
        _emit(ctx.json, result)
        return 0 if result.doc.get("complete", True) else 1  # rotate: rows it could not move are an error

    return run


def _key_file_of(keyring: Keyring, verb: str) -> Path:
    if keyring.source is None:
        raise ConfigError(
            f"master-key {verb} changes the key file: give it with --master-key-file (or ${ENV_KEY_FILE}); "
            f"a key in ${ENV_KEY} cannot be changed in place."
        )
    return keyring.source


def _rewrite_key_file(admin: MasterKeyAdmin, path: Path, spec: str) -> Keyring:
    """Replace the key file (atomically, 0600) and use the new keyring from now on."""
    fresh = Keyring.from_spec(spec, path)
    try:
        replace_key_file(path, spec)
    except OSError as exc:
        raise ConfigError(f"Cannot write the master key file {path}: {exc.strerror}.") from None
    admin.keyring.adopt(fresh)
    return fresh


def _versions_text(versions: Sequence[int]) -> str:
    return ", ".join(str(v) for v in versions)


async def _master_key_add(admin: MasterKeyAdmin, me: Actor, a: argparse.Namespace) -> Rendered:
    path = _key_file_of(admin.keyring, "add")
    spec, version = spec_with_new_version(read_key_file(path), above=await admin.stored_versions(), active=not a.standby)
    ring = _rewrite_key_file(admin, path, spec)
    await admin.record_versions(me, version)
    next_step = (f"mcp-authz master-key activate --version {version}" if a.standby else "mcp-authz master-key rotate")
    what = ("on standby: it opens values but seals none until 'activate'" if a.standby
            else "it seals every new value from now on")  # fmt: skip
    return _key_file_changed(path, ring, {"added_version": version},
                             f"Added master key version {version} to {path} (mode 0600), {what}.", next_step)


async def _master_key_activate(admin: MasterKeyAdmin, me: Actor, a: argparse.Namespace) -> Rendered:
    path = _key_file_of(admin.keyring, "activate")
    ring = _rewrite_key_file(admin, path, spec_activating(read_key_file(path), a.version))
    await admin.record_versions(me, a.version, "master_key.activate")
    return _key_file_changed(path, ring, {"activated_version": a.version},
                             f"Master key version {a.version} seals every new value from now on.",
                             "mcp-authz master-key rotate")  # fmt: skip


def _key_file_changed(path: Path, ring: Keyring, doc: dict[str, Any], done: str, next_step: str) -> Rendered:
    versions = sorted(ring.versions, reverse=True)
    text = (f"{done} Versions in {path}: {_versions_text(versions)} (active: {ring.active}).\n"
            "Running sidecars that read this file re-read it within a second (or on SIGHUP) and log "
            "'master keyring reloaded'; copy it to sidecars on other hosts.\n"
            f"Next, once every sidecar has: {next_step}")  # fmt: skip
    return Rendered({"key_file": str(path), **doc, "active_version": ring.active, "versions": versions}, text)


async def _master_key_rotate(admin: MasterKeyAdmin, me: Actor, a: argparse.Namespace) -> Rendered:
    report = await admin.rotate(me, a.batch)
    status = await admin.status(me)
    old = [v.version for v in status.versions if v.version < status.active and v.in_keyring]
    lines = [f"Re-encrypted {report.resealed[Entity.SERVER]} server(s) and {report.resealed[Entity.OVERRIDE]} "
             f"override(s) under master key version {report.active}, in {report.batches} batch(es); "
             f"{report.current} row(s) were current already."]  # fmt: skip
    lines += [f"Not re-encrypted (unreadable): {u}" for u in report.unreadable]
    if report.changed_meanwhile:
        lines.append(f"{report.changed_meanwhile} row(s) kept changing meanwhile: run 'mcp-authz master-key rotate' again.")
    lines.append(f"Rows still under an older version: {status.old_rows}.")
    if not status.old_rows and old:
        lines.append(f"Nothing uses version {_versions_text(old)} any more: "
                     + "; ".join(f"mcp-authz master-key retire --version {v}" for v in old))  # fmt: skip
    doc = {**report.to_json(), "rows_under_old_versions": status.old_rows, "complete": not status.old_rows}
    return Rendered(doc, "\n".join(lines))


async def _master_key_status(admin: MasterKeyAdmin, me: Actor, a: argparse.Namespace) -> Rendered:
    status = await admin.status(me)
    where = str(admin.keyring.source) if admin.keyring.source else f"${ENV_KEY}"
    rows = [[str(v.version), "yes" if v.active else "", "yes" if v.in_keyring else "no", "yes" if v.in_store else "no",
             str(v.servers), str(v.overrides)] for v in status.versions]  # fmt: skip
    table = _table(["VERSION", "ACTIVE", "IN KEY FILE", "IN STORE", "SERVERS", "OVERRIDES"], rows, "(no versions)")
    tail = ("Every sealed value is under the active version." if not status.old_rows else
            f"{status.old_rows} row(s) under an older version: run 'mcp-authz master-key rotate'.")  # fmt: skip
    return Rendered({"key_file": where, **status.to_json()}, f"Master key: {where}\n{table}\n{tail}")


async def _master_key_retire(admin: MasterKeyAdmin, me: Actor, a: argparse.Namespace) -> Rendered:
    path = _key_file_of(admin.keyring, "retire")
    await admin.retire(me, a.version)  # refuses while any row uses it, or while it seals
    spec = read_key_file(path)
    in_file = a.version in Keyring.from_spec(spec).versions
    if in_file:
        spec = spec_without_version(spec, a.version)
        _rewrite_key_file(admin, path, spec)
    versions = sorted(admin.keyring.versions, reverse=True)
    doc = {"key_file": str(path), "retired_version": a.version, "versions": versions}
    text = (f"Retired master key version {a.version}: "
            f"{'removed from ' + str(path) + ' and' if in_file else 'it was not in ' + str(path) + '; removed from'} "
            f"the store's check values. Versions in the file: {_versions_text(versions)}.\n"
            "Running sidecars drop it when they re-read the file. A backup of the store taken before the "
            "rotation still needs the old key file.")  # fmt: skip
    return Rendered(doc, text)


def _parse_version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("a master key version is a positive whole number")
    return int(text)


def _parse_batch(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError("a batch is 1 to 10000 rows")
    return int(text)


# --- certs ---------------------------------------------------------------------------------


def _parse_cert_host(text: str) -> str:
    """A --host value: a DNS name or an IP address (checked as a certificate entry would be)."""
    from authz_server.crypto.certs import parse_host

    try:
        parse_host(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def _parse_cert_client_name(text: str) -> str:
    from authz_server.crypto.certs import parse_client_name

    try:
        return parse_client_name(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _parse_cert_days(text: str) -> int:
    from authz_server.crypto.certs import MAX_DAYS

    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"expected a whole number of days from 1 to {MAX_DAYS}")
    return int(digits)


def _cmd_certs_create(args: argparse.Namespace) -> int:
    """A private CA (or the one already in --out) and server and client certificates. Local
    only, no store or master key; prints paths and next steps, never key material."""
    _local_only(args, "certs create")
    from authz_server.crypto import certs  # cryptography's x509 only for this command

    hosts = args.host or list(certs.DEFAULT_HOSTS)
    result = certs.write_cert_set(
        Path(args.out), hosts, client_name=args.client_name, days=args.days, ca_days=args.ca_days,
        force=args.force, new_ca=args.new_ca,
    )
    d = result.directory

    def f(name: str) -> str:
        return str(d / name)

    serve = (
        f"mcp-authz serve --listen HOST:PORT --tls-cert {f(certs.SERVER_CERT)} --tls-key {f(certs.SERVER_KEY)} "
        f"--client-ca {f(certs.CA_CERT)}"
    )
    admin = f"--admin-listen HOST:PORT --admin-tls-cert {f(certs.SERVER_CERT)} --admin-tls-key {f(certs.SERVER_KEY)}"
    remote = f"mcp-authz --server ADMIN_HOST:PORT --ca {f(certs.CA_CERT)} COMMAND"
    envoy = (
        f"Envoy: the sidecar's cluster transport_socket (UpstreamTlsContext) presents {f(certs.CLIENT_CERT)} and "
        f"{f(certs.CLIENT_KEY)}, and validates the sidecar against {f(certs.CA_CERT)} (sni: one of the hosts above)."
    )
    until = result.server.not_valid_after_utc
    doc = {
        "directory": str(d),
        "written": [str(p) for p in result.written],
        "ca": {"reused": result.ca_reused, "cert": f(certs.CA_CERT), "key": f(certs.CA_KEY),
               "not_after": result.ca.not_valid_after_utc.isoformat().replace("+00:00", "Z")},
        "server": {"cert": f(certs.SERVER_CERT), "key": f(certs.SERVER_KEY), "hosts": list(result.hosts),
                   "not_after": until.isoformat().replace("+00:00", "Z")},
        "client": {"cert": f(certs.CLIENT_CERT), "key": f(certs.CLIENT_KEY), "name": result.client_name,
                   "not_after": result.client.not_valid_after_utc.isoformat().replace("+00:00", "Z")},
        "next_steps": {"serve": serve, "admin_tls_flags": admin, "remote_cli": remote, "envoy": envoy},
    }
    ca_line = (
        f"Reused the CA in {d} ({certs.CA_CERT}, {certs.CA_KEY}): it is unchanged."
        if result.ca_reused
        else f"Created a private CA, valid until {_when(result.ca.not_valid_after_utc)}."
    )
    lines = [
        ca_line,
        f"Issued a server certificate for {', '.join(result.hosts)} and a client certificate for "
        f"{result.client_name}, valid until {_when(until)}.",
        "",
        "Wrote (private keys 0600, certificates 0644):",
        *(f"  {p}" for p in result.written),
        "",
        "Next steps:",
        "  Check and access logs over mutual TLS (Envoy on another host):",
        f"    {serve}",
        "  The admin API over TLS: add",
        f"    {admin}",
        "  The remote CLI verifies the admin listener with:",
        f"    {remote}",
        f"  {envoy}",
        f"  Keep {f(certs.CA_KEY)} off the servers: it is needed only to issue more certificates "
        f"(run this again with the same --out).",
    ]
    _emit(bool(getattr(args, "json", False)), Rendered(doc, "\n".join(lines)))
    return 0


# --- the parser ------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    # SUPPRESS defaults: the options may appear before or after the subcommand
    # without a subparser's default clobbering a value given earlier.
    common = _Parser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    g.add_argument(
        "--store",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="store URL (default: $MCP_AUTHZ_STORE, else sqlite:///mcp-authz.db)",
    )
    g.add_argument(
        "--master-key-file",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"master key file, mode 0600 (default: ${ENV_KEY_FILE}; ${ENV_KEY} also works)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog=PROG,
        parents=[common],
        description="Envoy ext_authz sidecar for MCP traffic: manage servers, principals, keys and overrides.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--server",
        dest="remote",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help=f"run the command on the sidecar's admin API at HOST:PORT (its --admin-listen), as the principal whose "
        f"gateway key is in ${ENV_GATEWAY_KEY} (default: ${ENV_SERVER}; unset: local mode). Goes before the command",
    )
    parser.add_argument("--ca", metavar="PEM", default=argparse.SUPPRESS,
                        help=f"with --server: TLS, verifying the admin listener's certificate against this CA "
                             f"(default: ${ENV_CA})")
    parser.add_argument("--tls", action="store_true", default=argparse.SUPPRESS,
                        help="with --server: TLS, verifying the certificate against the system's roots")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def server_name(p: argparse.ArgumentParser, required: bool, help_text: str = "the MCP server's name") -> None:
        # --server-name, as in remote mode; --server still works after the command (local habit).
        p.add_argument("--server-name", "--server", dest="server_name", metavar="NAME", required=required,
                       help=help_text)

    def leaf(
        group: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def group(name: str, help_text: str) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        return p.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = leaf(sub, "init", "migrate the store, create the master key if needed and the first admin key", _cmd_init)
    p.add_argument("--admin-name", default="admin", help="name of the first admin (default: admin)")
    p.add_argument("--team", default="default", help="team of the first admin (default: default)")

    for name, func, text in (
        ("serve", _cmd_serve, "run the ext_authz gRPC sidecar"),
        ("run", _cmd_run, "run the sidecar and Envoy together (local use)"),
    ):
        p = leaf(sub, name, text, func)
        p.add_argument("--listen", metavar="ADDRESS",
                       help="Check, access-log and health gRPC listener, for Envoy alone: HOST:PORT or unix:/path "
                            "(default: 127.0.0.1:9001). Beyond this host it needs mutual TLS")
        p.add_argument("--tls-cert", metavar="PEM", help="Check listener's certificate (mutual TLS)")
        p.add_argument("--tls-key", metavar="PEM", help="its private key, mode 0600")
        p.add_argument("--client-ca", metavar="PEM", help="CA that signed Envoy's client certificate")
        p.add_argument("--insecure-check-listener", action="store_true",
                       help="allow --listen beyond this host without mutual TLS (only where a network policy "
                            "already lets nothing but Envoy reach it)")
        p.add_argument("--admin-listen", metavar="ADDRESS",
                       help="admin API gRPC listener: HOST:PORT or unix:/path (default: 127.0.0.1:9002; '' turns it "
                            "off). Beyond this host it needs TLS")
        p.add_argument("--admin-tls-cert", metavar="PEM", help="admin listener's certificate (server TLS)")
        p.add_argument("--admin-tls-key", metavar="PEM", help="its private key, mode 0600")
        p.add_argument("--insecure-admin-listener", action="store_true",
                       help="allow --admin-listen beyond this host without TLS (when something else encrypts it)")
        p.add_argument("--console-listen", metavar="HOST:PORT",
                       help="web console HTTP listener, reached through Envoy's /console/ route (default: "
                            "127.0.0.1:9003; '' turns it off). Beyond this host it needs --insecure-console-listener")
        p.add_argument("--insecure-console-listener", action="store_true",
                       help="allow --console-listen beyond this host (when something else encrypts it)")
        p.add_argument("--key-header", metavar="H", help="custom header a gateway key may come in (default: x-api-key)")
        p.add_argument("--poll-interval", metavar="S", type=float, help="seconds between store polls (default: 0.1)")
        p.add_argument("--drain", metavar="S", type=float,
                       help="on SIGTERM, seconds of NOT_SERVING while still answering Check, so Envoy moves traffic "
                            "away first (default: 2; a second signal cuts it short)")
        p.add_argument(
            "--metrics-listen", metavar="HOST:PORT", help="HTTP /metrics, /healthz, /readyz (default: 127.0.0.1:9090)"
        )
        if name == "run":
            p.add_argument(
                "--envoy-config",
                metavar="PATH",
                help=f"Envoy config (default: ${ENV_ENVOY_CONFIG}, else {DEFAULT_ENVOY_CONFIG})",
            )

    servers = group("servers", "MCP servers and their credential templates")
    p = leaf(servers, "add", "register an MCP server", _run_managed(_servers_add))
    p.add_argument("name")
    p.add_argument("--mode", required=True, choices=[m.value for m in AuthMode])
    p.add_argument(
        "--header",
        "-H",
        action="append",
        default=[],
        metavar="'NAME: TEMPLATE'",
        help="credential header, e.g. 'Authorization: Bearer {{API_KEY}}' (repeatable)",
    )
    p.add_argument(
        "--optional", action="append", default=[], metavar="PLACEHOLDER", help="placeholder that may be left unset"
    )
    p.add_argument("--description", default="")
    p.add_argument("--upstream-url", default="", metavar="URL",
                   help="the upstream MCP endpoint, for 'overrides test' (e.g. https://mcp.example.com/mcp)")
    p = leaf(servers, "update", "change a server's mode, headers, placeholders, upstream URL or description",
             _run_managed(_servers_update))  # fmt: skip
    p.add_argument("name")
    p.add_argument("--upstream-url", metavar="URL", help="the upstream MCP endpoint ('' clears it)")
    p.add_argument("--description")
    p.add_argument("--mode", choices=[m.value for m in AuthMode], help="a new mode (none clears the headers)")
    p.add_argument("--header", "-H", action="append", metavar="'NAME: TEMPLATE'",
                   help="replaces every credential header (repeatable); overrides are kept, and those missing a "
                        "newly required placeholder are reported and marked missing")
    p.add_argument("--optional", action="append", metavar="PLACEHOLDER", help="make a placeholder optional")
    p.add_argument("--required", action="append", metavar="PLACEHOLDER", help="make a placeholder required")
    leaf(servers, "list", "list servers", _run_managed(_servers_list))
    leaf(servers, "show", "show one server", _run_managed(_servers_show)).add_argument("name")
    leaf(
        servers,
        "set-shared",
        "set a shared server's default values, read from stdin (or prompted)",
        _run_managed(_servers_set_shared),
    ).add_argument("name")
    leaf(servers, "remove", "remove a server and its overrides", _run_managed(_servers_remove)).add_argument("name")
    leaf(
        servers, "rotate-signing-secret", "issue a new request-signing secret", _run_managed(_servers_rotate)
    ).add_argument("name")

    principals = group("principals", "users and service accounts")
    p = leaf(principals, "add", "add a principal", _run_managed(_principals_add))
    p.add_argument("name")
    p.add_argument("--team", default="default", help="team (created when missing; default: default)")
    p.add_argument("--roles", default="user", help="comma-separated: admin, manager, user (default: user)")
    p.add_argument("--kind", default="user", choices=["user", "service"])
    p.add_argument("--rate-limit", type=int, metavar="N", help="requests per minute (default: unlimited)")
    leaf(principals, "list", "list principals", _run_managed(_principals_list)).add_argument("--team")
    p = leaf(principals, "update", "change a principal's roles, team, kind or rate limit", _run_managed(_principals_update))
    p.add_argument("name")
    p.add_argument("--roles", help="comma-separated: admin, manager, user (replaces them)")
    p.add_argument("--team", help="team (created when missing)")
    p.add_argument("--kind", choices=["user", "service"])
    p.add_argument("--rate-limit", type=int, metavar="N", help="requests per minute (0: unlimited)")
    leaf(principals, "delete", "delete a principal, its keys and overrides (audit and usage records stay)",
         _run_managed(_principals_delete)).add_argument("name")  # fmt: skip
    disable_text = "disable a principal (all its keys stop working)"
    leaf(principals, "disable", disable_text, _run_managed(_toggle("principal", True))).add_argument("name")
    leaf(principals, "enable", "enable a principal", _run_managed(_toggle("principal", False))).add_argument("name")

    teams = group("teams", "teams (workspaces)")
    leaf(teams, "list", "list teams", _run_managed(_teams_list))
    disable_text = "disable a team (all its keys stop working)"
    leaf(teams, "disable", disable_text, _run_managed(_toggle("team", True))).add_argument("name")
    leaf(teams, "enable", "enable a team", _run_managed(_toggle("team", False))).add_argument("name")

    keys = group("keys", "gateway keys")
    p = leaf(keys, "create", "create a gateway key (shown once)", _run_managed(_keys_create))
    p.add_argument("principal", nargs="?", help="whose key (remote mode: default yourself)")
    p.add_argument("--label", default="")
    p.add_argument("--expires", type=parse_expiry, metavar="WHEN", help="ISO date or date-time, or a duration (30d)")
    p.add_argument(
        "--servers", action="append", default=[], metavar="A,B:TOOL", help="scope to servers, or server:tool"
    )
    leaf(keys, "list", "list keys (never the keys themselves)", _run_managed(_keys_list)).add_argument("--principal")
    leaf(keys, "revoke", "revoke a key now", _run_managed(_keys_revoke)).add_argument("key_id")
    p = leaf(keys, "regenerate", "replace a key (shown once) and revoke the old one", _run_managed(_keys_regenerate))
    p.add_argument("key_id")
    p.add_argument(
        "--grace", type=parse_grace, default=0, metavar="DURATION", help="keep the old key working for this long (10m)"
    )

    overrides = group("overrides", "personal upstream credentials")
    whose = "whose (remote mode: default yourself)"
    p = leaf(overrides, "set", "set a principal's values, read from stdin (or prompted)", _run_managed(_overrides_set))
    p.add_argument("--principal", help=whose)
    server_name(p, True)
    p.add_argument("--expires", type=parse_expiry, metavar="WHEN",
                   help="the credential expires then: ISO date or date-time, or a duration (90d)")
    p = leaf(overrides, "list", "list overrides (masked)", _run_managed(_overrides_list))
    p.add_argument("--principal")
    server_name(p, False)
    p = leaf(overrides, "delete", "delete an override", _run_managed(_overrides_delete))
    p.add_argument("--principal", help=whose)
    server_name(p, True)
    p = leaf(
        overrides, "status", "credential status per principal: configured, missing, invalid, expired",
        _run_managed(_overrides_status),
    )
    p.add_argument("--principal", help="only this principal (default: everyone you may see)")
    server_name(p, False, "only this server (default: every server that takes credentials)")
    p = leaf(
        overrides, "test", "send an MCP initialize upstream with the credential; a 401/403 marks it invalid",
        _run_managed(_overrides_test),
    )
    p.add_argument("--principal", help=whose)
    server_name(p, True)

    leaf(sub, "whoami", "show who the gateway key in $MCP_AUTHZ_KEY is (remote mode)", _run_managed(_whoami))
    p = leaf(sub, "connect", "print ready-to-paste MCP client configuration for a server behind the gateway",
             _run_managed(_connect))
    server_name(p, True)
    p.add_argument("--client", choices=clients.CLIENTS, help="only this client, its text alone (default: all)")
    p.add_argument("--gateway-url", metavar="URL",
                   help=f"the gateway's base URL (default: ${ENV_GATEWAY_URL}, else {clients.DEFAULT_GATEWAY_URL})")
    p.add_argument("--key-from-env", action="store_true",
                   help=f"fill in your gateway key from ${ENV_GATEWAY_KEY} (default: a placeholder)")
    leaf(sub, "backup", "copy the SQLite store to a new file (0600) while sidecars run",
         _run_managed(_backup, local_only="backup")).add_argument("out", metavar="FILE")  # fmt: skip

    certs = group("certs", "TLS certificates for the sidecar's listeners")
    p = leaf(certs, "create", "create a private CA (or reuse the one in --out) and server and client certificates",
             _cmd_certs_create)
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the files (created 0700 if missing)")
    p.add_argument("--host", action="append", type=_parse_cert_host, metavar="NAME_OR_IP",
                   help="a DNS name or IP address the server certificate is for (repeatable; "
                   "default: localhost and 127.0.0.1)")
    p.add_argument("--client-name", type=_parse_cert_client_name, default="envoy", metavar="NAME",
                   help="CN and DNS name of the client certificate Envoy presents (default: envoy)")
    p.add_argument("--days", type=_parse_cert_days, default=825, metavar="N",
                   help="validity of the server and client certificates (default: 825)")
    p.add_argument("--ca-days", type=_parse_cert_days, default=3650, metavar="N",
                   help="validity of a new CA (default: 3650)")
    p.add_argument("--force", action="store_true",
                   help="replace existing certificate files (a CA already in --out is kept unless --new-ca)")
    p.add_argument("--new-ca", action="store_true",
                   help="make a new CA even if --out has one (with --force to replace it)")

    master_key = group("master-key", "rotate the master key while sidecars serve (local store only)")
    p = leaf(master_key, "add", "add a new master key version to the key file; it seals new values from now on",
             _run_master_key(_master_key_add))
    p.add_argument("--standby", action="store_true",
                   help="add it last, opening but not sealing, until 'activate' (sidecars on several hosts)")
    p = leaf(master_key, "activate", "make a version in the key file the one that seals new values",
             _run_master_key(_master_key_activate))
    p.add_argument("--version", type=_parse_version, required=True, metavar="N", help="the version to activate")
    p = leaf(master_key, "rotate", "re-encrypt every sealed value under the active version, in batches (exit 1 "
             "while rows remain under an older version)",
             _run_master_key(_master_key_rotate))
    p.add_argument("--batch", type=_parse_batch, default=DEFAULT_BATCH, metavar="N",
                   help=f"rows per transaction (default: {DEFAULT_BATCH})")
    leaf(master_key, "status", "rows per master key version", _run_master_key(_master_key_status))
    p = leaf(master_key, "retire", "drop a version no row uses any more from the key file and the store",
             _run_master_key(_master_key_retire))
    p.add_argument("--version", type=_parse_version, required=True, metavar="N", help="the version to drop")

    p = leaf(sub, "usage", "query per-request usage records, or export them as JSON lines", _cmd_usage)
    p.add_argument("--principal", metavar="NAME", help="only this principal's requests")
    server_name(p, False, "only requests to this server")
    p.add_argument("--tool", metavar="T", help="only tools/call requests of this tool")
    when = "ISO date or date-time (UTC unless given), or a duration ago (1h, 7d)"
    p.add_argument("--since", type=parse_when, metavar="WHEN", help=f"from this time, inclusive: {when}")
    p.add_argument("--until", type=parse_when, metavar="WHEN", help=f"before this time, exclusive: {when}")
    p.add_argument(
        "--limit",
        type=parse_limit,
        metavar="N",
        help=f"at most N records, oldest first (default: {DEFAULT_LIMIT}; with --export: all)",
    )
    p.add_argument(
        "--export", action="store_true", help="write JSON lines to stdout, one record a line, streamed (not --json)"
    )
    usage_actions = p.add_subparsers(dest="action", metavar="[prune]", required=False)
    prune = usage_actions.add_parser(
        "prune", parents=[common], help="delete usage records older than a duration",
        description="delete usage records older than a duration",
    )
    prune.set_defaults(func=_cmd_usage_prune(prune))
    prune.add_argument(
        "--older-than", required=True, type=parse_duration, metavar="DURATION", help="e.g. 30d, 12h, 2w"
    )

    p = leaf(sub, "audit", "query the audit trail (admins), or export it as JSON lines", _cmd_audit)
    p.add_argument("--actor", metavar="NAME", help="a principal's name or id, 'cli', or '-' (unauthenticated)")
    p.add_argument("--action", metavar="A", help="e.g. keys.revoke, or a prefix: 'keys.*', 'authn.*'")
    p.add_argument("--target", metavar="T", help="e.g. key:AbC1234, override:alice/github, server:github")
    p.add_argument("--since", type=parse_when, metavar="WHEN", help=f"from this time, inclusive: {when}")
    p.add_argument("--until", type=parse_when, metavar="WHEN", help=f"before this time, exclusive: {when}")
    p.add_argument("--limit", type=parse_limit, metavar="N",
                   help=f"at most N events, oldest first (default: {DEFAULT_LIMIT})")
    p.add_argument("--export", action="store_true", help="write every matching event as JSON lines (not --json)")
    return parser


# --- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run one command. Returns the exit status: 0 ok, 1 operation error, 2 usage or configuration error."""
    argv = sys.argv[1:] if argv is None else argv
    json_mode = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _print_error(json_mode, "usage", exc.message, exc.usage)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    json_mode = bool(getattr(args, "json", False))
    try:
        result: int = args.func(args)
        return result
    except UsageError as exc:  # a combination of arguments the parser alone cannot refuse
        _print_error(json_mode, "usage", exc.message, exc.usage)
        return 2
    except ConfigError as exc:  # includes MasterKeyError
        _print_error(json_mode, exc.reason, exc.message)
        return 2
    except AuthzError as exc:
        _print_error(json_mode, exc.reason, exc.message)
        return 1
    except KeyboardInterrupt:
        _print_error(json_mode, "interrupted", "interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
