"""A private CA and the certificates for the sidecar's TLS listeners, for users who have no PKI.

What they are for (DESIGN.md, "Trust boundaries"):
- `server.crt`/`server.key`: the sidecar's certificate, for the mutual-TLS Check and
  access-log listener and for the admin API's TLS listener;
- `client.crt`/`client.key`: Envoy's certificate, presented when its cluster calls Check;
- `ca.crt`: the trust anchor both sides verify the other against (and the remote CLI's `--ca`);
- `ca.key`: signs more certificates; it is not needed at run time.

Keys are EC P-256: every TLS stack in play (grpcio's BoringSSL, Envoy's BoringSSL, OpenSSL)
supports it, and it is much faster to generate and to handshake with than RSA-3072 at the
same strength (128-bit).

The builders (`create_ca`, `issue_server_cert`, `issue_client_cert`) are pure apart from key
generation and take `now` for tests. `write_cert_set` is the one function that touches disk:
private keys are created 0600 (never readable by others, not even briefly), certificates
0644, the directory 0700 when it is created, and nothing is overwritten without `force`.

Reusing a CA: when `ca.crt` and `ca.key` are both in the directory, `write_cert_set` issues
the new server and client certificates from that CA and leaves it untouched, so certificates
for more hosts or replicas chain to the anchor Envoy already trusts. `force` replaces leaf
certificates but never the CA; a new CA takes `new_ca=True` (plus `force` when one exists).
No message here contains key material.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authz_server.errors import ConfigError, Conflict, InvalidInput

# The key types a CA may have: ours are EC P-256; a reused CA may also be RSA.
PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

CA_DAYS = 3650  # ten years
LEAF_DAYS = 825  # the longest validity clients commonly accept for a server certificate
MAX_DAYS = 36500
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
DEFAULT_CLIENT_NAME = "envoy"
DEFAULT_CA_NAME = "mcp-authz private CA"
ORGANIZATION = "mcp-authz"

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.crt", "client.key"
KEY_MODE, CERT_MODE, DIR_MODE = 0o600, 0o644, 0o700

# Backdated so a peer whose clock is a little behind accepts a certificate issued just now.
_CLOCK_SKEW = timedelta(minutes=5)
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted: what grpcio and Envoy read from a file."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@dataclass(frozen=True, slots=True)
class CertSet:
    """What `write_cert_set` did: the files it wrote, in order, and what they hold."""

    directory: Path
    written: tuple[Path, ...]
    ca_reused: bool
    ca: x509.Certificate
    server: x509.Certificate
    client: x509.Certificate
    hosts: tuple[str, ...] = field(default=())
    client_name: str = DEFAULT_CLIENT_NAME


# --- names -------------------------------------------------------------------------------


def parse_host(text: str) -> x509.GeneralName:
    """A subjectAltName entry for a host: `x509.IPAddress` for an IPv4 or IPv6 address
    (`[::1]` is accepted for `::1`), else `x509.DNSName` for a DNS name (lowercased; a
    leading `*.` wildcard label is allowed). Raises InvalidInput, with the reason, for
    anything else: URLs, ports, spaces, underscores, non-ASCII names (give the xn-- form)."""
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise InvalidInput(f"Host {text!r}: an IPv6 address with a zone (%...) cannot be in a certificate.")
        return x509.IPAddress(address)
    return x509.DNSName(_dns_name(text, "Host", wildcard=True))


def parse_client_name(text: str) -> str:
    """The client certificate's name (CN and DNS subjectAltName), lowercased: a DNS name
    without wildcard, such as `envoy`. Raises InvalidInput otherwise."""
    return _dns_name(text, "The client name", wildcard=False)


def _dns_name(text: str, what: str, *, wildcard: bool) -> str:
    if not text:
        raise InvalidInput(f"{what} is empty: give a DNS name or an IP address.")
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise InvalidInput(
            f"{what} {text!r} is not a DNS name: use ASCII letters, digits, '-' and '.' "
            "(an internationalised name in its xn-- form)."
        )
    if "://" in text or "/" in text or ":" in text:
        raise InvalidInput(f"{what} {text!r} is not a DNS name or IP address: give the bare host, no scheme or port.")
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    if wildcard and labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    if len(name) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise InvalidInput(
            f"{what} {text!r} is not a DNS name: labels of 1-63 letters, digits and '-', separated by dots"
            + (" (a wildcard only as the whole first label, e.g. *.example.com)." if wildcard else ".")
        )
    if labels[-1].isdigit():
        raise InvalidInput(f"{what} {text!r} is neither a valid IP address nor a DNS name.")
    return name


def _check_days(days: int, what: str) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise InvalidInput(f"{what} must be a whole number of days from 1 to {MAX_DAYS}.")


def _now(now: datetime | None) -> datetime:
    when = now or datetime.now(timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


# --- builders ------------------------------------------------------------------------------


def create_ca(common_name: str = DEFAULT_CA_NAME, *, days: int = CA_DAYS, now: datetime | None = None) -> Issued:
    """A new self-signed CA on a fresh P-256 key: BasicConstraints(ca, path_length=0), so it
    signs leaf certificates only; KeyUsage keyCertSign and cRLSign; a SubjectKeyIdentifier."""
    _check_days(days, "The CA's validity")
    if not common_name or len(common_name) > 64:
        raise InvalidInput("The CA's name must be 1 to 64 characters.")
    start = _now(now)
    key = _new_key()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue_server_cert(
    ca: Issued, hosts: Sequence[str], *, days: int = LEAF_DAYS, now: datetime | None = None
) -> Issued:
    """A server certificate signed by `ca` on a fresh P-256 key, valid for every host in
    `hosts` (DNS names and IP addresses, see `parse_host`) as subjectAltName entries, the
    first also as the subject's CN; ExtendedKeyUsage serverAuth. It never outlives the CA:
    its end is the earlier of `days` from now and the CA's own end."""
    if not hosts:
        raise InvalidInput("A server certificate needs at least one host (a DNS name or an IP address).")
    names: list[x509.GeneralName] = []
    for host in hosts:
        entry = parse_host(host)
        if entry not in names:
            names.append(entry)
    return _issue(ca, _general_name_text(names[0]), names, ExtendedKeyUsageOID.SERVER_AUTH, days, now)


def issue_client_cert(
    ca: Issued, name: str = DEFAULT_CLIENT_NAME, *, days: int = LEAF_DAYS, now: datetime | None = None
) -> Issued:
    """A client certificate signed by `ca` on a fresh P-256 key, for Envoy when it calls the
    sidecar's Check listener: CN and a DNS subjectAltName `name`; ExtendedKeyUsage clientAuth."""
    dns = parse_client_name(name)
    return _issue(ca, dns, [x509.DNSName(dns)], ExtendedKeyUsageOID.CLIENT_AUTH, days, now)


def _general_name_text(entry: x509.GeneralName) -> str:
    return str(entry.value)


def _issue(
    ca: Issued,
    common_name: str,
    names: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
    now: datetime | None,
) -> Issued:
    _check_days(days, "The certificate's validity")
    start = _now(now)
    end = min(start + timedelta(days=days), ca.cert.not_valid_after_utc)
    if end <= start:
        raise ConfigError("The CA has expired: create a new one (new CA, then new certificates for every host).")
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name[:64]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(start - _CLOCK_SKEW, ca.cert.not_valid_before_utc))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca.cert), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def _authority_key_id(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# --- an existing CA --------------------------------------------------------------------------


def load_ca(cert_pem: bytes, key_pem: bytes, *, now: datetime | None = None, where: str = "the CA") -> Issued:
    """A CA read back from PEM, checked before it signs anything: the key is an unencrypted
    EC or RSA key that matches the certificate, the certificate is a CA allowed to sign
    certificates, and it has not expired. Raises ConfigError naming `where` otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{where}: the certificate is not a PEM X.509 certificate.") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"{where}: the private key is encrypted; give an unencrypted PEM key.") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{where}: the private key is not a PEM private key.") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{where}: only EC and RSA CA keys are supported.")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{where}: the private key does not belong to the certificate.")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"{where}: the certificate is not a CA certificate.")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise ConfigError(f"{where}: the certificate may not sign certificates (no keyCertSign).")
    if cert.not_valid_after_utc <= _now(now):
        raise ConfigError(f"{where}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}; create a new one.")
    return Issued(cert, key)


# --- writing a set -------------------------------------------------------------------------------


def write_cert_set(
    directory: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    client_name: str = DEFAULT_CLIENT_NAME,
    days: int = LEAF_DAYS,
    ca_days: int = CA_DAYS,
    force: bool = False,
    new_ca: bool = False,
    now: datetime | None = None,
) -> CertSet:
    """Write ca.crt, ca.key, server.crt, server.key, client.crt and client.key (PEM) into
    `directory`, created 0700 when missing.

    The CA already in the directory (ca.crt and ca.key) is reused unless `new_ca`; then only
    the four leaf files are written. Existing files are replaced only with `force`, else
    Conflict names them and nothing is written. Everything is checked before the first
    file is written; a failure while writing removes the files this call had created.
    Private keys are 0600 from their creation, certificates 0644; a replaced file is
    swapped in whole (written beside it, then renamed over it)."""
    if not hosts:
        raise InvalidInput("Give at least one host (a DNS name or an IP address).")
    for host in hosts:
        parse_host(host)  # every argument checked before anything is generated
    client_name = parse_client_name(client_name)
    _check_days(days, "The certificates' validity")
    _check_days(ca_days, "The CA's validity")

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory.")
    ca_cert_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    ca_present = [p for p in (ca_cert_path, ca_key_path) if _exists(p)]

    ca: Issued | None = None
    if not new_ca and len(ca_present) == 2:
        ca = load_ca(_read(ca_cert_path), _read(ca_key_path), now=now, where=f"The CA in {directory}")
    elif not new_ca and len(ca_present) == 1:
        (present,) = ca_present
        missing = ca_key_path if present == ca_cert_path else ca_cert_path
        raise ConfigError(
            f"{present} is there but {missing} is not: restore it to issue from this CA, "
            "or make a new CA (--new-ca --force)."
        )

    targets = [directory / n for n in (SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)]
    if ca is None:
        targets = [ca_cert_path, ca_key_path, *targets]
    existing = [p for p in targets if _exists(p)]
    if existing and not force:
        kept = " (the CA there is kept)" if ca is not None else ""
        raise Conflict(
            f"{', '.join(str(p) for p in existing)} exist{'s' if len(existing) == 1 else ''} already: "
            f"pass --force to replace {'it' if len(existing) == 1 else 'them'}{kept}."
        )

    reused = ca is not None
    if ca is None:
        ca = create_ca(days=ca_days, now=now)
    server = issue_server_cert(ca, hosts, days=days, now=now)
    client = issue_client_cert(ca, client_name, days=days, now=now)

    files: list[tuple[str, bytes, int]] = []
    if not reused:
        files += [(CA_KEY, ca.key_pem(), KEY_MODE), (CA_CERT, ca.cert_pem(), CERT_MODE)]
    files += [
        (SERVER_KEY, server.key_pem(), KEY_MODE),
        (SERVER_CERT, server.cert_pem(), CERT_MODE),
        (CLIENT_KEY, client.key_pem(), KEY_MODE),
        (CLIENT_CERT, client.cert_pem(), CERT_MODE),
    ]
    written = _write_all(directory, files, replace=force)
    return CertSet(
        directory=directory,
        written=tuple(written),
        ca_reused=reused,
        ca=ca.cert,
        server=server.cert,
        client=client.cert,
        hosts=tuple(_general_name_text(parse_host(h)) for h in hosts),
        client_name=client_name,
    )


def _exists(path: Path) -> bool:
    return os.path.lexists(path)  # a dangling symlink counts: O_EXCL would refuse it too


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc.strerror}.") from None


def _make_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=DIR_MODE)
        os.chmod(directory, DIR_MODE)  # whatever the umask
    except FileExistsError:
        if not directory.is_dir():
            raise ConfigError(f"{directory} exists and is not a directory.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot create the directory {directory}: {exc.strerror}.") from None


def _write_all(directory: Path, files: Sequence[tuple[str, bytes, int]], *, replace: bool) -> list[Path]:
    _make_directory(directory)
    created: list[Path] = []
    done: list[Path] = []
    try:
        for name, data, mode in files:
            path = directory / name
            if replace:
                _replace_file(path, data, mode)
            else:
                _create_file(path, data, mode)
                created.append(path)
            done.append(path)
    except FileExistsError as exc:
        _remove(created)
        raise Conflict(f"{exc.filename} appeared while writing: pass --force to replace it.") from None
    except OSError as exc:
        _remove(created)
        raise ConfigError(f"Cannot write {exc.filename or directory}: {exc.strerror}.") from None
    return done


def _create_file(path: Path, data: bytes, mode: int) -> None:
    """A new file with exactly `mode` from its first moment; refuses an existing path or symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits off a certificate's 0644
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write beside `path`, then rename over it: readers see the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        _create_file(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        _remove([tmp])
        raise


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
