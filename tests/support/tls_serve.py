"""`authz serve` with TLS flags as a real process, and the clients the TLS tests call it with.

Everything runs on 127.0.0.1 with ports the OS picked a moment before. Certificates come
from support.pki (made in the test); authz's own is a SPIFFE server certificate for
``spiffe://cluster.local/ns/authz/sa/authz`` with ``DNS:localhost`` and ``IP:127.0.0.1``.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509
from envoy.service.auth.v3 import external_auth_pb2

from support.pki import PKI, CertKey, spiffe_id
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
AUTHZ_ID = spiffe_id("authz", "authz")
CHECK = "/envoy.service.auth.v3.Authorization/Check"


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


class Serve:
    """``python -m authz serve`` on free ports with ``args``; stderr kept in ``workdir``."""

    def __init__(self, workdir: Path, *args: str, https_ca: Path | None = None,
                 wait_ready: bool = True) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.grpc_port, self.http_port = free_port(), free_port()
        self.https_ca = https_ca
        self.stderr_path = workdir / f"authz-{self.http_port}.stderr"
        self.stdout_path = workdir / f"authz-{self.http_port}.stdout"
        self.args = [
            sys.executable, "-m", "authz", "serve",
            "--grpc-addr", f"127.0.0.1:{self.grpc_port}",
            "--http-addr", f"127.0.0.1:{self.http_port}",
            "--tls-watch-interval", "0.2",
            *args,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        if wait_ready:
            ok = wait_for(lambda: self.proc.poll() is not None or self.get("/healthz")[0] == 200, 30)
            assert ok and self.proc.poll() is None, self.stderr()

    def get(self, path: str) -> tuple[int | None, str]:
        scheme = "https" if self.https_ca is not None else "http"
        ctx = ssl.create_default_context(cafile=str(self.https_ca)) if self.https_ca else None
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.http_port}{path}",
                                        timeout=5, context=ctx) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return None, ""

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200, status
        return body

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` (label order as exported), or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{want}}}" if labels else "")) + r" (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else None


def channel(port: int, pki: PKI, client: CertKey | None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(),
        client.key.read_bytes() if client else None,
        client.cert.read_bytes() if client else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.ssl_target_name_override", "localhost")])


def check_request(principal: str, path: str = "/probe") -> bytes:
    cr = external_auth_pb2.CheckRequest()
    cr.attributes.source.principal = principal
    http = cr.attributes.request.http
    http.method, http.path, http.host = "GET", path, "svc.example"
    return bytes(cr.SerializeToString())


def check(ch: grpc.Channel, principal: str, timeout: float = 10.0) -> int:
    """One Check call; the gRPC status code of the decision (0 allow, 7 deny)."""
    data = ch.unary_unary(CHECK)(check_request(principal), timeout=timeout)
    resp = external_auth_pb2.CheckResponse.FromString(data)
    return int(resp.status.code)


def served_certificate(port: int, pki: PKI, client: CertKey | None) -> x509.Certificate:
    """The certificate the server presents to a brand-new TLS handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(pki.ca_cert))
    ctx.set_alpn_protocols(["h2"])
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
