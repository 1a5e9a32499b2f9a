"""The admin API's JSON bodies, checked for unknown fields before Envoy transcodes them.

Envoy's grpc_json_transcoder drops a JSON field its request message does not have,
and has no option to refuse it, so `{"expires": …}` (a typo for `expires_at`) would
create a key that never expires. Envoy therefore sends each admin request's body to
the sidecar's admin listener first (a second ext_authz filter on the admin route,
see envoy/envoy.yaml), and `check` answers 400 when the body names a field the method
does not have. What each method accepts is read from the descriptor and its HTTP
rules, so a new method is covered without anything declared here.

The answer's shape is the transcoder's own error, `{"code": 3, "message": …}`. A field
name is echoed only when it is shaped like one: anything else could be a pasted secret.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.api import annotations_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import code_pb2, status_pb2

from authz_server.admin.gen import admin_pb2 as pb
from authz_server.crypto.keys import looks_like_key

_FIELD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_VARIABLE_RE = re.compile(r"\{([a-z_][a-z0-9_.]*)(=[^}]*)?\}")
_WELL_KNOWN = "google.protobuf."  # a Timestamp travels as a string, not as an object
_NAMED_MAX = 10  # unknown names a refusal lists


@dataclass(frozen=True, slots=True)
class _Route:
    """One HTTP rule of a method that takes a body: its verb and path, and the message the body fills."""

    method: str
    verb: str
    path: re.Pattern[str]
    message: Descriptor


def _pattern(template: str) -> re.Pattern[str]:
    """A path template (`/admin/v1/keys/{key_id}:revoke`) as a regex of the paths it matches."""
    out, at = [], 0
    for m in _VARIABLE_RE.finditer(template):
        out.append(re.escape(template[at : m.start()]))
        out.append("[^/]+" if m.group(2) in (None, "=*") else ".+")
        at = m.end()
    out.append(re.escape(template[at:]))
    return re.compile("".join(out) + r"(\?.*)?")


def _routes() -> tuple[_Route, ...]:
    service = pb.DESCRIPTOR.services_by_name["Admin"]
    routes = []
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for r in (rule, *rule.additional_bindings):
            verb = r.WhichOneof("pattern")
            filled = method.input_type if r.body == "*" else _message_of(method.input_type, r.body)
            if verb and filled is not None:
                routes.append(_Route(method.name, verb.upper(), _pattern(getattr(r, verb)), filled))
    return tuple(routes)


def _message_of(message: Descriptor, body: str) -> Descriptor | None:
    """The message a body mapped to one field fills (None: no body, or a field that is no message)."""
    field = message.fields_by_name.get(body) if body else None
    return None if field is None else _object(field)


def _object(field: FieldDescriptor) -> Descriptor | None:
    """The message whose fields a field's JSON object holds; None for a scalar, a map (its keys
    are its own) or a well-known type (a Timestamp is a string)."""
    inner: Descriptor | None = field.message_type
    if inner is None or inner.GetOptions().map_entry or inner.full_name.startswith(_WELL_KNOWN):
        return None
    return inner


ROUTES = _routes()


def _names(message: Descriptor) -> dict[str, FieldDescriptor]:
    """The JSON names a field may be given by: its proto name and its lowerCamelCase json_name."""
    return {n: f for f in message.fields for n in (f.name, f.json_name)}


def _shown(name: str) -> str:
    return name if _FIELD_NAME_RE.match(name) and not looks_like_key(name) else "(a name that is no field name)"


def unknown_fields(message: Descriptor, body: Any, at: str = "") -> list[str]:
    """The names in `body` (a decoded JSON object) that `message` has no field for, with their
    path (`a.b`), nested messages included; a map's keys are its own and never unknown."""
    if not isinstance(body, Mapping):
        return []
    known = _names(message)
    out: list[str] = []
    for name, value in body.items():
        field = known.get(name)
        if field is None:
            out.append(at + _shown(str(name)))
            continue
        inner = _object(field)
        if inner is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            out += unknown_fields(inner, item, f"{at}{field.name}.")
    return out


def refusal(verb: str, path: str, body: bytes) -> str | None:
    """Why the body of `verb path` is refused, or None: no admin method with a body, an empty
    body, or one that is not JSON (the transcoder refuses that itself, 400)."""
    route = next((r for r in ROUTES if r.verb == verb and r.path.fullmatch(path)), None)
    if route is None or not body.strip():
        return None
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        return None
    unknown = unknown_fields(route.message, decoded)
    if not unknown:
        return None
    accepted = ", ".join(f.name for f in route.message.fields)
    named = ", ".join(unknown[:_NAMED_MAX]) + (f" and {len(unknown) - _NAMED_MAX} more" if len(unknown) > _NAMED_MAX else "")
    return (f"Unknown field{'s' if len(unknown) > 1 else ''} in the request body: {named}. "
            f"{route.method} takes {accepted}.")  # fmt: skip


ADMIN_PREFIX = "/admin/"  # the admin route's prefix in envoy/envoy.yaml
_NOT_ADMIN = ("The admin listener checks only admin API bodies (/admin/...): point the ext_authz filter of MCP "
              "routes at the sidecar's Check listener.")  # fmt: skip
_JSON = HeaderValueOption(header=HeaderValue(key="content-type", value="application/json"))
_OK = CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=OkHttpResponse())


def check(request: CheckRequest, context: object = None) -> CheckResponse:
    """The admin listener's `envoy.service.auth.v3.Authorization/Check`: OK, or 400 with the
    transcoder's error body. It authenticates nobody: the admin API itself does, after it.

    Anything outside /admin/ is refused (403): should Envoy's MCP ext_authz be pointed at the
    admin listener by mistake, MCP traffic is denied rather than let through unchecked."""
    http = request.attributes.request.http
    if not http.path.startswith(ADMIN_PREFIX):
        return _refused(code_pb2.PERMISSION_DENIED, 403, _NOT_ADMIN)
    why = refusal(http.method, http.path, http.raw_body or http.body.encode())
    return _OK if why is None else _refused(code_pb2.INVALID_ARGUMENT, 400, why)


def _refused(code: int, status: int, why: str) -> CheckResponse:
    answer = json.dumps({"code": code, "message": why, "details": []})
    return CheckResponse(
        status=status_pb2.Status(code=code, message=why),
        denied_response=DeniedHttpResponse(status=HttpStatus(code=status), body=answer + "\n", headers=[_JSON]),
    )


def handler() -> grpc.GenericRpcHandler:
    """`check` as `envoy.service.auth.v3.Authorization/Check`, for the admin listener's server."""
    method = grpc.unary_unary_rpc_method_handler(check, request_deserializer=CheckRequest.FromString,
                                                 response_serializer=CheckResponse.SerializeToString)  # fmt: skip
    return grpc.method_handlers_generic_handler(CheckRequest.DESCRIPTOR.file.services_by_name["Authorization"].full_name,
                                                {"Check": method})  # fmt: skip
