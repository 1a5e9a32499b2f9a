"""AES-256-GCM keyring: round trip, wrong key, tampering, row swapping, versions, key files."""

from __future__ import annotations

import base64
import os
from dataclasses import replace

import pytest

from authz_server.crypto import cipher
from authz_server.crypto.cipher import Keyring, aad_override, aad_shared
from authz_server.errors import CorruptRow, MasterKeyError


@pytest.fixture
def ring() -> Keyring:
    return Keyring.from_spec(Keyring.generate_spec())


def test_round_trip_and_fresh_nonce(ring: Keyring) -> None:
    aad = aad_override("github", "p_alice", "API_KEY")
    a = ring.seal("ghp_secret_value", aad)
    b = ring.seal("ghp_secret_value", aad)
    assert a.nonce != b.nonce and len(a.nonce) == 12
    assert a.ciphertext != b.ciphertext
    assert b"ghp_secret_value" not in a.ciphertext
    assert ring.open(a, aad).reveal() == "ghp_secret_value"


def test_wrong_master_key_does_not_open(ring: Keyring) -> None:
    aad = aad_shared("github", "API_KEY")
    sealed = ring.seal("v", aad)
    other = Keyring.from_spec(Keyring.generate_spec())
    with pytest.raises(CorruptRow):
        other.open(sealed, aad)


def test_tampered_ciphertext_does_not_open(ring: Keyring) -> None:
    aad = aad_shared("github", "API_KEY")
    sealed = ring.seal("value", aad)
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(CorruptRow):
        ring.open(replace(sealed, ciphertext=flipped), aad)
    with pytest.raises(CorruptRow):
        ring.open(replace(sealed, nonce=bytes(12)), aad)


@pytest.mark.parametrize(
    "other_aad",
    [
        aad_override("github", "p_bob", "API_KEY"),  # another principal's row
        aad_override("linear", "p_alice", "API_KEY"),  # another server
        aad_override("github", "p_alice", "CLIENT_ID"),  # another field
        aad_shared("github", "API_KEY"),  # the shared default of the same server
    ],
)
def test_ciphertext_swapped_between_rows_does_not_open(ring: Keyring, other_aad: bytes) -> None:
    sealed = ring.seal("alice-token", aad_override("github", "p_alice", "API_KEY"))
    with pytest.raises(CorruptRow) as exc:
        ring.open(sealed, other_aad)
    assert "alice-token" not in exc.value.message


def test_versions_rotate() -> None:
    old_spec = Keyring.generate_spec(1)
    new_spec = Keyring.generate_spec(2)
    old = Keyring.from_spec(old_spec)
    both = Keyring.from_spec(f"{new_spec},{old_spec}")
    aad = aad_shared("s", "F")
    sealed_old = old.seal("x", aad)
    assert both.active == 2
    assert both.open(sealed_old, aad).reveal() == "x"
    assert both.seal("y", aad).key_version == 2
    with pytest.raises(MasterKeyError, match="version 2"):
        old.open(both.seal("y", aad), aad)


def test_check_values_detect_wrong_key(ring: Keyring) -> None:
    checks = ring.check_values()
    ring.verify_check(checks)
    with pytest.raises(MasterKeyError, match="does not match"):
        Keyring.from_spec(Keyring.generate_spec()).verify_check(checks)
    with pytest.raises(MasterKeyError):
        Keyring.from_spec(Keyring.generate_spec(7)).verify_check(checks)


@pytest.mark.parametrize(
    "spec",
    ["", "not base64!!", base64.b64encode(b"short").decode(), "0:" + base64.b64encode(bytes(32)).decode(), "x:abc"],
)
def test_malformed_specs_are_refused_without_echo(spec: str) -> None:
    with pytest.raises(MasterKeyError) as exc:
        Keyring.from_spec(spec)
    if spec:
        assert spec not in exc.value.message


def test_load_from_env_and_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = Keyring.generate_spec()
    assert cipher.load_keyring({cipher.ENV_KEY: spec}).active == 1
    path = tmp_path / "master.key"
    cipher.write_key_file(path, spec)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert cipher.load_keyring({cipher.ENV_KEY_FILE: str(path)}).active == 1
    with pytest.raises(FileExistsError):
        cipher.write_key_file(path, spec)
    os.chmod(path, 0o644)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        cipher.load_keyring({cipher.ENV_KEY_FILE: str(path)})
    with pytest.raises(MasterKeyError, match="No master key"):
        cipher.load_keyring({})
    with pytest.raises(MasterKeyError, match="Cannot read"):
        cipher.load_keyring({cipher.ENV_KEY_FILE: str(tmp_path / "missing")})
    with pytest.raises(MasterKeyError, match="only one"):
        cipher.load_keyring({cipher.ENV_KEY: spec, cipher.ENV_KEY_FILE: str(path)})


# --- rotation: editing the spec, replacing the file, resealing, adopting ------------------------------------


def test_a_new_version_goes_first_numbered_above_every_known_one() -> None:
    spec = f"{Keyring.generate_spec(3)},{Keyring.generate_spec(1)}"
    grown, version = cipher.spec_with_new_version(spec)
    assert version == 4 and grown.endswith("," + spec)
    ring = Keyring.from_spec(grown)
    assert ring.active == 4 and ring.versions == (1, 3, 4)
    assert cipher.spec_with_new_version(spec, above={9, 2})[1] == 10  # a version the store remembers is not reused
    bare = base64.b64encode(os.urandom(32)).decode()  # a one-key spec without a version is version 1
    assert Keyring.from_spec(cipher.spec_with_new_version(bare)[0]).versions == (1, 2)


def test_a_standby_version_goes_last_until_activated() -> None:
    spec = Keyring.generate_spec(1)
    grown, version = cipher.spec_with_new_version(spec, active=False)
    assert version == 2 and grown.startswith(spec + ",")
    assert Keyring.from_spec(grown).active == 1
    activated = cipher.spec_activating(grown, 2)
    assert Keyring.from_spec(activated).active == 2 and Keyring.from_spec(activated).versions == (1, 2)
    assert cipher.spec_activating(activated, 2) == activated
    with pytest.raises(MasterKeyError, match="version 5 is not in the key file"):
        cipher.spec_activating(grown, 5)


def test_dropping_a_version_keeps_the_others_and_never_the_active_one_out() -> None:
    spec = ",".join(Keyring.generate_spec(v) for v in (3, 2, 1))
    assert Keyring.from_spec(cipher.spec_without_version(spec, 2)).versions == (1, 3)
    assert Keyring.from_spec(cipher.spec_without_version(spec, 7)).versions == (1, 2, 3)  # absent: unchanged
    with pytest.raises(MasterKeyError, match="active one") as exc:
        cipher.spec_without_version(spec, 3)
    assert spec.split(",")[0].split(":")[1] not in exc.value.message


def test_replacing_the_key_file_is_atomic_and_0600(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "master.key"
    cipher.write_key_file(path, Keyring.generate_spec(1))
    os.chmod(path, 0o400)  # whatever the old file's mode, the new one is 0600
    before = cipher.file_stamp(path)
    spec = f"{Keyring.generate_spec(2)},{cipher.read_key_file(path)}"
    cipher.replace_key_file(path, spec)
    assert path.stat().st_mode & 0o777 == 0o600
    assert cipher.read_key_file(path) == spec
    assert cipher.file_stamp(path) != before
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]  # no temporary file left behind
    assert cipher.file_stamp(tmp_path / "missing") is None


def test_reseal_moves_a_value_to_the_active_version_and_keeps_a_current_one() -> None:
    old_spec = Keyring.generate_spec(1)
    ring, both = Keyring.from_spec(old_spec), Keyring.from_spec(cipher.spec_with_new_version(old_spec)[0])
    aad = aad_override("github", "p_alice", "API_KEY")
    old = ring.seal("ghp_value", aad)
    new = both.reseal(old, aad)
    assert new.key_version == 2 and new.nonce != old.nonce
    assert both.open(new, aad).reveal() == "ghp_value"
    assert both.reseal(new, aad) is new
    with pytest.raises(CorruptRow):
        both.reseal(old, aad_override("github", "p_bob", "API_KEY"))  # the row's own AAD still binds it


def test_adopt_swaps_the_keys_in_place_and_load_keyring_remembers_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "master.key"
    cipher.write_key_file(path, Keyring.generate_spec(1))
    ring = cipher.load_keyring({cipher.ENV_KEY_FILE: str(path)})
    assert ring.source == path and cipher.load_keyring({cipher.ENV_KEY: Keyring.generate_spec()}).source is None
    sealed_v1 = ring.seal("x", b"aad")
    spec, _ = cipher.spec_with_new_version(cipher.read_key_file(path))
    held = ring  # as the follower and the admin use cases hold it
    ring.adopt(Keyring.from_spec(spec, path))
    assert held.active == 2 and held.versions == (1, 2)
    assert held.open(sealed_v1, b"aad").reveal() == "x"

