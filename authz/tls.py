"""Outbound TLS: the one place that builds the client context for https:// bundle servers and
audit collectors. ``--ca-file`` replaces the system's trust store, for a mesh-internal CA;
``--client-cert`` and ``--client-key`` present our own certificate (mTLS), re-read when
the files change (the next connection uses the new pair; a broken pair keeps the old)."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

from authz.certs import CertFiles, CredentialError, RotatingCertificate, load_into
from authz.metrics import Metrics

CHECK_EVERY_SECONDS = 1.0  # how often a use of the context looks at the files


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifies the server's certificate and host name against ``ca_file`` or the system CAs.

    Raises ValueError with a readable reason when the file is missing or not PEM certificates.
    """
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use CA file {ca_file}: {exc}") from None


class ClientTls:
    """``context()`` is the client context to use now (the same object until files change)."""

    def __init__(self, ca_file: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, metrics: Metrics | None = None) -> None:
        if (cert is None) != (key is None):
            raise ValueError("--client-cert and --client-key go together")
        self.ca_file = ca_file
        self._base = client_context(ca_file)  # raises ValueError for a bad CA file
        self.identity: RotatingCertificate | None = None
        if cert is not None and key is not None:
            try:
                self.identity = RotatingCertificate("client", CertFiles(cert, key), metrics)
            except CredentialError as exc:
                raise ValueError(f"--client-cert/--client-key: {exc}") from None
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._generation = -1
        self._context = self._base
        self._build()

    def _build(self) -> None:
        if self.identity is None:
            return
        ctx = client_context(self.ca_file)
        load_into(ctx, self.identity.current)
        self._context = ctx
        self._generation = self.identity.generation

    def context(self) -> ssl.SSLContext:
        identity = self.identity
        if identity is None:
            return self._context
        now = time.monotonic()
        if now >= self._next_check:
            with self._lock:
                if now >= self._next_check:
                    self._next_check = now + CHECK_EVERY_SECONDS
                    identity.refresh()
                    if identity.generation != self._generation:
                        self._build()
        return self._context
