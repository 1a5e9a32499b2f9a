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
