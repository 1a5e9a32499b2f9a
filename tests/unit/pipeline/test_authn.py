"""pipeline/authn.py: where a key may come from, and verifying it.

- `KeyExtractor`: the sources (Bearer, the key header, a whole path segment) in priority order;
- `scan_url`, table-driven: exact key-shaped path segments are path keys and are stripped;
  a key-shaped string anywhere else in the URL, however encoded, is a 400 (issue 11);
- `Authenticator`: Argon2id only on first use: verified cache, single-flight, negative cache,
  bounded queue.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from urllib.parse import quote

import pytest

from authz_server.crypto import keys
from authz_server.errors import Denied
from authz_server.pipeline.authn import Authenticator, KeyExtractor, NegativeCache, Pending, scan_url
from authz_server.pipeline.types import PresentedKey

from ..fakes import CountingHasher, World, alice_key, request, standard_world


def _setup(delay: float = 0.0, queue_limit: int = 64) -> tuple[World, CountingHasher, Authenticator, str]:
    w = World()
    hasher = CountingHasher(delay)
    w.hasher = hasher
    key = w.key(w.principal("alice"))
    authn = Authenticator(w.state, hasher, workers=2, queue_limit=queue_limit, negative=NegativeCache(100, 60),
                          verified=w.verified)
    return w, hasher, authn, key


def _p(key: str) -> PresentedKey:
    return PresentedKey(key, "bearer")


async def test_argon2_runs_once_then_cache_hits() -> None:
    _, hasher, authn, key = _setup()
    for _ in range(5):
        identity = await authn.authenticate_async(_p(key))
        assert identity.principal.name == "alice"
    assert hasher.calls == 1
    # Lookups: the first use misses, and is answered from the cache once its verification is done.
    assert (authn.cache_misses, authn.cache_hits) == (1, 5)


async def test_single_flight_for_concurrent_first_use() -> None:
    _, hasher, authn, key = _setup(delay=0.05)
    results = await asyncio.gather(*(authn.authenticate_async(_p(key)) for _ in range(20)))
    assert {r.key_id for r in results} == {key[4:11]}
    assert hasher.calls == 1


def test_first_use_is_pending_on_one_shared_verification_then_cached() -> None:
    """Check never blocks: every caller during the first use gets the same running verification."""
    _, hasher, authn, key = _setup()
    hasher.gate.clear()
    pendings = []
    for _ in range(8):
        with pytest.raises(Pending) as exc:
            authn.authenticate(_p(key))
        pendings.append(exc.value.future)
    assert len({id(f) for f in pendings}) == 1 and not pendings[0].done() and authn.inflight == 1
    done: list[str] = []
    # A waiter's callback, registered after the authenticator's own, finds the outcome already cached.
    pendings[0].add_done_callback(lambda _f: done.append(authn.authenticate(_p(key)).key_id))
    hasher.gate.set()
    pendings[0].result(timeout=5)
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [key[4:11]]
    assert authn.authenticate(_p(key)).principal.name == "alice"
    assert hasher.calls == 1 and authn.inflight == 0


def test_wrong_secret_is_refused_and_negatively_cached_after_its_verification() -> None:
    _, hasher, authn, key = _setup()
    head = key[:11] + keys.generate()[1].reveal()[11:30]
    wrong = head + keys._checksum(head)
    with pytest.raises(Pending) as exc:
        authn.authenticate(_p(wrong))
    assert exc.value.future.result(timeout=5) is False
    for _ in range(3):
        with pytest.raises(Denied) as denied:
            authn.authenticate(_p(wrong))
        assert denied.value.reason == "key_invalid"
    assert hasher.calls == 1 and authn.negative_hits == 3 and authn.inflight == 0


def test_a_verification_that_cannot_run_is_not_cached_either_way() -> None:
    """A hasher that raises leaves nothing behind: the next request verifies again."""
    _, hasher, authn, key = _setup()
    broken = RuntimeError("hasher broke")
    original = hasher.verify
    hasher.verify = lambda *_a: (_ for _ in ()).throw(broken)  # type: ignore[method-assign]
    with pytest.raises(Pending) as exc:
        authn.authenticate(_p(key))
    assert exc.value.future.exception(timeout=5) is broken
    assert authn.inflight == 0 and len(authn.negative) == 0
    hasher.verify = original  # type: ignore[method-assign]
    with pytest.raises(Pending) as exc:
        authn.authenticate(_p(key))
    assert exc.value.future.result(timeout=5) is True
    assert authn.authenticate(_p(key)).principal.name == "alice"


async def test_wrong_secret_is_negatively_cached() -> None:
    w, hasher, authn, key = _setup()
    other = keys.generate()[1].reveal()
    head = key[:11] + other[11:30]
    wrong = head + keys._checksum(head)
    for _ in range(3):
        with pytest.raises(Denied) as exc:
            await authn.authenticate_async(_p(wrong))
        assert exc.value.reason == "key_invalid"
    # Each refusal, the first included (once its verification failed), comes from the negative cache.
    assert hasher.calls == 1 and authn.negative_hits == 3
    # The real key still works, and a wrong guess never poisons it.
    await authn.authenticate_async(_p(key))


async def test_garbage_never_reaches_argon2() -> None:
    _, hasher, authn, key = _setup()
    garbage = ["mgw_" + "x" * 32, key[:-1] + ("0" if key[-1] != "0" else "1"), keys.generate()[1].reveal(), "", "mgw_"]
    for g in garbage * 50:
        with pytest.raises(Denied) as exc:
            await authn.authenticate_async(_p(g))
        assert exc.value.status == 401
    assert hasher.calls == 0


async def test_queue_bound_answers_overloaded_and_valid_cached_keys_still_pass() -> None:
    w, hasher, authn, key = _setup(queue_limit=2)
    await authn.authenticate_async(_p(key))  # warm
    hasher.gate.clear()  # from here every Argon2 verification blocks until released
    newcomers = [w.key(w.principal(f"n{i}")) for i in range(4)]
    tasks = [asyncio.create_task(authn.authenticate_async(_p(k))) for k in newcomers]
    await asyncio.sleep(0.01)
    # The cached key is answered while both verification slots are still held: not stuck behind Argon2.
    assert (await authn.authenticate_async(_p(key))).principal.name == "alice"
    assert authn.inflight == 2 and not any(t.done() and not t.exception() for t in tasks)
    hasher.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    overloaded = [o for o in outcomes if isinstance(o, Denied) and o.reason == "overloaded"]
    assert len(overloaded) == 2 and all(o.status == 503 for o in overloaded)
    assert sum(1 for o in outcomes if not isinstance(o, Exception)) == 2


async def test_revocation_evicts_a_cached_key() -> None:
    w, _, authn, key = _setup()
    await authn.authenticate_async(_p(key))
    entry = w.state.keys[key[4:11]]
    revoked = replace(entry, revoked_at=time.time() - 1)
    w.state.keys[entry.key_id] = revoked  # as the follower applies a revocation
    w.verified.replaced(entry, revoked)
    assert entry.key_id not in w.verified and w.verified.evictions == 1
    with pytest.raises(Denied) as exc:
        await authn.authenticate_async(_p(key))
    assert exc.value.reason == "key_revoked"


async def test_disabled_principal_is_refused_even_when_cached() -> None:
    w, _, authn, key = _setup()
    await authn.authenticate_async(_p(key))
    alice = w.state.principals["p_alice"]
    w.state.principals[alice.id] = replace(alice, disabled=True)
    with pytest.raises(Denied) as exc:
        await authn.authenticate_async(_p(key))
    assert exc.value.reason == "principal_disabled"


def test_negative_cache_expires_and_is_bounded() -> None:
    now = [0.0]
    cache = NegativeCache(max_size=3, ttl=10, clock=lambda: now[0])
    for d in (b"a", b"b", b"c", b"d"):
        cache.add(d)
    assert len(cache) == 3 and b"a" not in cache and b"d" in cache
    now[0] = 11
    assert b"d" not in cache


# --- where the key comes from --------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "path", "source"),
    [
        ({"authorization": "Bearer K"}, "/mcp/x", "bearer"),
        ({"authorization": "bearer K"}, "/mcp/x", "bearer"),
        ({"x-api-key": "K"}, "/mcp/x", "header"),
        ({}, "/mcp/x/K", "path"),
        ({}, "/mcp/x/K?a=b", "path"),
    ],
)
def test_extractor_sources(headers: dict[str, str], path: str, source: str) -> None:
    key = keys.generate()[1].reveal()
    h = {k: v.replace("K", key) for k, v in headers.items()}
    presented = KeyExtractor("x-api-key", path_keys=True).extract(request(headers=h, path=path.replace("K", key)))
    assert presented.key == key and presented.source == source


def test_path_keys_can_be_turned_off() -> None:
    """Turned off, a path key is not accepted, and neither is it forwarded: the request is refused."""
    key = keys.generate()[1].reveal()
    with pytest.raises(Denied) as exc:
        KeyExtractor("x-api-key", path_keys=False).extract(request(path=f"/mcp/x/{key}"))
    assert exc.value.reason == "key_in_url" and exc.value.status == 400
    with pytest.raises(Denied) as exc:
        KeyExtractor("x-api-key", path_keys=False).extract(request(path="/mcp/x/files"))
    assert exc.value.reason == "key_missing"


async def test_custom_key_header_is_configurable() -> None:
    w = standard_world()
    key = alice_key(w)
    decision = w.pipeline(key_header="x-gateway-key").decide(request(headers={"x-gateway-key": key}))
    assert "x-gateway-key" in decision.headers_to_remove
    with pytest.raises(Denied) as exc:
        w.pipeline(key_header="x-gateway-key").decide(request(headers={"x-api-key": key}))
    assert exc.value.reason == "key_missing"


async def test_key_sources_in_priority_order() -> None:
    """Bearer, then the custom header, then the path: a junk header is not skipped for a path key."""
    w = standard_world()
    key = alice_key(w)
    with pytest.raises(Denied) as exc:
        w.pipeline().decide(request(path=f"/mcp/github/{key}", headers={"x-api-key": "junk"}))
    assert exc.value.reason == "key_malformed"
    decision = w.pipeline().decide(request(bearer=key, path=f"/mcp/github/{key}/sub?q=1"))
    assert dict(decision.headers_to_set)[":path"] == "/mcp/github/sub?q=1"  # the path copy never leaks
    plain = w.pipeline().decide(request(bearer=key, path="/mcp/github?q=1"))
    assert ":path" not in dict(plain.headers_to_set)


# --- a key in the URL ----------------------------------------------------------------------

K = keys.generate()[1].reveal()
K2 = keys.generate()[1].reveal()
ENCODED = "".join(f"%{b:02X}" for b in K.encode())  # every character percent-encoded


@pytest.mark.parametrize(
    ("path", "key", "rewritten"),
    [
        ("/mcp/github", "", None),
        ("/mcp/github/tools?cursor=abc%20def", "", None),
        ("/mcp/github/files/mgw_notes.txt", "", None),
        ("/mcp/github/mgw_" + "a" * 31, "", None),  # one short of a key: not key-shaped
        (f"/mcp/github/{K}", K, "/mcp/github"),
        (f"/mcp/github/{K}/", K, "/mcp/github/"),
        (f"/mcp/github/{K}/tools?x=1", K, "/mcp/github/tools?x=1"),
        (f"/{K}", K, "/"),
        (f"/mcp/{K}/github/{K2}", K, "/mcp/github"),  # the first is the key; both are removed
    ],
)
def test_path_keys_are_whole_segments_and_are_stripped(path: str, key: str, rewritten: str | None) -> None:
    assert scan_url(path) == (key, rewritten)


@pytest.mark.parametrize(
    "path",
    [
        f"/mcp/github?api_key={K}",
        f"/mcp/github?key={K}",
        f"/mcp/github?{K}",
        f"/mcp/github?a=1&token=Bearer%20{K}",
        f"/mcp/github/{K2}?api_key={K}",  # a path key plus a query key
        f"/mcp/github/x{K}",  # inside a segment
        f"/mcp/github/{K}x",
        f"/mcp/github/{K}.json",
        f"/mcp/github/{K[:10]}%{ord(K[10]):02X}{K[11:]}",  # one character encoded
        f"/mcp/github/{ENCODED}",
        f"/mcp/github?k={ENCODED}",
        f"/mcp/github?k={quote(ENCODED)}",  # encoded twice
        f"/mcp/github?k={quote(quote(ENCODED))}",  # three times
        f"/mcp/github?k={K[:12]}+{K[12:]}".replace("+", ""),
    ],
)
def test_a_key_anywhere_else_in_the_url_is_refused(path: str) -> None:
    with pytest.raises(Denied) as refused:
        scan_url(path)
    assert (refused.value.status, refused.value.reason) == (400, "key_in_url")
    assert K not in refused.value.message and K2 not in refused.value.message


def test_a_refused_url_names_the_key_id_for_the_audit_trail() -> None:
    with pytest.raises(Denied) as refused:
        scan_url(f"/mcp/github?api_key={K}")
    assert refused.value.key_id == K[keys.KEY_ID_SLICE]
