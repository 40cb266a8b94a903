"""Certificate files that rotate on disk: read, validate, and swap only a good set.

One ``RotatingCertificate`` watches a certificate chain, its private key and optionally a CA
bundle, the way spiffe-helper, cert-manager and Istio mount them: replaced in place, renamed
over, or swapped through a symlink (a Kubernetes Secret volume's ``..data``). A change is
noticed by ``os.stat`` (through the symlinks: inode, size, mtime), given a moment to settle,
read, and checked before it serves: every file parses as PEM, the key belongs to the leaf
certificate, the leaf has not expired. A set that fails any check (half written, a key from
another pair, garbage) leaves the old material serving, is logged as an error, counted in
``authz_tls_rotation_failures_total`` and flagged by ``authz_tls_rotation_failing`` until the
files are good again.

Users (the gRPC and HTTP listeners, the outbound client) read ``current`` and ``generation``;
the material is immutable, so a handshake in progress keeps what it started with.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from authz.metrics import Metrics

log = logging.getLogger("authz.tls")

SETTLE_SECONDS = 0.2  # a change must hold still this long before it is read


class CredentialError(ValueError):
    """Files that cannot serve: unreadable, not PEM, a key of another certificate, expired."""


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What status and metrics show about a certificate (never its key, never a path)."""

    subject: str
    issuer: str
    spiffe_id: str | None
    dns_names: tuple[str, ...]
    not_before: float
    not_after: float
    serial: str
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "spiffe_id": self.spiffe_id,
            "dns_names": list(self.dns_names),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "serial": self.serial,
            "sha256": self.sha256,
        }


@dataclass(frozen=True, slots=True)
class Material:
    cert_pem: bytes  # the leaf first, then any intermediates
    key_pem: bytes
    ca_pem: bytes | None
    leaf: CertInfo
    ca: tuple[CertInfo, ...]

    @property
    def ca_not_after(self) -> float | None:
        """When the first CA certificate of the bundle expires."""
        return min((c.not_after for c in self.ca), default=None)


def describe(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        uris, dns = [], ()
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        spiffe_id=spiffe[0] if len(spiffe) == 1 else None,
        dns_names=dns,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        serial=format(cert.serial_number, "x"),
        sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def _certs(data: bytes, role: str) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CredentialError(f"{role} holds no PEM certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CredentialError(f"{role} is not valid PEM certificates: {exc}") from None
    return certs


def _public_bytes(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


_KEY_TYPES = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey,
              ed448.Ed448PrivateKey)


def check_material(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None) -> Material:
    """Material from the files' bytes, or CredentialError saying which file is wrong and why."""
    chain = _certs(cert_pem, "certificate file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialError(f"key file is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, _KEY_TYPES):
        raise CredentialError(f"key file holds an unsupported key type {type(key).__name__}")
    leaf = chain[0]
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise CredentialError("key file does not belong to the certificate (a mismatched pair)")
    info = describe(leaf)
    ca: tuple[CertInfo, ...] = ()
    if ca_pem is not None:
        ca = tuple(describe(c) for c in _certs(ca_pem, "CA file"))
    return Material(cert_pem, key_pem, ca_pem, info, ca)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _stat(path: Path) -> Hashable:
    try:
        st = os.stat(path)  # follows symlinks: a ..data swap changes the inode
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class RotatingCertificate:
    """The current good material of ``files``; ``refresh()`` picks up changes on disk."""

    def __init__(self, use: str, files: CertFiles, metrics: Metrics | None = None) -> None:
        self.use = use  # the metric label: grpc, http or client
        self.files = files
        self.metrics = metrics
        self.generation = 0
        self.rotated_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._seen: Hashable = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Material], object]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        fingerprint, material = self._read()  # raises CredentialError: a usage error at start
        self._seen = fingerprint
        self.current: Material = material
        self._published(material, rotated=False)
        if self.expired():
            # Served anyway (readiness fails): the rotation that fixes it is picked up live.
            self.last_error = f"certificate expired at {_iso(material.leaf.not_after)}"
            log.error("%s certificate %s", use, self.last_error)

    # --- reading -------------------------------------------------------------------------

    def _paths(self) -> tuple[Path, ...]:
        f = self.files
        return (f.cert, f.key) if f.ca is None else (f.cert, f.key, f.ca)

    def fingerprint(self) -> Hashable:
        return tuple(_stat(p) for p in self._paths())

    def _read(self) -> tuple[Hashable, Material]:
        """A consistent read: the files did not change while they were read."""
        for _ in range(5):
            before = self.fingerprint()
            try:
                cert = self.files.cert.read_bytes()
                key = self.files.key.read_bytes()
                ca = self.files.ca.read_bytes() if self.files.ca is not None else None
            except OSError as exc:
                raise CredentialError(f"cannot read {self._role(exc)}: {exc.strerror}") from None
            if self.fingerprint() == before:
                return before, check_material(cert, key, ca)
            time.sleep(SETTLE_SECONDS)
        raise CredentialError("the files kept changing while being read")

    def _role(self, exc: OSError) -> str:
        name = exc.filename
        for role, path in (("certificate file", self.files.cert), ("key file", self.files.key),
                           ("CA file", self.files.ca)):
            if path is not None and str(path) == str(name):
                return role
        return "a credential file"

    # --- rotating ------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Load the files if they changed since last seen; True when new material serves."""
        with self._lock:
            if self.fingerprint() == self._seen:
                return False
            # Writers that replace the files one by one (in place, or cert then key) pass
            # through mismatched states; give them a moment before judging.
            time.sleep(SETTLE_SECONDS)
            try:
                fingerprint, material = self._read()
            except CredentialError as exc:
                self._seen = self.fingerprint()  # judge each state of the files once
                self._failed(str(exc))
                return False
            self._seen = fingerprint
            if material.leaf.not_after <= time.time():
                self._failed(f"the new certificate expired at {_iso(material.leaf.not_after)}")
                return False
            if material.cert_pem == self.current.cert_pem and material.key_pem == self.current.key_pem \
                    and material.ca_pem == self.current.ca_pem:
                self._recovered()
                return False
            old = self.current.leaf
            self.current = material
            self.generation += 1
            self.rotated_at = time.time()
        log.info("%s certificate rotated: %s (serial %s, expires %s) replaces serial %s",
                 self.use, material.leaf.spiffe_id or material.leaf.subject, material.leaf.serial,
                 _iso(material.leaf.not_after), old.serial)
        self._published(material, rotated=True)
        return True

    def _failed(self, reason: str) -> None:
        self.last_error = reason
        self.last_error_at = time.time()
        if self.metrics is not None:
            self.metrics.tls_rotation_failures.labels(self.use).inc()
            self.metrics.tls_rotation_failing.labels(self.use).set(1)
        cur = self.current.leaf
        log.error("%s certificate files changed but cannot serve: %s; still serving serial %s "
                  "(expires %s)", self.use, reason, cur.serial, _iso(cur.not_after))

    def _recovered(self) -> None:
        if self.last_error is not None:
            log.info("%s certificate files are consistent again (unchanged material)", self.use)
        self.last_error = None
        if self.metrics is not None:
            self.metrics.tls_rotation_failing.labels(self.use).set(0)

    def _published(self, material: Material, rotated: bool) -> None:
        self.last_error = None
        m = self.metrics
        if m is not None:
            m.tls_cert_expiry.labels(self.use).set(material.leaf.not_after)
            if material.ca_not_after is not None:
                m.tls_ca_expiry.labels(self.use).set(material.ca_not_after)
            m.tls_rotation_failing.labels(self.use).set(0)
            c = m.tls_rotations.labels(self.use)
            m.tls_rotation_failures.labels(self.use)  # the series exists from the start, at 0
            if rotated:
                c.inc()
        for listener in list(self._listeners):
            try:
                listener(material)
            except Exception:
                log.exception("%s certificate listener failed", self.use)

    def subscribe(self, listener: Callable[[Material], object]) -> None:
        self._listeners.append(listener)

    # --- state ---------------------------------------------------------------------------

    def expired(self, now: float | None = None) -> bool:
        return self.current.leaf.not_after <= (time.time() if now is None else now)

    def status(self) -> dict[str, Any]:
        m = self.current
        return {
            "certificate": m.leaf.as_dict(),
            "ca": [c.as_dict() for c in m.ca],
            "expired": self.expired(),
            "rotations": self.generation,
            "rotated_at": self.rotated_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    # --- watching ------------------------------------------------------------------------

    def start(self, interval: float = 1.0) -> None:
        if self._thread is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception:
                    log.exception("%s certificate watcher failed", self.use)

        self._thread = threading.Thread(target=run, name=f"authz-certs-{self.use}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def load_into(ctx: ssl.SSLContext, material: Material) -> None:
    """``ctx.load_cert_chain`` from memory: ``ssl`` reads only files, so the PEM goes through
    anonymous memory files (never the disk, gone when closed)."""
    fds: list[int] = []
    try:
        paths = []
        for data in (material.cert_pem, material.key_pem):
            fd = os.memfd_create("authz-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
            paths.append(f"/proc/self/fd/{fd}")
        ctx.load_cert_chain(paths[0], paths[1])
    finally:
        for fd in fds:
            os.close(fd)
