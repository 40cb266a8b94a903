"""A throwaway PKI for the end-to-end tests: one CA, SPIFFE server and client certificates.

Everything is generated with ``cryptography`` into a directory the caller owns (a pytest
temp dir). Keys are EC P-256, written unencrypted as PKCS#8 PEM so both Envoy and Python's
``ssl`` module can load them.

Server certificates carry the destination workload's SPIFFE ID as URI SAN plus
``DNS:localhost`` and ``IP:127.0.0.1``; client certificates carry only the caller's SPIFFE
ID as URI SAN, the way an X509-SVID does. With mTLS on an Envoy listener these URI SANs
become ``attributes.destination.principal`` and ``attributes.source.principal`` of the
ext_authz CheckRequest.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "cluster.local"


def spiffe_id(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


# Destination workloads (one Envoy listener each) and callers used by the tests.
SERVERS: dict[str, str] = {
    "orders-api": spiffe_id("prod", "orders-api"),
    "payment-service": spiffe_id("payment", "payment-service"),
}
CLIENTS: dict[str, str] = {
    "checkout-api": spiffe_id("prod", "checkout-api"),
    "fulfillment-worker": spiffe_id("prod", "fulfillment-worker"),
    "billing": spiffe_id("prod", "billing"),
    "order-service": spiffe_id("order", "order-service"),
    "reconciliation-service": spiffe_id("finance", "reconciliation-service"),
    # Known to the CA but granted nothing by the example bundle.
    "stranger": spiffe_id("dev", "stranger"),
}


@dataclass(frozen=True)
class CertKey:
    """A leaf certificate, its private key and the SPIFFE ID in its URI SAN."""

    name: str
    spiffe_id: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    directory: Path
    ca_cert: Path
    ca_key: Path
    servers: dict[str, CertKey] = field(default_factory=dict)
    clients: dict[str, CertKey] = field(default_factory=dict)
    # A client certificate claiming checkout-api's SPIFFE ID, signed by a CA that the
    # listeners do not trust: must be refused during the TLS handshake.
    rogue_client: CertKey | None = None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _validity(lifetime: dt.timedelta | None = None) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=5), now + (lifetime or dt.timedelta(days=1))


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "authz-e2e"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    spiffe: str,
    *,
    server: bool,
    lifetime: dt.timedelta | None = None,
    dns: tuple[str, ...] = (),
    subject_cn: str | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe), *map(x509.DNSName, dns)]
    if server:
        sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    not_before, not_after = _validity(lifetime)
    cert = (
        x509.CertificateBuilder()
        # X509-SVIDs identify the workload by the URI SAN only; the subject is incidental.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]
                                + ([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)] if subject_cn else [])))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _issue(
    directory: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    spiffe: str,
    *,
    server: bool,
    prefix: str,
) -> CertKey:
    cert, key = _make_leaf(ca_cert, ca_key, spiffe, server=server)
    cert_path = directory / f"{prefix}-{name}.crt"
    key_path = directory / f"{prefix}-{name}.key"
    _write_cert(cert, cert_path)
    _write_key(key, key_path)
    return CertKey(name=name, spiffe_id=spiffe, cert=cert_path, key=key_path)


def generate_pki(
    directory: Path,
    servers: dict[str, str] | None = None,
    clients: dict[str, str] | None = None,
) -> PKI:
    """Create the CA and all leaf certificates in ``directory``; return their paths."""
    servers = SERVERS if servers is None else servers
    clients = CLIENTS if clients is None else clients
    directory.mkdir(parents=True, exist_ok=True)

    ca_cert, ca_key = _make_ca("authz-e2e test CA")
    ca_cert_path = directory / "ca.crt"
    ca_key_path = directory / "ca.key"
    _write_cert(ca_cert, ca_cert_path)
    _write_key(ca_key, ca_key_path)

    issued_servers = {
        name: _issue(directory, ca_cert, ca_key, name, sid, server=True, prefix="server")
        for name, sid in servers.items()
    }
    issued_clients = {
        name: _issue(directory, ca_cert, ca_key, name, sid, server=False, prefix="client")
        for name, sid in clients.items()
    }

    rogue_ca_cert, rogue_ca_key = _make_ca("authz-e2e rogue CA")
    _write_cert(rogue_ca_cert, directory / "rogue-ca.crt")
    rogue = _issue(
        directory,
        rogue_ca_cert,
        rogue_ca_key,
        "checkout-api",
        spiffe_id("prod", "checkout-api"),
        server=False,
        prefix="rogue-client",
    )
    return PKI(
        directory=directory,
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        servers=issued_servers,
        clients=issued_clients,
        rogue_client=rogue,
    )


def issue(
    pki: PKI,
    directory: Path,
    name: str,
    spiffe: str,
    *,
    server: bool,
    lifetime: dt.timedelta | None = None,
    dns: tuple[str, ...] = (),
    subject_cn: str | None = None,
) -> CertKey:
    """One more leaf from ``pki``'s CA (written as ``directory/name.crt`` and ``.key``),
    valid from five minutes ago for ``lifetime`` (default one day); ``dns``: DNS SANs after
    the URI SAN, ``subject_cn``: a common name in the subject."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert, key = _make_leaf(ca_cert, ca_key, spiffe, server=server, lifetime=lifetime, dns=dns,
                           subject_cn=subject_cn)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write_cert(cert, cert_path)
    _write_key(key, key_path)
    return CertKey(name=name, spiffe_id=spiffe, cert=cert_path, key=key_path)


def forwarded_certificate(uri: str | None, dns: str | None = None, *more_uris: str,
                          subject_cn: str | None = None) -> str:
    """A self-signed certificate as Envoy forwards a peer's (URL-encoded PEM: ext_authz's
    ``source.certificate``, XFCC's ``Cert=``), with these SANs and subject."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)] if subject_cn else [])
    not_before, not_after = _validity()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in (uri, *more_uris) if u]
    if dns:
        sans.append(x509.DNSName(dns))
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "ca")])).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return urllib.parse.quote(b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
