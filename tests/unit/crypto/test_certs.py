"""The private CA and certificates of `mcp-authz certs create` (authz_server.crypto.certs).

The certificates are checked as a verifier would (cryptography's x509 verification, the
same path-building a TLS stack does), then used for real: a gRPC server requiring client
certificates, as the Check listener does in mTLS mode, accepts Envoy's client certificate
and refuses a client without one, one with a certificate from another CA, and one that
does not trust the CA.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz_server.cli import main
from authz_server.crypto import certs
from authz_server.errors import ConfigError, Conflict, InvalidInput

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
ALL_FILES = ["ca.crt", "ca.key", "client.crt", "client.key", "server.crt", "server.key"]
KEY_FILES = {"ca.key", "client.key", "server.key"}


def ext(cert: x509.Certificate, kind: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(kind)


def load(directory: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / name).read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def server_verifier(ca: x509.Certificate, name: x509.DNSName | x509.IPAddress) -> Any:
    return PolicyBuilder().store(Store([ca])).time(NOW + timedelta(days=1)).build_server_verifier(name)


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    return certs.create_ca(now=NOW)


# --- the builders ------------------------------------------------------------------------


def test_the_ca_is_a_self_signed_ca_that_signs_leaf_certificates_only(ca: certs.Issued) -> None:
    cert = ca.cert
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == certs.DEFAULT_CA_NAME
    cert.verify_directly_issued_by(cert)  # self-signed
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    assert cert.not_valid_after_utc - NOW == timedelta(days=certs.CA_DAYS)
    assert cert.not_valid_before_utc < NOW  # backdated for a peer's clock skew
    assert b"BEGIN PRIVATE KEY" in ca.key_pem() and b"BEGIN CERTIFICATE" in ca.cert_pem()
    short = certs.create_ca("test CA", days=30, now=NOW)
    assert short.cert.not_valid_after_utc - NOW == timedelta(days=30)


def test_a_server_certificate_verifies_against_the_ca_for_every_host_asked_for(ca: certs.Issued) -> None:
    server = certs.issue_server_cert(ca, ["Example.Internal", "10.0.0.5", "[::1]", "*.svc.local"], now=NOW)
    cert = server.cert
    cert.verify_directly_issued_by(ca.cert)
    sans = ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["example.internal", "*.svc.local"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "example.internal"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ext(
        ca.cert, x509.SubjectKeyIdentifier
    ).value.digest
    assert cert.not_valid_after_utc - NOW == timedelta(days=certs.LEAF_DAYS)
    # A verifier building the chain from the CA accepts it for each name, and for no other.
    for name in (
        x509.DNSName("example.internal"),
        x509.DNSName("a.svc.local"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ):
        chain = server_verifier(ca.cert, name).verify(cert, [])
        assert chain[-1] == ca.cert
    for name in (x509.DNSName("other.internal"), x509.IPAddress(ipaddress.ip_address("10.0.0.6"))):
        with pytest.raises(VerificationError):
            server_verifier(ca.cert, name).verify(cert, [])
    # Not from another CA.
    other = certs.create_ca("another CA", now=NOW)
    with pytest.raises(VerificationError):
        server_verifier(other.cert, x509.DNSName("example.internal")).verify(cert, [])


def test_a_client_certificate_is_for_client_auth_only(ca: certs.Issued) -> None:
    client = certs.issue_client_cert(ca, now=NOW)
    cert = client.cert
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "envoy"
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["envoy"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verified = PolicyBuilder().store(Store([ca.cert])).time(NOW).build_client_verifier().verify(cert, [])
    assert verified.subjects == [x509.DNSName("envoy")]
    # It is no server certificate, and a server certificate is no client certificate.
    with pytest.raises(VerificationError):
        server_verifier(ca.cert, x509.DNSName("envoy")).verify(cert, [])
    server = certs.issue_server_cert(ca, ["envoy"], now=NOW)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca.cert])).time(NOW).build_client_verifier().verify(server.cert, [])
    named = certs.issue_client_cert(ca, "Envoy-Edge.prod", now=NOW)
    assert ext(named.cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["envoy-edge.prod"]


def test_a_leaf_never_outlives_its_ca() -> None:
    ca = certs.create_ca(days=100, now=NOW)
    server = certs.issue_server_cert(ca, ["localhost"], days=825, now=NOW)
    assert server.cert.not_valid_after_utc == ca.cert.not_valid_after_utc
    with pytest.raises(ConfigError, match="expired"):
        certs.issue_server_cert(ca, ["localhost"], now=NOW + timedelta(days=101))


@pytest.mark.parametrize(
    "host",
    ["", " localhost", "a b", "https://example.com", "example.com:443", "x_y.internal", "10.0.0.999", "1.2.3",
     "-a.example", "a..b", "*.com", "a.*.b", "bücher.example", "fe80::1%eth0", "a" * 64 + ".example"],
)
def test_a_host_that_is_neither_a_dns_name_nor_an_ip_address_is_refused(host: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        certs.parse_host(host)
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("host", "expected"),
    [("localhost", x509.DNSName("localhost")), ("Sidecar.Example.", x509.DNSName("sidecar.example")),
     ("xn--bcher-kva.example", x509.DNSName("xn--bcher-kva.example")),
     ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
     ("[2001:db8::1]", x509.IPAddress(ipaddress.ip_address("2001:db8::1")))],
)
def test_hosts_become_dns_or_ip_entries(host: str, expected: x509.GeneralName) -> None:
    assert certs.parse_host(host) == expected


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    for kwargs, match in (
        ({"hosts": []}, "at least one host"),
        ({"hosts": ["ok.example", "not ok"]}, "not ok"),
        ({"client_name": "*.envoy"}, "client name"),
        ({"client_name": "10.0.0.1"}, "client name"),
        ({"days": 0}, "1 to"),
        ({"ca_days": certs.MAX_DAYS + 1}, "1 to"),
    ):
        with pytest.raises(InvalidInput, match=match):
            certs.write_cert_set(out, **kwargs)
        assert not out.exists()


# --- writing a set -------------------------------------------------------------------------


def test_a_new_set_has_private_keys_0600_from_creation_and_a_0700_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        opened.append((Path(path).name, flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(certs.os, "open", spy)
    old_umask = os.umask(0)  # the most permissive umask: the modes must not depend on it
    try:
        out = tmp_path / "deep" / "certs"
        result = certs.write_cert_set(out, ["example.internal", "10.0.0.5"], now=NOW)
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ALL_FILES
    assert mode(out) == 0o700
    for path in out.iterdir():
        assert mode(path) == (0o600 if path.name in KEY_FILES else 0o644), path.name
    # Every key file was created exclusively, 0600, in the one call that made it.
    for name, flags, created_mode in opened:
        assert flags & os.O_CREAT and flags & os.O_EXCL, name
        if name in KEY_FILES:
            assert created_mode == 0o600, name
    assert {n for n, _, _ in opened} == set(ALL_FILES)
    assert [p.name for p in result.written] == [
        "ca.key", "ca.crt", "server.key", "server.crt", "client.key", "client.crt"
    ]
    assert not result.ca_reused and result.hosts == ("example.internal", "10.0.0.5")
    # What is on disk is what was returned, and it chains.
    ca = load(out, "ca.crt")
    assert ca == result.ca and load(out, "server.crt") == result.server and load(out, "client.crt") == result.client
    result.server.verify_directly_issued_by(ca)
    result.client.verify_directly_issued_by(ca)
    loaded = certs.load_ca((out / "ca.crt").read_bytes(), (out / "ca.key").read_bytes(), now=NOW)
    assert loaded.cert == ca


def test_existing_files_are_not_replaced_without_force(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    (out / "server.key").write_text("mine")
    with pytest.raises(Conflict) as caught:
        certs.write_cert_set(out, now=NOW)
    assert str(out / "server.key") in caught.value.message and "--force" in caught.value.message
    assert "\n" not in caught.value.message
    assert sorted(p.name for p in out.iterdir()) == ["server.key"]  # nothing else written
    assert (out / "server.key").read_text() == "mine"
    # A dangling symlink is a file too: nothing is written through it.
    (out / "server.key").unlink()
    (out / "client.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Conflict, match="client.key"):
        certs.write_cert_set(out, now=NOW)
    assert not (tmp_path / "elsewhere").exists()
    # A file where the directory should be.
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        certs.write_cert_set(tmp_path / "afile", now=NOW)


def test_an_existing_ca_is_reused_and_force_replaces_leaf_certificates_only(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    first = certs.write_cert_set(out, now=NOW)
    ca_bytes = (out / "ca.crt").read_bytes(), (out / "ca.key").read_bytes()
    old_server_key = (out / "server.key").read_bytes()

    # Everything exists: refused, naming the leaf files, and the CA is said to be kept.
    with pytest.raises(Conflict) as caught:
        certs.write_cert_set(out, ["replica-2.internal"], now=NOW)
    assert "server.crt" in caught.value.message and "ca.crt" not in caught.value.message
    assert "kept" in caught.value.message

    # Another server certificate from the same CA: move the old set away (or --force).
    moved = tmp_path / "replica-1"
    moved.mkdir()
    for name in ("server.crt", "server.key", "client.crt", "client.key"):
        (out / name).rename(moved / name)
    second = certs.write_cert_set(out, ["replica-2.internal"], now=NOW)
    assert second.ca_reused and second.ca == first.ca
    assert [p.name for p in second.written] == ["server.key", "server.crt", "client.key", "client.crt"]
    assert ((out / "ca.crt").read_bytes(), (out / "ca.key").read_bytes()) == ca_bytes
    second.server.verify_directly_issued_by(first.ca)
    server_verifier(first.ca, x509.DNSName("replica-2.internal")).verify(second.server, [])

    # --force: new leaf certificates, same CA, the modes kept.
    second_server_key = (out / "server.key").read_bytes()
    (out / "server.key").chmod(0o644)
    third = certs.write_cert_set(out, ["replica-3.internal"], force=True, now=NOW)
    assert third.ca_reused and ((out / "ca.crt").read_bytes(), (out / "ca.key").read_bytes()) == ca_bytes
    assert (out / "server.key").read_bytes() not in (old_server_key, second_server_key)
    assert mode(out / "server.key") == 0o600 and mode(out / "server.crt") == 0o644
    third.server.verify_directly_issued_by(first.ca)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # A new CA only when asked, and then only with --force over the old one.
    with pytest.raises(Conflict, match="ca.crt"):
        certs.write_cert_set(out, new_ca=True, now=NOW)
    fourth = certs.write_cert_set(out, new_ca=True, force=True, now=NOW)
    assert not fourth.ca_reused and fourth.ca != first.ca and load(out, "ca.crt") == fourth.ca
    assert mode(out / "ca.key") == 0o600
    fourth.server.verify_directly_issued_by(fourth.ca)


def test_a_half_or_broken_ca_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    certs.write_cert_set(out, now=NOW)
    key = (out / "ca.key").read_bytes()
    (out / "ca.key").unlink()
    with pytest.raises(ConfigError, match="ca.key is not") as half:
        certs.write_cert_set(out, force=True, now=NOW)
    assert "--new-ca" in half.value.message
    # A key that is not the certificate's.
    other = certs.create_ca(now=NOW)
    (out / "ca.key").write_bytes(other.key_pem())
    with pytest.raises(ConfigError, match="does not belong") as mismatch:
        certs.write_cert_set(out, force=True, now=NOW)
    assert "PRIVATE KEY" not in mismatch.value.message
    assert (out / "ca.key").read_bytes() == other.key_pem()  # nothing replaced
    # A leaf certificate posing as the CA.
    server = certs.issue_server_cert(other, ["x.example"], now=NOW)
    with pytest.raises(ConfigError, match="not a CA"):
        certs.load_ca(server.cert_pem(), server.key_pem(), now=NOW)
    with pytest.raises(ConfigError, match="not a PEM"):
        certs.load_ca(b"junk", key, now=NOW)
    with pytest.raises(ConfigError, match="expired"):
        certs.load_ca(other.cert_pem(), other.key_pem(), now=NOW + timedelta(days=certs.CA_DAYS + 1))


# --- the certificates over real TLS -------------------------------------------------------------


@pytest.fixture
def mtls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A gRPC health service on 127.0.0.1 requiring a client certificate from the CA, as
    the Check listener does in mTLS mode."""
    out = tmp_path / "certs"
    certs.write_cert_set(out, ["localhost", "127.0.0.1"])
    creds = grpc.ssl_server_credentials(
        [((out / "server.key").read_bytes(), (out / "server.crt").read_bytes())],
        root_certificates=(out / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    assert port
    server.start()
    try:
        yield port, out
    finally:
        server.stop(grace=None).wait(5)


def health_check(port: int, creds: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        return status


def test_envoys_client_certificate_is_accepted_and_others_refused(
    mtls_server: tuple[int, Path], tmp_path: Path
) -> None:
    port, out = mtls_server
    ca, key, cert = ((out / n).read_bytes() for n in ("ca.crt", "client.key", "client.crt"))
    # (a) Envoy's client certificate, trusting the CA (the server certificate's IP SAN matches).
    assert health_check(port, grpc.ssl_channel_credentials(ca, key, cert)) == health_pb2.HealthCheckResponse.SERVING

    # (b) No client certificate.
    with pytest.raises(grpc.RpcError) as refused:
        health_check(port, grpc.ssl_channel_credentials(ca))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # (c) A client that does not trust the CA (it holds a valid client certificate).
    stranger = certs.write_cert_set(tmp_path / "stranger")
    other_ca = (tmp_path / "stranger" / "ca.crt").read_bytes()
    with pytest.raises(grpc.RpcError) as untrusted:
        health_check(port, grpc.ssl_channel_credentials(other_ca, key, cert))
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE

    # (d) A client certificate from another CA.
    assert stranger.client != load(out, "client.crt")
    other_key, other_cert = ((tmp_path / "stranger" / n).read_bytes() for n in ("client.key", "client.crt"))
    with pytest.raises(grpc.RpcError) as foreign:
        health_check(port, grpc.ssl_channel_credentials(ca, other_key, other_cert))
    assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    for var in list(os.environ):
        if var.startswith("MCP_AUTHZ_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        return code, captured.out, captured.err

    return run


def no_key_material(out: Path, *texts: str) -> None:
    bodies = [line for name in KEY_FILES for line in (out / name).read_text().splitlines() if "-----" not in line]
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert not [b for b in bodies if b in text]


def test_certs_create_writes_the_set_and_prints_paths_and_next_steps(cli: Any, tmp_path: Path) -> None:
    code, out, err = cli("certs", "create", "--out", "tls", "--host", "example.internal", "--host", "10.0.0.5")
    assert code == 0, err
    d = tmp_path / "tls"
    assert sorted(p.name for p in d.iterdir()) == ALL_FILES and mode(d) == 0o700
    assert all(mode(d / n) == 0o600 for n in KEY_FILES)
    no_key_material(d, out, err)
    for name in ALL_FILES:
        assert f"tls/{name}" in out
    assert "--tls-cert tls/server.crt --tls-key tls/server.key --client-ca tls/ca.crt" in out
    assert "--admin-tls-cert tls/server.crt --admin-tls-key tls/server.key" in out
    assert "--ca tls/ca.crt" in out and "tls/client.crt" in out and "tls/client.key" in out
    sans = ext(load(d, "server.crt"), x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["example.internal"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]

    # Again: refused, one line naming the files, nothing changed.
    before = {n: (d / n).read_bytes() for n in ALL_FILES}
    code, out, err = cli("certs", "create", "--out", "tls")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "tls/server.crt" in err and "--force" in err
    assert {n: (d / n).read_bytes() for n in ALL_FILES} == before

    # --force, as JSON: new leaf certificates from the same CA, default hosts.
    code, out, err = cli("--json", "certs", "create", "--out", "tls", "--force", "--client-name", "edge", "--days", "30")
    assert code == 0, err
    doc = json.loads(out)
    no_key_material(d, out, err)
    assert doc["ca"]["reused"] is True and (d / "ca.crt").read_bytes() == before["ca.crt"]
    assert doc["written"] == [f"tls/{n}" for n in ("server.key", "server.crt", "client.key", "client.crt")]
    assert doc["server"]["hosts"] == ["localhost", "127.0.0.1"] and doc["client"]["name"] == "edge"
    assert "--client-ca tls/ca.crt" in doc["next_steps"]["serve"]
    client = load(d, "client.crt")
    assert client.not_valid_after_utc - client.not_valid_before_utc <= timedelta(days=30, minutes=5)
    client.verify_directly_issued_by(load(d, "ca.crt"))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--host", "bad host"], "--host"),
        (["--host", "example.com:443"], "--host"),
        (["--client-name", "*.envoy"], "--client-name"),
        (["--days", "0"], "--days"),
        (["--days", "ten"], "--days"),
    ],
)
def test_certs_create_refuses_a_bad_argument_as_a_usage_error(
    cli: Any, tmp_path: Path, argv: list[str], needle: str
) -> None:
    code, out, err = cli("certs", "create", "--out", "tls", *argv)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert not (tmp_path / "tls").exists()


def test_certs_create_runs_locally_only_and_needs_no_store(cli: Any, tmp_path: Path, monkeypatch: Any) -> None:
    code, _, err = cli("--server", "10.0.0.1:9001", "certs", "create", "--out", "tls")
    assert code == 2 and "locally only" in err and not (tmp_path / "tls").exists()
    code, out, err = cli("--json", "certs", "create")
    assert code == 2 and json.loads(out)["error"]["reason"] == "usage"  # --out is required
    # $MCP_AUTHZ_SERVER names a remote sidecar for management commands; this one ignores it.
    monkeypatch.setenv("MCP_AUTHZ_SERVER", "10.0.0.1:9001")
    code, _, err = cli("certs", "create", "--out", "tls")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls"]  # no store, no master key file


def test_the_installed_command(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "mcp-authz"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_AUTHZ_")}
    done = subprocess.run(
        [str(exe), "certs", "create", "--out", "tmp", "--host", "example.internal", "--host", "10.0.0.5"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "tmp"
    assert sorted(p.name for p in out.iterdir()) == ALL_FILES
    assert mode(out) == 0o700 and all(mode(out / n) == 0o600 for n in KEY_FILES)
    no_key_material(out, done.stdout, done.stderr)
    bad = subprocess.run(
        [str(exe), "certs", "create", "--out", "tmp2", "--host", "not_a_host"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert bad.returncode == 2 and "not_a_host" in bad.stderr and not (tmp_path / "tmp2").exists()
