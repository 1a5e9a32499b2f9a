"""crypto/keys.py: gateway key format, checksum, Argon2id hashing, and `redact`, the one definition
of what is shown of a key (a key-shaped string anywhere in a text)."""

from __future__ import annotations

import re

import pytest

from authz_server.crypto import keys
from authz_server.crypto.keys import redact
from authz_server.errors import Denied

from ..fakes import FAST, real_key, redacted


def test_generated_key_shape() -> None:
    key_id, key = keys.generate()
    text = key.reveal()
    assert re.fullmatch(r"mgw_[0-9A-Za-z]{32}", text)
    assert text[4:11] == key_id
    assert keys.parse(text).key_id == key_id
    assert "mgw_" not in repr(key) and text not in str(key)


def test_keys_are_unique_and_random() -> None:
    generated = {keys.generate()[1].reveal() for _ in range(2000)}
    assert len(generated) == 2000
    assert len({k[4:11] for k in generated}) == 2000


def test_secret_part_carries_at_least_112_bits() -> None:
    import math

    assert keys.SECRET_LEN * math.log2(62) >= 112
    assert keys.BODY_LEN == 32


def _flip(text: str, index: int) -> str:
    c = text[index]
    replacement = "A" if c != "A" else "B"
    return text[:index] + replacement + text[index + 1 :]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda k: k[:-1], "key_malformed"),  # truncated
        (lambda k: k + "x", "key_malformed"),  # too long
        (lambda k: "mgx_" + k[4:], "key_malformed"),  # wrong prefix
        (lambda k: k[:10] + "-" + k[11:], "key_malformed"),  # not base62
        (lambda k: k[:10] + "é" + k[11:], "key_malformed"),  # non-ascii
        (lambda k: "", "key_malformed"),
        (lambda k: _flip(k, 5), "key_checksum"),  # typo in key id
        (lambda k: _flip(k, 20), "key_checksum"),  # typo in secret
        (lambda k: _flip(k, 35), "key_checksum"),  # typo in checksum
        (lambda k: k[:4] + k[5] + k[4] + k[6:], "key_checksum"),  # transposition
    ],
)
def test_parse_rejects(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    _, key = keys.generate()
    text = key.reveal()
    if mutate(text) == text:
        pytest.skip("mutation produced the same key")
    with pytest.raises(Denied) as exc:
        keys.parse(mutate(text))
    assert exc.value.reason == reason
    assert exc.value.status == 401
    assert text not in exc.value.message


def test_checksum_failure_reports_key_id_not_key() -> None:
    key_id, key = keys.generate()
    bad = _flip(key.reveal(), 20)
    with pytest.raises(Denied) as exc:
        keys.parse(bad)
    assert exc.value.key_id == key_id


def test_digest_is_sha256_of_whole_key() -> None:
    import hashlib

    _, key = keys.generate()
    assert keys.parse(key.reveal()).digest == hashlib.sha256(key.reveal().encode()).digest()


def test_argon2id_hash_and_verify() -> None:
    hasher = keys.KeyHasher(FAST)
    _, key = keys.generate()
    _, other = keys.generate()
    stored = hasher.hash(key)
    assert stored.startswith("$argon2id$")
    assert key.reveal() not in stored
    assert hasher.verify(stored, key.reveal())
    assert not hasher.verify(stored, other.reveal())
    assert not hasher.verify("not a hash", key.reveal())


def test_default_argon2_profile_is_argon2id_and_cheap() -> None:
    _, key = keys.generate()
    stored = keys.KeyHasher().hash(key)
    assert stored.startswith("$argon2id$v=19$m=2048,t=1,p=1$")


def test_hashes_verify_at_their_own_recorded_cost() -> None:
    """Keys hashed under an older, costlier profile keep working after the default changes."""
    _, key = keys.generate()
    old = keys.KeyHasher(keys.Argon2Params(time_cost=2, memory_cost_kib=19456)).hash(key)
    assert keys.KeyHasher().verify(old, key.reveal())


# --- redact -----------------------------------------------------------------------------------

K1_ID, K1 = real_key()
K2_ID, K2 = real_key()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (K1, redacted(K1_ID)),
        (f"key:{K1}", f"key:{redacted(K1_ID)}"),
        (f"Bearer {K1} and more", f"Bearer {redacted(K1_ID)} and more"),
        (f"/mcp/github/{K1}/tools?x=1", f"/mcp/github/{redacted(K1_ID)}/tools?x=1"),
        (f"'{K1}'", f"'{redacted(K1_ID)}'"),
        (K1[:24], redacted(K1_ID)),  # truncated copy: 20 characters after the prefix
        (K1[:20], redacted(K1_ID)),  # 16 characters after the prefix: still a secret's worth
        (K1[:19], K1[:19]),  # 15: below the threshold
        (f"{K1}, {K2}", f"{redacted(K1_ID)}, {redacted(K2_ID)}"),
        (f"{K1}{K2}", f"{redacted(K1_ID)}{redacted(K2_ID)}"),  # back to back: a run stops where a key begins
        (f"mgw_{K1}", f"mgw_{redacted(K1_ID)}"),
        ("/files/mgw_notes.txt", "/files/mgw_notes.txt"),
        ("mgw_…", "mgw_…"),
        ("100% of mgw_ prefixes", "100% of mgw_ prefixes"),
        (f"%2F{K1}%2F", f"%2F{redacted(K1_ID)}%2F"),  # percent escapes around a key are kept
        ("", ""),
        ("no prefix at all", "no prefix at all"),
    ],
    ids=[
        "whole", "in-target", "in-text", "in-path", "quoted", "truncated-20", "truncated-16", "short-15",
        "two", "glued", "double-prefix", "notes-file", "ellipsis", "percent", "percent-escaped", "empty", "plain",
    ],
)
def test_redact(text: str, expected: str) -> None:
    got = redact(text)
    assert got == expected
    assert not keys.contains_key(got)
    assert redact(got) == got  # idempotent


def test_redact_returns_the_same_string_when_there_is_no_prefix() -> None:
    text = "nothing to see " * 10
    assert redact(text) is text
