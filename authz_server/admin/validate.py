"""Validation of admin input: pure functions that return the clean value or raise InvalidInput.

Messages name fields and placeholders, never the rejected text: a secret
pasted in the wrong place must not end up in a message, a log or the audit
trail. The rules themselves (name shapes, placeholder names, reserved
headers) come from `authz_server.rules`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from authz_server.crypto import keys as gateway_keys
from authz_server.errors import InvalidInput
from authz_server.models import AuthMode, HeaderTemplate, McpServer, Placeholder, PrincipalKind, Role
from authz_server.rules import NAME_RE, PLACEHOLDER_NAME_MAX, PLACEHOLDER_NAME_RE, PLACEHOLDER_RE, TOOL_RE

MAX_VALUE_BYTES = 8 * 1024
MAX_GRACE_SECONDS = 30 * 24 * 3600
MAX_LABEL_LEN = 100
MAX_DESCRIPTION_LEN = 500
MAX_HEADERS = 16
MAX_URL_LEN = 2048
MAX_TARGET_LEN = 300
_HTTP_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}$")
_KEY_ID_RE = re.compile(rf"^[0-9A-Za-z]{{{gateway_keys.KEY_ID_LEN}}}$")


# A time in an admin request: 1970-01-01 to 9999-12-31 (what a store and a datetime both hold).
MAX_TIME_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_NANOS = 999_999_999


def time_of(seconds: int, nanos: int, what: str) -> datetime:
    """A protobuf Timestamp's seconds and nanos as an aware UTC datetime, or InvalidInput out of range."""
    if not (0 <= seconds <= MAX_TIME_SECONDS and 0 <= nanos <= MAX_NANOS):
        raise InvalidInput(
            f"The time in {what} is out of range: give a time from 1970-01-01 to 9999-12-31 "
            f"(seconds 0 to {MAX_TIME_SECONDS}, nanos 0 to {MAX_NANOS})."
        )
    return datetime.fromtimestamp(seconds, timezone.utc) + timedelta(microseconds=nanos // 1000)


def as_utc(dt: datetime) -> datetime:
    """A naive datetime is taken to be UTC: the store only holds aware UTC times."""
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def check_name(name: str, what: str) -> None:
    # The rejected text is not echoed: a misplaced secret must not end up in a message.
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            f"The {what} name is invalid: use 1 to 63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )


def check_tool(tool: str) -> None:
    if not isinstance(tool, str) or not TOOL_RE.match(tool):
        raise InvalidInput("The tool name is invalid: use 1 to 128 letters, digits, '_', '-', '.' or '/'.")


def check_key_id(key_id: str) -> None:
    if gateway_keys.looks_like_key(key_id):
        raise InvalidInput(
            "That is a whole gateway key, not a key id. Pass only the key id shown by 'mcp-authz keys list', "
            "and never put keys on a command line."
        )
    if not _KEY_ID_RE.match(key_id):
        raise InvalidInput(
            f"A key id is {gateway_keys.KEY_ID_LEN} letters and digits, as shown by 'mcp-authz keys list'."
        )


def check_count(value: object, what: str, unit: str, maximum: int | None = None) -> int:
    """A whole number from 1 to `maximum` (None: no bound), e.g. a limit or a page size of `unit`s."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum is not None and value > maximum):
        if maximum is None:
            raise InvalidInput(f"{what} must be a positive number of {unit}.")
        raise InvalidInput(f"{what} must be between 1 and {maximum} {unit}.")
    return value


def check_upstream_url(url: str) -> None:
    """An http(s) URL without user info or fragment: where `overrides test` posts an initialize."""
    if not isinstance(url, str):
        raise InvalidInput("The upstream URL must be text.")
    if not url:
        return  # "" clears it
    if len(url) > MAX_URL_LEN or has_control(url) or any(c.isspace() for c in url):
        raise InvalidInput(f"The upstream URL is longer than {MAX_URL_LEN} characters or contains spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
    except ValueError:
        raise InvalidInput("The upstream URL is not a valid URL.") from None
    del port
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("The upstream URL must be http:// or https:// with a host, e.g. https://mcp.example.com/mcp.")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("The upstream URL must not contain user info: credentials belong in overrides, not URLs.")
    if parts.fragment:
        raise InvalidInput("The upstream URL must not have a #fragment.")


def has_control(text: str) -> bool:
    # Cc covers C0 (incl. CR, LF, TAB), DEL and C1; Zl/Zp are Unicode line breaks.
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def check_text(text: str, what: str, limit: int) -> None:
    if len(text) > limit:
        raise InvalidInput(f"The {what} is longer than {limit} characters.")
    if has_control(text):
        raise InvalidInput(f"The {what} contains a control character or line break.")


def check_time_range(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """The range in UTC; `since` (inclusive) must come before `until` (exclusive)."""
    start = None if since is None else as_utc(since)
    end = None if until is None else as_utc(until)
    if start is not None and end is not None and start >= end:
        raise InvalidInput("The start of the time range (since) must be before its end (until).")
    return start, end


def parse_mode(mode: AuthMode | str) -> AuthMode:
    try:
        return AuthMode(mode)
    except ValueError:
        raise InvalidInput("The mode must be none, shared or individual.") from None


def parse_kind(kind: PrincipalKind | str) -> PrincipalKind:
    try:
        return PrincipalKind(kind)
    except ValueError:
        raise InvalidInput("The kind must be user or service.") from None


def parse_roles(roles: Iterable[Role | str]) -> tuple[Role, ...]:
    try:
        parsed = {Role(r) for r in roles}
    except ValueError:
        raise InvalidInput("Roles must be among admin, manager and user.") from None
    if not parsed:
        raise InvalidInput("A principal needs at least one role (admin, manager or user).")
    return tuple(r for r in Role if r in parsed)  # canonical order: admin, manager, user


def parse_headers(lines: Sequence[str], reserved: frozenset[str]) -> tuple[HeaderTemplate, ...]:
    """'Name: template' lines into templates; names must be HTTP tokens not in `reserved` (the
    headers the gateway sets or protects itself: `rules.template_reserved`)."""
    if len(lines) > MAX_HEADERS:
        raise InvalidInput(f"A server has at most {MAX_HEADERS} credential headers.")
    out: list[HeaderTemplate] = []
    seen: set[str] = set()
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith(":"):
            raise InvalidInput(f"Header {i}: pseudo-headers such as :path or :authority cannot be set.")
        name, sep, template = line.partition(":")
        name, template = name.strip(), template.strip()
        if not sep:
            raise InvalidInput(f"Header {i} must be 'Name: value', e.g. 'Authorization: Bearer {{{{API_KEY}}}}'.")
        if not _HTTP_TOKEN_RE.match(name):
            raise InvalidInput(
                f"Header {i}: the name is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~, "
                "at most 64)."
            )
        lowered = name.lower()
        if lowered in reserved:
            raise InvalidInput(f"Header {name} is reserved: the gateway sets or protects it itself.")
        if lowered in seen:
            raise InvalidInput(f"Header {name} is given twice.")
        seen.add(lowered)
        if not template:
            raise InvalidInput(f"Header {name} has an empty value template.")
        if len(template.encode()) > MAX_VALUE_BYTES or has_control(template):
            raise InvalidInput(f"Header {name}: the template is longer than 8 KiB or contains a control character.")
        rest = PLACEHOLDER_RE.sub("", template)
        if "{{" in rest or "}}" in rest:
            raise InvalidInput(
                f"Header {name} has a '{{{{' or '}}}}' that is not a placeholder: placeholders look like "
                f"{{{{API_KEY}}}} (capital letters, digits and '_', at most {PLACEHOLDER_NAME_MAX})."
            )
        out.append(HeaderTemplate(name, template))
    return tuple(out)


def placeholders(mode: AuthMode, headers: tuple[HeaderTemplate, ...], optional: set[str]) -> tuple[Placeholder, ...]:
    names: list[str] = []
    for h in headers:
        for p in h.placeholders():
            if p not in names:
                names.append(p)
    if mode is AuthMode.NONE:
        if headers:
            raise InvalidInput("A server in none mode injects no credentials: give it no headers.")
        if optional:
            raise InvalidInput("A server in none mode has no placeholders to make optional.")
        return ()
    if not names:
        raise InvalidInput(
            f"A server in {mode.value} mode needs at least one header with a placeholder, "
            "e.g. 'Authorization: Bearer {{API_KEY}}'."
        )
    unknown = optional - set(names)
    if unknown:
        shown = ", ".join(sorted(_safe_placeholder(n) for n in unknown))
        raise InvalidInput(f"Optional {shown} is not a placeholder of the headers (they use {', '.join(names)}).")
    return tuple(Placeholder(n, required=n not in optional) for n in names)


def _safe_placeholder(name: str) -> str:
    # Only echo text shaped like a placeholder name; anything else could be a pasted secret.
    return name if PLACEHOLDER_NAME_RE.match(name) else "(an unknown name)"


def check_values(server: McpServer, values: Mapping[str, str]) -> dict[str, str]:
    """Validate placeholder values for a server. Messages name placeholders, never values."""
    known = [p.name for p in server.placeholders]
    if not values:
        raise InvalidInput(f"No values given for server {server.name}; it needs {', '.join(known) or 'none'}.")
    unknown = set(values) - set(known)
    if unknown:
        shown = ", ".join(sorted(_safe_placeholder(n) for n in unknown))
        raise InvalidInput(f"Unknown placeholder {shown} for server {server.name}; it has {', '.join(known)}.")
    missing = [p.name for p in server.placeholders if p.required and p.name not in values]
    if missing:
        raise InvalidInput(f"Server {server.name} needs a value for {', '.join(missing)}.")
    for name in known:
        if name not in values:
            continue
        value = values[name]
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"The value of {name} is empty.")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise InvalidInput(f"The value of {name} is longer than 8 KiB.")
        if has_control(value):
            raise InvalidInput(f"The value of {name} contains a control character or line break.")
    return {n: values[n] for n in known if n in values}
