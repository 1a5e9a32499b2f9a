"""live/verified.py, the verified-key cache: when a digest is kept, and every way it stops counting."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from authz_server.crypto import keys
from authz_server.live.tables import AuthState, KeyEntry
from authz_server.live.verified import VerifiedKeys
from authz_server.models import Secret
from authz_server.pipeline.authn import Authenticator, NegativeCache, Pending
from authz_server.pipeline.types import PresentedKey

from ..fakes import CountingHasher, World

DIGEST = b"d" * 32


def _entry(key_id: str = "abc1234", hash_: str = "h1", revoked_at: float | None = None) -> KeyEntry:
    return KeyEntry(key_id, "p_alice", hash_, None, revoked_at, ())


def _cache(*entries: KeyEntry) -> tuple[AuthState, VerifiedKeys]:
    state = AuthState()
    state.keys = {e.key_id: e for e in entries}
    return state, VerifiedKeys(state)


def test_record_keeps_a_digest_only_for_the_hash_the_table_still_holds() -> None:
    entry = _entry()
    state, verified = _cache(entry)
    assert verified.record(entry, DIGEST) and verified.get(entry.key_id) == DIGEST and len(verified) == 1
    state.keys[entry.key_id] = replace(entry, hash="h2")  # re-keyed while hashing
    assert not verified.record(entry, b"e" * 32) and verified.get(entry.key_id) == DIGEST
    del state.keys[entry.key_id]  # removed while hashing
    other = _entry("zzz9999")
    assert not verified.record(other, DIGEST) and other.key_id not in verified


def test_record_is_undone_when_the_follower_replaces_the_entry_during_the_write() -> None:
    """The follower's put and eviction can fall between record's check and its write; the digest must not stay."""
    entry = _entry()
    revoked = replace(entry, revoked_at=time.time())

    class Racing(dict[str, KeyEntry]):
        calls = 0

        def get(self, key_id: str, default: KeyEntry | None = None) -> KeyEntry | None:  # type: ignore[override]
            value = super().get(key_id, default)
            Racing.calls += 1
            if Racing.calls == 1:  # right after record's check: the follower applies a revocation
                self[key_id] = revoked
                verified.replaced(entry, revoked)
            return value

    state = AuthState()
    state.keys = Racing({entry.key_id: entry})
    verified = VerifiedKeys(state)
    assert not verified.record(entry, DIGEST)
    assert entry.key_id not in verified and verified.evictions == 0  # nothing was there to evict yet


@pytest.mark.parametrize(
    ("new", "kept"),
    [
        (replace(_entry(), scope=("github",)), True),  # same secret, other fields changed
        (replace(_entry(), revoked_at=0.0), False),  # revoked
        (replace(_entry(), revoked_at=time.time() + 3600), False),  # revoked with a grace period
        (replace(_entry(), hash="h2"), False),  # re-keyed
        (None, False),  # removed
    ],
    ids=["unchanged-secret", "revoked", "revoked-with-grace", "re-keyed", "removed"],
)
def test_replaced_keeps_the_digest_only_for_an_unchanged_unrevoked_secret(new: KeyEntry | None, kept: bool) -> None:
    entry = _entry()
    state, verified = _cache(entry)
    verified.record(entry, DIGEST)
    if new is None:
        del state.keys[entry.key_id]
    else:
        state.keys[entry.key_id] = new
    verified.replaced(entry, new)
    assert (verified.get(entry.key_id) == DIGEST) is kept
    assert verified.evictions == (0 if kept else 1)


def test_a_new_key_or_an_unverified_one_counts_no_eviction() -> None:
    entry = _entry()
    _, verified = _cache(entry)
    verified.replaced(None, entry)
    verified.replaced(entry, replace(entry, revoked_at=0.0))
    assert verified.evictions == 0 and len(verified) == 0


def test_clear_forgets_every_digest_uncounted_and_keeps_the_hit_path_bound() -> None:
    entry = _entry()
    _, verified = _cache(entry)
    lookup = verified.get
    verified.record(entry, DIGEST)
    verified.clear()
    assert lookup(entry.key_id) is None and verified.evictions == 0
    verified.record(entry, DIGEST)
    assert lookup(entry.key_id) == DIGEST


def test_a_key_re_keyed_during_its_first_use_is_not_cached_and_verifies_again() -> None:
    w = World()
    hasher = CountingHasher()
    w.hasher = hasher
    key = w.key(w.principal("alice"))
    authn = Authenticator(w.state, hasher, workers=1, queue_limit=8, negative=NegativeCache(10, 60),
                          verified=w.verified)
    key_id = keys.parse(key).key_id
    hasher.gate.clear()
    with pytest.raises(Pending) as pending:
        authn.authenticate(PresentedKey(key, "bearer"))
    entry = w.state.keys[key_id]
    rekeyed = replace(entry, hash=hasher.hash(Secret(key)))  # a fresh salt: another hash of the same secret
    w.state.keys[key_id] = rekeyed
    w.verified.replaced(entry, rekeyed)
    hasher.gate.set()
    assert pending.value.future.result(timeout=5) is True
    assert key_id not in w.verified  # verified against a hash the table no longer holds
    while True:  # as Check does: decide again once the (next) verification is done
        try:
            identity = authn.authenticate(PresentedKey(key, "bearer"))
            break
        except Pending as again:
            again.future.exception(timeout=5)
    assert identity.key_id == key_id and hasher.calls == 2 and w.verified.get(key_id) == keys.digest(key)
    authn.close()
