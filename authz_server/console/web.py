"""The console's HTTP side: its JSON API under /console/api/ and its static pages, with aiohttp.

Served by the sidecar on its console listener and reached through Envoy's /console/
route, on the same origin as the JSON admin API. Each API call maps to one
`AdminOps` use case run as the signed-in principal (`Actor.of`), so the same role
checks as the admin API decide; the pages only hide what a role cannot use.

- Sign-in: `POST /console/api/session` with `{"key": "mgw_…"}` (JSON only, so no
  form can post it), authenticated exactly as the admin API does (admin/api.py
  `authenticate`). The answer sets the session cookie (console/sessions.py):
  HttpOnly, SameSite=Strict, Path=/console/, Secure when the request came over
  TLS. The key is never stored, logged or sent back.
- Every later call: the cookie's session, then its key and principal judged
  again against the live tables (`Authenticator.still_valid`), so a revoked key or
  a disabled principal or team ends the session as soon as Check would refuse it.
- CSRF: a state-changing call needs `X-CSRF-Token` equal to the session's token
  (from `GET /console/api/me`); any call with an `Origin` header needs it to be
  this host. Else 403.
- Connect a client: `GET /console/api/connect` answers console/clients.py's text for a server and
  client at the gateway URL the page names (its origin); never with a key (see `KEY_SLOT`).
- Auth Overrides (managers and admins): `/console/api/manage/servers[/{name}/overrides[/{principal}]]`,
  run as `list_servers`/`show_server`, `list_overrides`, `credential_status`, `set_override` and
  `delete_override` for the named principal, and `/console/api/manage/summary` (each principal across
  servers); a user gets those use cases' 403.
- Every answer carries a strict Content-Security-Policy and `no-store`; bodies are
  bounded (413); errors are `{"error": {"reason", "message"}}` with the statuses the
  admin API's JSON form gives them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from aiohttp import web

from authz_server.admin.api import authenticate, caller_source, grpc_status, request_id_of
from authz_server.admin.ops import AdminOps
from authz_server.admin.policy import Actor
from authz_server.console import clients
from authz_server.console.sessions import Session, Sessions
from authz_server.errors import AuthzError, Denied, InvalidInput, PermissionDenied, Reason
from authz_server.models import AuditEvent, Secret
from authz_server.observability.batch import BatchWriter
from authz_server.pipeline.authn import Authenticator, KeyExtractor

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
COOKIE = "mcp_authz_console"
CSRF_HEADER = "X-CSRF-Token"
PREFIX = "/console"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# gRPC status → HTTP status, as Envoy's JSON transcoder answers the admin API's errors.
_HTTP_OF_GRPC = {
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}  # fmt: skip
# Where the key goes in a keyed configuration: key-shaped, so each client's keyed form is generated,
# and never a real key (a real key's body is random base62; this one is all zeros).
KEY_SLOT = "mgw_" + "0" * 32
_SIGNED_OUT = "Not signed in, or the session ended. Sign in with your gateway key."


@dataclass(frozen=True, slots=True)
class Console:
    """What the console needs from the sidecar: the use cases, Check's authenticator, the audit queue."""

    service: AdminOps
    authenticator: Authenticator
    extractor: KeyExtractor
    audit: BatchWriter[AuditEvent]
    ready: Callable[[], bool]
    sessions: Sessions


def http_status(exc: AuthzError) -> int:
    if isinstance(exc, Denied):
        return exc.status
    return _HTTP_OF_GRPC.get(grpc_status(exc), 500)


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": {"reason": reason, "message": message}}, status=status)


# --- middleware: headers, errors, CSRF ---------------------------------------------------------


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AuthzError as exc:
        return _error(http_status(exc), exc.reason, exc.message)  # a Denied's hint names headers: not for a page
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "too_large", f"The request body is larger than {MAX_BODY} bytes.")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, "http", exc.reason)
    except Exception:
        log.exception("console call failed", extra={"path": request.path})
        return _error(500, "internal", "The console failed; operators see the sidecar's log.")


def _same_origin(request: web.Request) -> None:
    """An `Origin` header, when sent, must be this host (a page of another site calling in)."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
        raise PermissionDenied("This request came from another site's page.")


@web.middleware
async def _origin_and_size(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(f"{PREFIX}/api/"):
        _same_origin(request)
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    return await handler(request)


# --- the API ------------------------------------------------------------------------------------


class _Api:
    def __init__(self, console: Console) -> None:
        self.c = console

    # sessions

    def _source(self, request: web.Request) -> str:
        return caller_source(request.remote or "-", request.headers)

    async def _signed_in(self, request: web.Request) -> tuple[Actor, Session]:
        """The request's session and its principal as an Actor, judged again now; CSRF-checked when it changes state."""
        token = request.cookies.get(COOKIE, "")
        session = self.c.sessions.find(token) if token else None
        if session is None:
            raise Denied(Reason.KEY_MISSING, _SIGNED_OUT)
        try:
            principal = self.c.authenticator.still_valid(session.key_id)
        except Denied as denied:
            self.c.sessions.end(token)
            raise Denied(denied.code, f"The session ended: {denied.message}") from None
        if request.method not in _SAFE_METHODS and request.headers.get(CSRF_HEADER, "") != session.csrf_token:
            raise PermissionDenied(f"This call needs the {CSRF_HEADER} header of the session (GET {PREFIX}/api/me).")
        return Actor.of(principal, request_id_of(request.headers), self._source(request)), session

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(reason="Sign in with a JSON body: {\"key\": \"mgw_…\"}.")
        body = await _json_body(request)
        key = body.get("key")
        if not isinstance(key, str) or not key.strip():
            raise InvalidInput("Give your gateway key: {\"key\": \"mgw_…\"}.")
        request_id = request_id_of(request.headers)
        identity = await authenticate(self.c.authenticator, self.c.extractor, self.c.audit, self.c.ready,
                                      {"authorization": f"Bearer {key.strip()}"}, request_id, self._source(request),
                                      api="console", method="SignIn")  # fmt: skip
        self.c.sessions.end(request.cookies.get(COOKIE, ""))  # a sign-in replaces the browser's earlier session
        token, session = self.c.sessions.start(identity.key_id, identity.principal.id)
        actor = Actor.of(identity.principal, request_id, self._source(request))
        response = web.json_response(await self._me(actor, session))
        secure = request.secure or request.headers.get("x-forwarded-proto", "").lower() == "https"
        response.set_cookie(COOKIE, token, path=f"{PREFIX}/", httponly=True, secure=secure, samesite="Strict")
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        await self._signed_in(request)
        self.c.sessions.end(request.cookies.get(COOKIE, ""))
        response = web.json_response({})
        response.del_cookie(COOKIE, path=f"{PREFIX}/")
        return response

    async def _me(self, actor: Actor, session: Session) -> dict[str, Any]:
        me = (await self.c.service.whoami(actor)).to_json()
        return {"name": me["name"], "kind": me["kind"], "team": me["team"], "roles": me["roles"],
                "csrf_token": session.csrf_token}  # fmt: skip

    async def me(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._me(*await self._signed_in(request)))

    # keys

    async def _own_name(self, actor: Actor) -> str:
        return (await self.c.service.whoami(actor)).name

    async def keys(self, request: web.Request) -> web.StreamResponse:
        actor, _ = await self._signed_in(request)
        keys = await self.c.service.list_keys(actor, await self._own_name(actor))
        return web.json_response({"keys": [k.to_json() for k in keys]})

    async def create_key(self, request: web.Request) -> web.StreamResponse:
        actor, _ = await self._signed_in(request)
        body = await _json_body(request)
        label = _text(body, "label")
        scope = body.get("scope", [])
        if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
            raise InvalidInput("'scope' must be a list of 'server' or 'server:tool' entries.")
        view, secret = await self.c.service.create_key(actor, None, label, _time(body, "expires_at"), scope)
        return web.json_response({"key": view.to_json(), "secret": secret.reveal()}, status=201)

    async def revoke_key(self, request: web.Request) -> web.StreamResponse:
        actor, _ = await self._signed_in(request)
        view = await self.c.service.revoke_key(actor, request.match_info["key_id"])
        return web.json_response({"key": view.to_json()})

    async def regenerate_key(self, request: web.Request) -> web.StreamResponse:
        """A replacement shown once; the old key stops now, or after `grace_seconds`."""
        actor, _ = await self._signed_in(request)
        grace = (await _json_body(request)).get("grace_seconds", 0)
        if not isinstance(grace, int) or isinstance(grace, bool):
            raise InvalidInput("'grace_seconds' must be a whole number of seconds.")
        view, secret = await self.c.service.regenerate_key(actor, request.match_info["key_id"], grace)
        return web.json_response({"key": view.to_json(), "secret": secret.reveal()}, status=201)

    # personal credentials

    async def servers(self, request: web.Request) -> web.StreamResponse:
        actor, _ = await self._signed_in(request)
        svc = self.c.service
        rows = []
        for status in await svc.credential_status(actor, None, await self._own_name(actor)):
            form = await svc.server_form(actor, status.server)
            rows.append({"name": status.server, "mode": status.mode, "status": status.status,
                         "indicator": status.indicator, "reason": status.reason, "source": status.source,
                         "values": dict(status.masks), "updated_at": status.to_json()["updated_at"],
                         "placeholders": form.to_json()["placeholders"]})  # fmt: skip
        return web.json_response({"servers": rows})

    async def set_credential(self, request: web.Request) -> web.StreamResponse:
        actor, _ = await self._signed_in(request)
        body = await _json_body(request)
        view = await self.c.service.set_override(actor, None, request.match_info["name"], _values(body),
                                                 _time(body, "expires_at"))  # fmt: skip
        return web.json_response({"credential": view.to_json()})

    async def test_credential(self, request: web.Request) -> web.StreamResponse:
        """The existing `overrides test`: an MCP initialize to the server's upstream with the caller's credential."""
        actor, _ = await self._signed_in(request)
        result = await self.c.service.test_override(actor, request.match_info["name"], None)
        return web.json_response({"result": result.to_json()})

    async def delete_credential(self, request: web.Request) -> web.StreamResponse:
        actor, _ = await self._signed_in(request)
        await self.c.service.delete_override(actor, None, request.match_info["name"])
        return web.json_response({})

    # connect a client

    async def connect(self, request: web.Request) -> web.StreamResponse:
        """One client's configuration for one server (console/clients.py), never with the key: with
        `keyed=1` the text holds `KEY_SLOT` where the key goes, and the page puts the key it holds there."""
        actor, _ = await self._signed_in(request)
        query = request.query
        server = query.get("server", "")
        await self.c.service.server_form(actor, server)  # the name's rule, then 404 for an unknown server
        keyed = query.get("keyed", "0") == "1"
        config = clients.generate(query.get("gateway_url", ""), server, query.get("client", ""),
                                  Secret(KEY_SLOT) if keyed else None)  # fmt: skip
        return web.json_response({**config.to_json(), "client": config.client, "title": config.title,
                                  "key_slot": KEY_SLOT if keyed else None})  # fmt: skip

    async def connect_choices(self, request: web.Request) -> web.StreamResponse:
        """The clients, and the servers that ask this user for a credential (any other server's name may be typed)."""
        actor, _ = await self._signed_in(request)
        statuses = await self.c.service.credential_status(actor, None, await self._own_name(actor))
        return web.json_response({"clients": [{"id": c, "title": clients.title(c)} for c in clients.CLIENTS],
                                  "servers": sorted({s.server for s in statuses})})  # fmt: skip

    # managers: a server's Auth Overrides (each call's use case refuses a user: 403)

    async def managed_servers(self, request: web.Request) -> web.StreamResponse:
        """The servers that take credentials, for the Auth Overrides tab. Managers and admins."""
        actor, _ = await self._signed_in(request)
        servers = [v.to_json() for v in await self.c.service.list_servers(actor) if v.placeholders]
        return web.json_response({"servers": [{k: s[k] for k in ("name", "mode", "description", "placeholders",
                                                                 "shared_status")} for s in servers]})  # fmt: skip

    async def server_overrides(self, request: web.Request) -> web.StreamResponse:
        """One server's overrides (masks, status, expiry) and the status of each principal the caller may see."""
        actor, _ = await self._signed_in(request)
        svc, name = self.c.service, request.match_info["name"]
        server = (await svc.show_server(actor, name)).to_json()
        overrides = [o.to_json() for o in await svc.list_overrides(actor, name)]
        status = [{**s.to_json(), "indicator": s.indicator} for s in await svc.credential_status(actor, name)]
        return web.json_response({"server": {k: server[k] for k in ("name", "mode", "description", "placeholders")},
                                  "overrides": overrides, "status": status})  # fmt: skip

    async def summary(self, request: web.Request) -> web.StreamResponse:
        """Each principal the caller may see, across the servers that take credentials (see `summarize`)."""
        actor, _ = await self._signed_in(request)
        await self.c.service.list_servers(actor)  # managers and admins: a user gets its 403, not their own row
        statuses: dict[str, dict[str, str]] = {}
        for s in await self.c.service.credential_status(actor):
            statuses.setdefault(s.principal, {})[s.server] = s.status
        return web.json_response({"principals": [{"principal": name, "servers": by_server, **summarize(by_server)}
                                                 for name, by_server in sorted(statuses.items())]})  # fmt: skip

    async def set_principal_override(self, request: web.Request) -> web.StreamResponse:
        actor, _ = await self._signed_in(request)
        body = await _json_body(request)
        view = await self.c.service.set_override(actor, request.match_info["principal"], request.match_info["name"],
                                                 _values(body), _time(body, "expires_at"))  # fmt: skip
        return web.json_response({"override": view.to_json()})

    async def delete_principal_override(self, request: web.Request) -> web.StreamResponse:
        actor, _ = await self._signed_in(request)
        await self.c.service.delete_override(actor, request.match_info["principal"], request.match_info["name"])
        return web.json_response({})

    async def principals(self, request: web.Request) -> web.StreamResponse:
        """Every principal: an admin's use case, refused to others by the same role check as the admin API."""
        actor, _ = await self._signed_in(request)
        return web.json_response({"principals": [p.to_json() for p in await self.c.service.list_principals(actor)]})


def summarize(by_server: dict[str, str]) -> dict[str, str]:
    """One principal's credentials across servers: ✅ all configured, 🔄 some invalid or expired (need
    updating), ❌ none configured, ⚠️ some missing."""
    states = set(by_server.values())
    if states <= {"configured"}:
        return {"summary": "all", "indicator": "✅"}
    if states & {"invalid", "expired"}:
        return {"summary": "update", "indicator": "🔄"}
    if "configured" not in states:
        return {"summary": "none", "indicator": "❌"}
    return {"summary": "some", "indicator": "⚠️"}


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # bounded by client_max_size: 413 beyond
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("The request body is not JSON.") from None
    if not isinstance(body, dict):
        raise InvalidInput("The request body must be a JSON object.")
    return body


def _values(body: dict[str, Any]) -> dict[str, str]:
    values = body.get("values")
    if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise InvalidInput("'values' must be an object of placeholder names to strings.")
    return values


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a string.")
    return value


def _time(body: dict[str, Any], name: str) -> datetime | None:
    text = _text(body, name)
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"'{name}' must be an ISO 8601 time, e.g. 2027-01-31T00:00:00Z.") from None
    if when.tzinfo is None:
        raise InvalidInput(f"'{name}' must name its time zone, e.g. 2027-01-31T00:00:00Z.")
    return when


# --- pages ----------------------------------------------------------------------------------------


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name") or "index.html"
    path = STATIC_DIR / name
    kind = _STATIC_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or kind is None or not path.is_file():
        raise web.HTTPNotFound(reason="No such page.")
    charset = None if kind.startswith("image/") else "utf-8"
    return web.Response(body=path.read_bytes(), content_type=kind, charset=charset)


async def _to_index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(f"{PREFIX}/")


def create_app(console: Console) -> web.Application:
    """The console as an aiohttp application (run by the sidecar, or by aiohttp's test client)."""
    api = _Api(console)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_answer_errors, _origin_and_size])
    app.on_response_prepare.append(_security_headers)
    app.router.add_post(f"{PREFIX}/api/session", api.sign_in)
    app.router.add_delete(f"{PREFIX}/api/session", api.sign_out)
    app.router.add_get(f"{PREFIX}/api/me", api.me)
    app.router.add_get(f"{PREFIX}/api/keys", api.keys)
    app.router.add_post(f"{PREFIX}/api/keys", api.create_key)
    app.router.add_post(f"{PREFIX}/api/keys/{{key_id}}/revoke", api.revoke_key)
    app.router.add_post(f"{PREFIX}/api/keys/{{key_id}}/regenerate", api.regenerate_key)
    app.router.add_get(f"{PREFIX}/api/servers", api.servers)
    app.router.add_post(f"{PREFIX}/api/servers/{{name}}/credential/test", api.test_credential)
    app.router.add_put(f"{PREFIX}/api/servers/{{name}}/credential", api.set_credential)
    app.router.add_delete(f"{PREFIX}/api/servers/{{name}}/credential", api.delete_credential)
    app.router.add_get(f"{PREFIX}/api/principals", api.principals)
    app.router.add_get(f"{PREFIX}/api/manage/servers", api.managed_servers)
    app.router.add_get(f"{PREFIX}/api/manage/summary", api.summary)
    app.router.add_get(f"{PREFIX}/api/manage/servers/{{name}}/overrides", api.server_overrides)
    app.router.add_put(f"{PREFIX}/api/manage/servers/{{name}}/overrides/{{principal}}", api.set_principal_override)
    app.router.add_delete(f"{PREFIX}/api/manage/servers/{{name}}/overrides/{{principal}}", api.delete_principal_override)
    app.router.add_get(f"{PREFIX}/api/connect", api.connect)
    app.router.add_get(f"{PREFIX}/api/connect/choices", api.connect_choices)
    app.router.add_get(PREFIX, _to_index)
    app.router.add_get(f"{PREFIX}/", _static)
    app.router.add_get(f"{PREFIX}/{{name}}", _static)
    return app
