"""Credentials at rest: AES-256-GCM under a versioned master keyring.

Each value is sealed with a fresh 96-bit nonce and an AAD naming its row
(kind, server, principal, field), so a ciphertext copied to another row does
not open. Every `Sealed` records the master key version it used, so the
keyring can hold an old key while values are re-sealed under a new one.

Keyring spec (from MCP_AUTHZ_MASTER_KEY or a 0600 file):
    "<base64 of 32 bytes>"                      one key, version 1
    "2:<base64>,1:<base64>"                     several; the first one seals

Rotation (`mcp-authz master-key`, admin/masterkey.py) edits the file at the spec
level (`spec_with_new_version`, `spec_without_version`, `replace_key_file`), so key
material only ever moves between the file and a `Keyring`; a running sidecar
re-reads the file it was loaded from (`Keyring.source`) and `adopt`s the result.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authz_server.errors import CorruptRow, MasterKeyError
from authz_server.models import Sealed, Secret

ENV_KEY = "MCP_AUTHZ_MASTER_KEY"
ENV_KEY_FILE = "MCP_AUTHZ_MASTER_KEY_FILE"
_CHECK_PLAINTEXT = "mcp-authz master key check v1"
_CHECK_AAD = b"mcp-authz|check"


def aad_shared(server: str, field: str) -> bytes:
    return f"shared|{server}|{field}".encode()


def aad_override(server: str, principal_id: str, field: str) -> bytes:
    return f"override|{server}|{principal_id}|{field}".encode()


def aad_signing(server: str) -> bytes:
    return f"signing|{server}".encode()


class Keyring:
    """Master keys by version; `active` seals, every version opens."""

    def __init__(self, keys: dict[int, bytes], active: int, source: Path | None = None) -> None:
        if active not in keys:
            raise MasterKeyError("The active master key version is not in the keyring.")
        for version, key in keys.items():
            if len(key) != 32:
                raise MasterKeyError(f"Master key version {version} is not 32 bytes (AES-256 needs 32).")
        self._aead = {v: AESGCM(k) for v, k in keys.items()}
        self.active = active
        self.source = source  # the key file it was read from (None: the environment), to re-read it

    def adopt(self, other: Keyring) -> None:
        """Take `other`'s versions and active version in place: everyone holding this keyring
        (the follower, the admin use cases) seals and opens with the new keys from now on."""
        self._aead, self.active = dict(other._aead), other.active

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._aead))

    @classmethod
    def from_spec(cls, spec: str, source: Path | None = None) -> Keyring:
        """Parse a keyring spec. The message never echoes the spec."""
        entries = _spec_entries(spec)
        keys = {version: base64.b64decode(b64) for version, b64 in entries}
        return cls(keys, active=entries[0][0], source=source)

    @staticmethod
    def generate_spec(version: int = 1) -> str:
        return f"{version}:{base64.b64encode(secrets.token_bytes(32)).decode()}"

    def seal(self, plaintext: str, aad: bytes) -> Sealed:
        nonce = secrets.token_bytes(12)
        ct = self._aead[self.active].encrypt(nonce, plaintext.encode(), aad)
        return Sealed(self.active, nonce, ct)

    def open(self, sealed: Sealed, aad: bytes) -> Secret:
        """Decrypt. Raises CorruptRow for a tampered, swapped or foreign ciphertext."""
        aead = self._aead.get(sealed.key_version)
        if aead is None:
            raise MasterKeyError(
                f"A value is sealed with master key version {sealed.key_version}, which is not in the keyring."
            )
        try:
            return Secret(aead.decrypt(sealed.nonce, sealed.ciphertext, aad).decode())
        except (InvalidTag, UnicodeDecodeError):
            raise CorruptRow("A stored credential does not decrypt for its row (tampered, or moved between rows).") from None

    def reseal(self, sealed: Sealed, aad: bytes) -> Sealed:
        """The same value sealed under the active version (itself when it is already); the
        plaintext never leaves this method. Raises as `open` does."""
        if sealed.key_version == self.active:
            return sealed
        return self.seal(self.open(sealed, aad).reveal(), aad)

    def check_values(self) -> dict[int, Sealed]:
        """A known plaintext sealed under every version, stored so a wrong key is caught at start."""
        out = {}
        for version, aead in self._aead.items():
            nonce = secrets.token_bytes(12)
            out[version] = Sealed(version, nonce, aead.encrypt(nonce, _CHECK_PLAINTEXT.encode(), _CHECK_AAD))
        return out

    def verify_check(self, stored: dict[int, Sealed]) -> None:
        """Raise MasterKeyError unless every version known to the store opens with our key."""
        if stored and not set(stored) & set(self._aead):
            raise MasterKeyError("None of the master key versions matches this store. Use the store's master key.")
        for version, sealed in stored.items():
            aead = self._aead.get(version)
            if aead is None:
                continue  # retired version: values under it must have been re-sealed
            try:
                aead.decrypt(sealed.nonce, sealed.ciphertext, _CHECK_AAD)
            except InvalidTag:
                raise MasterKeyError(
                    f"The master key (version {version}) does not match this store. "
                    "Use the key the store was initialised with."
                ) from None


def _spec_entries(spec: str) -> list[tuple[int, str]]:
    """(version, base64) per entry, in the spec's order (the first seals). The message never echoes the spec."""
    entries = [e.strip() for e in spec.strip().split(",") if e.strip()]
    if not entries:
        raise MasterKeyError("The master key is empty.")
    out: list[tuple[int, str]] = []
    for entry in entries:
        version_text, sep, b64 = entry.rpartition(":")
        if not sep:
            version_text, b64 = "1", entry
        try:
            version = int(version_text)
            base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error):
            raise MasterKeyError(
                "The master key is malformed: expected base64 of 32 bytes, or 'VERSION:BASE64' entries."
            ) from None
        if version < 1 or version in (v for v, _ in out):
            raise MasterKeyError("Master key versions must be distinct positive integers.")
        out.append((version, b64))
    return out


def _format_spec(entries: Iterable[tuple[int, str]]) -> str:
    return ",".join(f"{version}:{b64}" for version, b64 in entries)


def spec_with_new_version(spec: str, above: Iterable[int] = (), *, active: bool = True) -> tuple[str, int]:
    """The spec with a new random key, numbered above every version in the spec and in `above`
    (e.g. versions the store remembers); and that version. In front (it seals) when `active`,
    else last (on standby: it opens, and `spec_activating` makes it seal later)."""
    entries = _spec_entries(spec)
    version = max([v for v, _ in entries] + list(above)) + 1
    new = (version, Keyring.generate_spec(version).split(":", 1)[1])
    return _format_spec([new, *entries] if active else [*entries, new]), version


def spec_activating(spec: str, version: int) -> str:
    """The spec with `version` moved to the front, so it seals."""
    entries = _spec_entries(spec)
    chosen = [e for e in entries if e[0] == version]
    if not chosen:
        raise MasterKeyError(f"Master key version {version} is not in the key file.")
    return _format_spec(chosen + [e for e in entries if e[0] != version])


def active_cannot_go(version: int) -> str:
    """Why the active version cannot be dropped (the key file must always hold the key that seals)."""
    return (f"Master key version {version} is the active one: new values are sealed with it. "
            "Add a newer version first ('mcp-authz master-key add').")  # fmt: skip


def spec_without_version(spec: str, version: int) -> str:
    """The spec without `version`. The active (first) version cannot be dropped: new values are sealed with it."""
    entries = _spec_entries(spec)
    if entries[0][0] == version:
        raise MasterKeyError(active_cannot_go(version))
    return _format_spec(e for e in entries if e[0] != version)


def load_keyring(env: dict[str, str] | None = None) -> Keyring:
    """The keyring from MCP_AUTHZ_MASTER_KEY, or from the file MCP_AUTHZ_MASTER_KEY_FILE (mode 0600)."""
    env = dict(os.environ) if env is None else env
    spec = env.get(ENV_KEY, "")
    path = env.get(ENV_KEY_FILE, "")
    if spec and path:
        raise MasterKeyError(f"Set only one of {ENV_KEY} and {ENV_KEY_FILE}.")
    if path:
        spec = read_key_file(Path(path))
    if not spec:
        raise MasterKeyError(
            f"No master key. Set {ENV_KEY}, or {ENV_KEY_FILE} to a file with mode 0600 "
            "('mcp-authz init' creates one)."
        )
    return Keyring.from_spec(spec, Path(path) if path else None)


def read_key_file(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise MasterKeyError(f"Cannot read the master key file {path}: {exc.strerror}.") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(
            f"The master key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600."
        )
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        raise MasterKeyError(f"Cannot read the master key file {path}.") from None


def write_key_file(path: Path, spec: str) -> None:
    """Create a new 0600 key file; never overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(spec + "\n")


def replace_key_file(path: Path, spec: str) -> None:
    """Replace the key file atomically, 0600: a reader sees the old spec or the new one, never half of
    either, and a crash leaves one of them. The new file is fsynced before it takes the name."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(spec + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash once the directory is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (inode, size, mtime), or None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
