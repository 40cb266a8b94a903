"""Ed25519 signatures over a bundle manifest: the one module that knows ``cryptography``.

Keys are PEM files: a PKCS#8 private key for ``authz build --signing-key`` and a
SubjectPublicKeyInfo public key for ``authz serve --verification-key`` (a private key
is accepted there too; its public half is used). ``openssl genpkey -algorithm ed25519``
and ``openssl pkey -pubout`` make a pair.

The signature file holds the 64-byte signature in base64 on one line.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class KeyFileError(ValueError):
    """A key file that cannot be used (missing, unreadable, not Ed25519)."""


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path} is not an Ed25519 private key")
    return key


def load_verification_key(path: Path) -> Ed25519PublicKey:
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"verification key {path} is not a PEM public key: {exc}") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFileError(f"verification key {path} is not an Ed25519 key") from None
        return private.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"verification key {path} is not an Ed25519 public key")
    return key


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key {path}: {exc}") from exc


def sign(message: bytes, key: Ed25519PrivateKey) -> bytes:
    """The signature file's content for ``message``."""
    return base64.b64encode(key.sign(message)) + b"\n"


def verify(message: bytes, signature_file: bytes, key: Ed25519PublicKey) -> str | None:
    """None when ``signature_file`` is a valid signature of ``message``, else the reason."""
    try:
        raw = base64.b64decode(signature_file.strip(), validate=True)
    except (binascii.Error, ValueError):
        return "signature file is not base64"
    if len(raw) != 64:
        return f"signature is {len(raw)} bytes, an Ed25519 signature has 64"
    try:
        key.verify(raw, message)
    except InvalidSignature:
        return "signature does not verify with the verification key"
    return None


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
