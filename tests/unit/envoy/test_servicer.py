"""envoy/servicer.py on the core loop: a key's first use is answered from the hashing thread, while
warm Checks go on being answered meanwhile; a verification that cannot run is a 503."""

from __future__ import annotations

from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from google.rpc import code_pb2

from authz_server.envoy.health import Health
from authz_server.envoy.servicer import AuthorizationServicer
from authz_server.models import AuthMode
from authz_server.observability import metrics as metrics_module
from authz_server.observability.batch import BatchWriter
from authz_server.observability.last_used import LastUsed
from authz_server.pipeline.pipeline import Pipeline

from ..fakes import CountingHasher, Served, World, wait_until


def test_the_servicer_answers_a_first_use_from_the_hashing_thread(served: list[Served]) -> None:
    """A key on its first use waits for Argon2 while a warm key is answered meanwhile; both get 200s."""
    w = World()
    hasher = CountingHasher()
    w.hasher = hasher
    w.server("github", AuthMode.NONE)
    warm, cold = w.key(w.principal("warm")), w.key(w.principal("cold"))
    w.pipeline().decide(_input(warm))  # verified once: this pipeline waits out the first use
    pipeline: Pipeline = w.pipeline(waits=False)
    health_state = Health(60)
    health_state.serving = True
    metrics = metrics_module.create()
    servicer = AuthorizationServicer(pipeline, health_state, metrics, BatchWriter("audit", _sink, 10),
                                     LastUsed(None, 60))  # type: ignore[arg-type]
    s = Served(servicer.check)
    served.append(s)
    hasher.gate.clear()  # the cold key's verification waits until released
    first_use = s.raw.future(_check(cold).SerializeToString(), timeout=10)
    wait_until(lambda: hasher.calls > 0)
    assert _status(s.raw(_check(warm).SerializeToString(), timeout=5)) == code_pb2.OK
    assert not first_use.done()
    hasher.gate.set()
    assert _status(first_use.result(timeout=10)) == code_pb2.OK
    assert hasher.calls == 2  # warm once, cold once
    allowed = [m for m in metrics.collect_checks() if m.name == "mcp_authz_check_decisions"]
    assert sum(sample.value for sample in allowed[0].samples if sample.labels.get("decision") == "allow") == 2


def test_the_servicer_answers_503_when_a_verification_cannot_run(served: list[Served]) -> None:
    w = World()
    hasher = CountingHasher()
    w.hasher = hasher
    w.server("github", AuthMode.NONE)
    key = w.key(w.principal("alice"))
    hasher.verify = lambda *_a: (_ for _ in ()).throw(RuntimeError("hasher broke"))  # type: ignore[method-assign]
    health_state = Health(60)
    health_state.serving = True
    servicer = AuthorizationServicer(w.pipeline(waits=False), health_state, metrics_module.create(),
                                     BatchWriter("audit", _sink, 10), LastUsed(None, 60))  # type: ignore[arg-type]
    s = Served(servicer.check)
    served.append(s)
    reply = CheckResponse.FromString(s.raw(_check(key).SerializeToString(), timeout=10))
    assert reply.status.code != code_pb2.OK and reply.denied_response.status.code == 503


async def _sink(_items: object) -> None:
    return None


def _check(key: str) -> CheckRequest:
    r = CheckRequest()
    http = r.attributes.request.http
    http.method, http.path = "POST", "/mcp/github"
    http.headers["authorization"] = f"Bearer {key}"
    http.headers["x-request-id"] = "rid"
    r.attributes.context_extensions["mcp_server"] = "github"
    return r


def _input(key: str):  # type: ignore[no-untyped-def]
    from authz_server.envoy.request import to_input

    return to_input(_check(key))


def _status(body: bytes) -> int:
    return CheckResponse.FromString(body).status.code


# --- what the core loop could not read (envoy/request.py parse) -------------------------------------


def _servicer(w: World) -> tuple[AuthorizationServicer, metrics_module.Metrics]:
    health_state = Health(60)
    health_state.serving = True
    metrics = metrics_module.create()
    servicer = AuthorizationServicer(w.pipeline(), health_state, metrics, BatchWriter("audit", _sink, 10),
                                     LastUsed(None, 60))  # type: ignore[arg-type]
    return servicer, metrics


def _with_deep_tool_name(request: CheckRequest, levels: int = 40) -> bytes:
    """`request` as Envoy sends a tools/call whose params.name nests `levels` deep (too deep for upb)."""
    from authz_server.envoy.protowire import length_delimited as ld
    from authz_server.envoy.request import MCP_FILTER_NAMESPACE

    name = b""
    for _ in range(levels):
        name = ld(5, ld(1, ld(1, b"a") + ld(2, name)))
    metadata = (ld(1, ld(1, b"method") + ld(2, ld(3, b"tools/call")))
                + ld(1, ld(1, b"params") + ld(2, ld(5, ld(1, ld(1, b"name") + ld(2, name))))))  # fmt: skip
    entry = ld(1, MCP_FILTER_NAMESPACE.encode()) + ld(2, metadata)
    return request.SerializeToString() + ld(1, ld(11, ld(1, entry)))


def _decision(body: bytes) -> tuple[int, str]:
    """(HTTP status, reason) of a CheckResponse: (200, "") for an allow."""
    reply = CheckResponse.FromString(body)
    if reply.status.code == code_pb2.OK:
        return 200, ""
    return reply.denied_response.status.code, reply.dynamic_metadata.fields["reason"].string_value


def test_metadata_too_deep_to_read_leaves_the_tool_unknown_a_whole_server_key_allowed(served: list[Served]) -> None:
    """Deep metadata is dropped, not the request: a key for the whole server is allowed, a key limited to
    one tool is refused (it cannot be told which tool is called), as it would be for a shallow call of
    another tool; the same key with the tool readable is allowed."""
    from authz_server.envoy import request as request_translator

    w = World()
    w.server("github", AuthMode.NONE)
    whole, scoped = w.key(w.principal("whole")), w.key(w.principal("scoped"), scope=("github:search",))
    servicer, _metrics = _servicer(w)
    s = Served(servicer.check, parse=request_translator.parse)
    served.append(s)
    assert _decision(s.raw(_with_deep_tool_name(_check(whole)), timeout=5)) == (200, "")
    assert _decision(s.raw(_with_deep_tool_name(_check(scoped)), timeout=5)) == (403, "scope_tool")
    readable = _check(scoped)
    readable.attributes.metadata_context.filter_metadata[request_translator.MCP_FILTER_NAMESPACE].update(
        {"method": "tools/call", "params": {"name": "search"}})  # fmt: skip
    assert _decision(s.raw(readable.SerializeToString(), timeout=5)) == (200, "")


def test_an_unreadable_check_request_is_a_400_denial_counted_never_a_grpc_error(served: list[Served]) -> None:
    """Fuzzed through a real core loop: whatever the bytes, Check answers a CheckResponse (no gRPC error,
    which Envoy would turn into a 503); what cannot be read at all is a 400 `request_unreadable`, counted."""
    import json
    import random

    from authz_server.envoy import request as request_translator

    w = World()
    w.server("github", AuthMode.NONE)
    key = w.key(w.principal("alice"))
    servicer, metrics = _servicer(w)
    s = Served(servicer.check, parse=request_translator.parse)
    served.append(s)
    assert _decision(s.raw(b"\xff\xff\xff", timeout=5)) == (400, "request_unreadable")
    body = json.loads(CheckResponse.FromString(s.raw(b"\x0b", timeout=5)).denied_response.body)
    assert body["error"]["code"] == -32600 and body["error"]["data"]["reason"] == "request_unreadable"
    rng = random.Random(13)
    real = _check(key).SerializeToString()
    inputs = [rng.randbytes(rng.randrange(1, 60)) for _ in range(300)] + [real[:cut] for cut in range(1, len(real))]
    inputs += [_with_deep_tool_name(_check(key), rng.randrange(35, 400)) for _ in range(20)]
    answers = [_decision(s.raw(data, timeout=5)) for data in inputs]  # any gRPC error raises here
    assert (200, "") in answers and (400, "request_unreadable") in answers
    unreadable = sum(1 for a in answers if a == (400, "request_unreadable")) + 2
    families = {m.name: m for m in metrics.collect_checks()}
    counted = sum(sample.value for sample in families["mcp_authz_check_decisions"].samples
                  if sample.labels.get("reason") == "request_unreadable")  # fmt: skip
    assert counted == unreadable
    assert _decision(s.raw(real, timeout=5)) == (200, "")  # and the loop goes on
