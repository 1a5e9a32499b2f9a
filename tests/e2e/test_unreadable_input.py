"""Issue 13, end to end: deep, huge and malformed metadata, on Check and on the access-log stream,
never ends a stream and never loses another request's record. A real Envoy, the real sidecar and
the example MCP server.

Envoy's MCP filter copies `params.name`, `params._meta` and `id` into dynamic metadata at whatever
depth the body has. Past about 30 levels of JSON upb refuses the CheckRequest, and any
access-log message carrying such an entry. The sidecar used to answer that Check with
INVALID_ARGUMENT (Envoy: 503) and end the access-log stream, losing every entry of the message
and of the stream: another principal's usage rows went with it.

Now a Check whose metadata cannot be read is decided without it (the tool is unknown: a key
limited to tools is refused, a key for the whole server is allowed), and each access-log entry is
read alone: one that cannot be read whole is read with only the metadata attribution needs, and
the stream goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2
from prometheus_client.parser import text_string_to_metric_families

from authz_server.admin.service import Actor

from .harness import INITIALIZE_REQUEST, LOOPBACK, MCP_ACCEPT, run_envoy, run_example_server
from .sidecar import Gateway, World, add_key, admin_service, run_sidecar, seed

pytestmark = pytest.mark.e2e
SERVER = "linear"  # a shared credential: every valid key is allowed and forwarded
STREAM_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


class Stack(Gateway):
    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.sidecar.http("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip

    def usage(self, principal: str) -> list[dict[str, Any]]:
        done = self.world.cli("usage", "--json", "--limit", "10000", "--principal", principal)
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)["usage"]
        return rows


async def _scoped_key(world: World) -> None:
    """dave-scoped: a key of dave's limited to one tool of `linear`."""
    async with admin_service(world) as svc:
        await add_key(svc, world, "dave", "dave-scoped", label="scoped", scope=[f"{SERVER}:whoami"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("unreadable")
    world = asyncio.run(seed(tmp / "world"))
    asyncio.run(_scoped_key(world))
    with ExitStack() as stop:
        sidecar = stop.enter_context(run_sidecar(world))
        upstream = stop.enter_context(run_example_server(tmp))
        envoy = stop.enter_context(run_envoy(tmp, authz_port=sidecar.port, upstream_port=upstream.port,
                                             servers=(SERVER,)))  # fmt: skip
        yield Stack(world, sidecar, upstream, envoy)


def _nested(levels: int, leaf: str = '"x"') -> str:
    for _ in range(levels):
        leaf = '{"a":' + leaf + "}"
    return leaf


def _call(name: str = '"whoami"', *, meta: str | None = None, request_id: str = "1") -> str:
    params = '{"name":' + name + (',"_meta":' + meta if meta is not None else "") + "}"
    return '{"jsonrpc":"2.0","id":' + request_id + ',"method":"tools/call","params":' + params + "}"


# What the other principal sends: (label, body). The deep ones exceed upb's limit in the CheckRequest
# and in the access-log entry; the others are large, over Envoy's 64 KiB parse limit, or not JSON-RPC.
DEEP = [(f"name nested {n}", _call(_nested(n))) for n in range(40, 60)]
OTHER = [
    ("_meta nested 50", _call(meta=_nested(50))),
    ("id nested 50", _call(request_id=_nested(50))),
    ("60 KiB of _meta", _call(meta=json.dumps({f"k{i}": "v" * 50 for i in range(1000)}))),
    ("300 KiB of _meta", _call(meta=json.dumps({f"k{i}": "v" * 50 for i in range(5000)}))),
    ("name nested 150", _call(_nested(150))),
    ("truncated", _call()[:40]),
    ("not JSON", "not json"),
    ("duplicate name", _call('"whoami","name":"add"')),
    ("5,000 brackets", "[" * 5000),
]


async def test_deep_huge_and_malformed_bodies_cost_no_one_else_anything(stack: Stack) -> None:
    """While carol sends a steady trickle of valid requests, dave sends deep, huge and malformed
    bodies with a key for the whole server, with a key limited to one tool, and without a key.
    Every one is answered by the gateway or the upstream, never 503; every request that reached
    Check has its usage row, carol's all of them; the access-log stream never ended."""
    envoy, url = stack.envoy, stack.envoy.url(SERVER)
    before = stack.metrics()
    checks_before = _envoy_checks(stack)
    completed_before = envoy.stat("cluster.mcp_authz.upstream_rq_completed") or 0
    carol = {**stack.bearer("carol"), "accept": MCP_ACCEPT}
    trickle: list[int] = []
    attacking = True

    async def steady_trickle() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while attacking or len(trickle) < 40:
                trickle.append((await client.post(url, json=INITIALIZE_REQUEST, headers=carol)).status_code)
                await asyncio.sleep(0.02)

    async def send(client: httpx.AsyncClient, headers: dict[str, str], body: str) -> httpx.Response:
        headers = {**headers, "accept": MCP_ACCEPT, "content-type": "application/json"}
        return await client.post(url, content=body, headers=headers)

    trickling = asyncio.create_task(steady_trickle())
    answers: dict[str, list[tuple[str, httpx.Response]]] = {"whole server": [], "one tool": [], "no key": []}
    async with httpx.AsyncClient(timeout=10) as client:
        for who, headers in (("whole server", stack.bearer("dave")), ("one tool", stack.bearer("dave-scoped")),
                             ("no key", {})):  # fmt: skip
            for label, body in DEEP + OTHER:
                answers[who].append((label, await send(client, headers, body)))
                await asyncio.sleep(0.01)  # spread over several access-log flushes
    attacking = False
    await trickling

    # Every answer is the gateway's or the upstream's, never Envoy's for an authorization service in trouble.
    for who, sent in answers.items():
        for label, r in sent:
            assert r.status_code != 503, (who, label, r.text)
            assert "authz_unavailable" not in r.text, (who, label)
    # Deep metadata is dropped, so the tool is unknown: a key limited to tools is refused (fail closed),
    # a key for the whole server reaches the upstream (which refuses a call outside a session).
    for label, r in answers["one tool"][: len(DEEP)]:
        assert r.status_code == 403 and r.json()["error"]["data"]["reason"] == "scope_tool", (label, r.text)
    for label, r in answers["whole server"][: len(DEEP)]:
        assert r.status_code == 400 and "reason" not in r.text, (label, r.text)  # the upstream's answer
    assert all(r.status_code == 401 for _, r in answers["no key"])
    assert trickle and set(trickle) == {200}

    # Every request that reached Check has its usage row: all of carol's, and dave's own too.
    def rows(who: str, expected: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while len(found := stack.usage(who)) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    carol_rows = rows("carol", len(trickle))
    assert len(carol_rows) == len(trickle)
    assert {(r["decision"], r["upstream_status"]) for r in carol_rows} == {("allow", 200)}
    dave_rows = rows("dave", len(answers["whole server"]) + len(answers["one tool"]))
    assert len(dave_rows) == len(answers["whole server"]) + len(answers["one tool"])
    deep_rows = [r for r in dave_rows if r["mcp_method"] == "" and r["key_id"] == stack.world.key_ids["dave"]]
    assert len(deep_rows) >= len(DEEP)  # decided and attributed without the MCP method and tool

    # The sidecar read everything: no Check refused as unreadable, no entry skipped, one stream.
    after = stack.metrics()
    checks = _envoy_checks(stack) - checks_before
    assert checks == len(trickle) + 3 * len(DEEP + OTHER)  # every request reached Check
    decided = sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == "mcp_authz_check_decisions_total")
    assert decided == checks
    assert not any(k[0] == "mcp_authz_check_decisions_total" and ("reason", "request_unreadable") in k[1]
                   for k in after)  # fmt: skip
    assert after[("mcp_authz_access_log_unreadable_total", (("part", "entry"),))] == 0
    assert after[("mcp_authz_access_log_unreadable_total", (("part", "message"),))] == 0
    assert after[("mcp_authz_access_log_streams", ())] == 1
    # Envoy's side: every gRPC call to the sidecar that completed was a Check; the access-log stream
    # never ended (an ended stream is a completed call too), and Envoy dropped no entry.
    assert (envoy.stat("cluster.mcp_authz.upstream_rq_completed") or 0) - completed_before == checks
    assert envoy.stat("access_logs.grpc_access_log.logs_dropped") == 0
    assert "stream failed" not in stack.sidecar.logs()


def _envoy_checks(stack: Stack) -> int:
    """Checks Envoy's ext_authz sent and got an answer to (allowed, denied, or failed)."""
    return sum(stack.envoy.stat(f"http.mcp_ingress.ext_authz.{outcome}") or 0 for outcome in ("ok", "denied", "error"))


async def test_an_unreadable_message_or_entry_on_the_access_log_stream_costs_only_itself(stack: Stack) -> None:
    """Straight to the Check listener, as Envoy would send them: a good entry, a message that is not
    protobuf, a message whose entry is too deep for upb, one too large to keep, a truncated message,
    and a good entry again. The stream is never ended by the sidecar; each good entry is recorded,
    the deep one too (without the metadata it does not need); what cannot be read is counted."""
    alice_id = _principal_id(stack, "alice")
    before = stack.metrics()
    deep = _entry(alice_id, "deep-entry", mcp=_deep_struct(60))
    huge = _entry(alice_id, "huge-entry", path="/" + "x" * 300_000)  # over the sidecar's bound even unparsed
    messages = [
        _message(_entry(alice_id, "first-good")),
        b"\xff\xff\xff\xff",
        _message(deep),
        _message(huge),
        _message(_entry(alice_id, "lost-after-truncation"))[:-3],
        _message(_entry(alice_id, "last-good")),
    ]

    async def stream() -> AsyncIterator[bytes]:
        for message in messages:
            yield message
            await asyncio.sleep(0.05)

    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{stack.sidecar.port}") as channel:
        call = channel.stream_unary(STREAM_METHOD)
        reply = await call(stream(), timeout=10)  # ended by us, answered OK: never cut off
    assert reply == b""

    def ids() -> set[str]:
        return {r["request_id"] for r in stack.usage("alice")}

    deadline = time.monotonic() + 5
    while not {"first-good", "deep-entry", "last-good"} <= ids() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert {"first-good", "deep-entry", "last-good"} <= ids()
    assert not {"huge-entry", "lost-after-truncation"} & ids()
    after = stack.metrics()
    unreadable = {part: after[("mcp_authz_access_log_unreadable_total", (("part", part),))]
                  - before.get(("mcp_authz_access_log_unreadable_total", (("part", part),)), 0.0)
                  for part in ("entry", "message")}  # fmt: skip
    # Not protobuf, and truncated: two messages; the huge entry: one entry.
    assert unreadable == {"entry": 1, "message": 2}


def _principal_id(stack: Stack, name: str) -> str:
    done = stack.world.cli("principals", "list", "--json")
    principals = json.loads(done.stdout)
    found = next(p for p in (principals["principals"] if isinstance(principals, dict) else principals)
                 if p["name"] == name)  # fmt: skip
    return str(found["id"])


def _ld(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand: nothing here may go through upb."""
    key, length, out = number << 3 | 2, len(value), bytearray()
    for n in (key, length):
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out) + value


def _deep_struct(levels: int) -> bytes:
    """A google.protobuf.Struct {"a": {"a": ... {}}} nested `levels` deep, serialized."""
    struct = b""
    for _ in range(levels):
        struct = _ld(1, _ld(1, b"a") + _ld(2, _ld(5, struct)))
    return struct


def _entry(principal_id: str, request_id: str, *, mcp: bytes | None = None, path: str = "/mcp/linear") -> bytes:
    """An HTTPAccessLogEntry as Envoy sends it for an allowed request of `principal_id`, serialized."""
    entry = HTTPAccessLogEntry()
    entry.common_properties.start_time.GetCurrentTime()
    entry.common_properties.duration.FromMilliseconds(3)
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(
        {"decision": "allow", "principal_id": principal_id, "key_id": "K000000", "server": SERVER,
         "credential": "shared"}  # fmt: skip
    )
    entry.request.request_id = request_id
    entry.request.path = path
    entry.response.response_code.value = 200
    data = entry.SerializeToString()
    if mcp is not None:  # the MCP filter's namespace, appended: map entries merge
        data += _ld(1, _ld(17, _ld(1, _ld(1, b"envoy.filters.http.mcp") + _ld(2, mcp))))
    return data


def _message(*entries: bytes) -> bytes:
    """A StreamAccessLogsMessage with these entries (serialized), as Envoy's first message has an identifier."""
    identifier = als_pb2.StreamAccessLogsMessage.Identifier(log_name="mcp_authz_usage").SerializeToString()
    return _ld(1, identifier) + _ld(2, b"".join(_ld(1, e) for e in entries))
