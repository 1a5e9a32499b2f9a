"""Gateway keys: `mgw_` + 32 base62 characters.

Layout of the 32 characters, all drawn from `secrets`:

    KKKKKKK SSSSSSSSSSSSSSSSSSS CCCCCC
    key id  secret              checksum
    7 chars 19 chars (~113 bits) CRC32 of "mgw_" + id + secret, base62, 6 chars

The key id is public: it is logged, shown in listings and used to find the
stored Argon2id hash. The checksum lets a typo or a foreign string be refused
before any lookup or hashing, as GitHub's tokens do.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import zlib
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from authz_server.errors import Denied, Reason
from authz_server.models import Secret

PREFIX = "mgw_"
ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY_ID_LEN = 7
SECRET_LEN = 19
CHECKSUM_LEN = 6
BODY_LEN = KEY_ID_LEN + SECRET_LEN + CHECKSUM_LEN
KEY_LEN = len(PREFIX) + BODY_LEN
KEY_ID_SLICE = slice(len(PREFIX), len(PREFIX) + KEY_ID_LEN)  # where the key id sits in a well-formed key
_BASE62 = frozenset(ALPHABET)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A presented key that is well-formed and whose checksum matches."""

    key_id: str
    digest: bytes  # SHA-256 of the whole key: the verified-cache and negative-cache index


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def _checksum(head: str) -> str:
    return _base62(zlib.crc32(head.encode("ascii")), CHECKSUM_LEN)


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def generate() -> tuple[str, Secret]:
    """A fresh key: (key id, the key). The key is shown once and never stored."""
    key_id = _random(KEY_ID_LEN)
    head = PREFIX + key_id + _random(SECRET_LEN)
    return key_id, Secret(head + _checksum(head))


# The one definition of "key-shaped", for finding keys where they must not be (a URL, a
# message, an audit field). A key-shaped string is a key whether or not its checksum holds:
# a typo'd key still carries most of a secret.
KEY_SHAPE = re.compile(rf"{PREFIX}[0-9A-Za-z]{{{BODY_LEN}}}")
# Redaction is broader: anything that starts like a key and runs on for 16 or more characters
# (a truncated copy still carries secret characters) becomes its key id and a marker. A run
# stops where another key begins, so keys pasted back to back are each cut to their own id.
_REDACTABLE = re.compile(rf"{PREFIX}((?:(?!{PREFIX})[0-9A-Za-z]){{16,}})")
REDACTED = "…redacted"
# Only ASCII space and tab surround a key in a header; anything else makes it malformed.
SPACE = " \t"


def looks_like_key(text: str) -> bool:
    """Whether `text` is exactly key-shaped: `mgw_` and 32 base62 characters."""
    return len(text) == KEY_LEN and KEY_SHAPE.fullmatch(text) is not None


def contains_key(text: str) -> bool:
    """Whether a key-shaped string occurs anywhere in `text`."""
    return PREFIX in text and KEY_SHAPE.search(text) is not None


def redact(text: str) -> str:
    """`text` with every key-like run replaced by `mgw_<key id>…redacted`: the key id is public."""
    if PREFIX not in text:
        return text
    return _REDACTABLE.sub(lambda m: PREFIX + m.group(1)[:KEY_ID_LEN] + REDACTED, text)


def digest(presented: str) -> bytes:
    """SHA-256 of a whole presented key: how caches index it, so the key itself is never kept."""
    return hashlib.sha256(presented.encode("ascii", "replace")).digest()


def parse(presented: str) -> ParsedKey:
    """Check format and checksum without touching any store. Raises Denied."""
    if len(presented) != KEY_LEN or not presented.startswith(PREFIX):
        raise Denied(Reason.KEY_MALFORMED)
    body = presented[len(PREFIX) :]
    if not _BASE62.issuperset(body):
        raise Denied(Reason.KEY_MALFORMED)
    key_id = body[:KEY_ID_LEN]
    if _checksum(presented[: -CHECKSUM_LEN]) != body[-CHECKSUM_LEN:]:
        raise Denied(Reason.KEY_CHECKSUM, key_id=key_id)
    return ParsedKey(key_id, digest(presented))


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """Argon2id cost for gateway keys.

    A gateway key's secret is 113 random bits, not a password: no amount of
    hashing cost changes whether a stolen hash can be reversed (it cannot). The
    cost only decides how long a key's first use in a process takes, and how much
    CPU a flood of well-formed wrong keys can burn. So the default is small: 2 MiB,
    one pass, ~1 ms here, which keeps 32 concurrent first uses on 2 cores well
    under 50 ms (benchmarks/RESULTS.md, C-cold). Operators may raise it with
    MCP_AUTHZ_ARGON2_MEMORY_KIB / MCP_AUTHZ_ARGON2_TIME_COST; stored hashes carry
    their own parameters, so older keys keep verifying at the cost they were made with.
    """

    time_cost: int = 1
    memory_cost_kib: int = 2048
    parallelism: int = 1


class KeyHasher:
    """Argon2id hashing of whole gateway keys."""

    def __init__(self, params: Argon2Params = Argon2Params()) -> None:
        self._ph = PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_cost_kib,
            parallelism=params.parallelism,
        )

    def hash(self, key: Secret) -> str:
        return self._ph.hash(key.reveal())

    def verify(self, stored_hash: str, presented: str) -> bool:
        """True when `presented` matches. A corrupt hash is a mismatch, never an exception."""
        try:
            return self._ph.verify(stored_hash, presented)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
