"""A real OCI registry for the tests: Debian's ``docker-registry`` (CNCF distribution 2.x).

``Registry`` writes a config file into a temp dir (filesystem storage there, the access log
on its stdout) and runs ``/usr/bin/docker-registry serve`` on a free 127.0.0.1 port; the
tests count its requests from the access log. Auth is off, htpasswd (bcrypt, made here) or
token auth against ``TokenServer``, a small implementation of the Docker registry token
protocol (a JWT signed with an RSA key whose self-signed certificate the registry trusts).

``./scripts/test`` installs the ``docker-registry`` package when it is missing.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from support.ports import free_port

BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_credentials(path: Path, registry: str, user: str, password: str) -> Path:
    """A Docker config.json holding ``user:password`` for ``registry``."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    path.chmod(0o600)
    return path


class TokenServer:
    """The Docker registry token protocol: ``GET /token?service=S&scope=repository:R:A,B``
    with optional basic auth; answers ``{"token": JWT, "expires_in": N}``. Anonymous callers
    get a token with no access (as Docker Hub does), so the registry then refuses them."""

    def __init__(self, directory: Path, users: dict[str, str], service: str, issuer: str) -> None:
        self.users = users
        self.service = service
        self.issuer = issuer
        self.issued: list[dict[str, Any]] = []  # claims of every token issued
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authz-test token signer")])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "token-signer.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                user = outer._user(self.headers.get("Authorization"))
                if user is False:
                    self._send(401, {"details": "bad credentials"})
                    return
                if url.path != "/token" or query.get("service") != [outer.service]:
                    self._send(400, {"details": "unknown service"})
                    return
                access = []
                for scope in query.get("scope", []):
                    kind, _, rest = scope.partition(":")
                    repo, _, actions = rest.rpartition(":")
                    if kind == "repository" and user:
                        access.append(
                            {"type": "repository", "name": repo, "actions": actions.split(",")}
                        )
                self._send(200, {"token": outer.token(str(user or ""), access), "expires_in": 300})

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _user(self, header: str | None) -> str | bool | None:
        """The user of valid basic credentials, None for none, False for wrong ones."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        user, _, password = base64.b64decode(value).decode().partition(":")
        return user if self.users.get(user) == password else False

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service, "iat": now,
            "nbf": now - 10, "exp": now + 300, "jti": os.urandom(8).hex(), "access": access,
        }
        self.issued.append(claims)
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(sig)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Registry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storage and config under ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        htpasswd: dict[str, str] | None = None,
        token: TokenServer | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.storage = directory / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.scheme = "https" if tls else "http"
        self.log_path = directory / "registry.log"
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                # No blob descriptor cache: a test that rewrites a blob on disk is served it.
            },
            "http": {"addr": self.host, "secret": os.urandom(16).hex()},
        }
        if tls is not None:
            config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        if htpasswd is not None:
            lines = [
                f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=5)).decode()}"
                for user, pw in htpasswd.items()
            ]
            (directory / "htpasswd").write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "authz-test", "path": str(directory / "htpasswd")}}
        elif token is not None:
            config["auth"] = {
                "token": {
                    "realm": token.realm, "service": token.service, "issuer": token.issuer,
                    "rootcertbundle": str(token.cert_path),
                }
            }
        self.config_path = directory / "config.yml"
        self.config_path.write_text(json.dumps(config))  # YAML is a superset of JSON
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [BINARY, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError(f"docker-registry did not listen: {self.log_path.read_text()}")

    def reference(self, repository: str, tag: str) -> str:
        return f"oci://{self.host}/{repository}:{tag}"

    def access_log(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request the registry logged so far."""
        text = self.log_path.read_text(errors="replace")
        return [(m[1], urllib.parse.urlsplit(m[2]).path, int(m[3])) for m in _ACCESS.finditer(text)]

    def blob_path(self, digest: str) -> Path:
        hexdigest = digest.split(":", 1)[1]
        return (
            self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexdigest[:2]
            / hexdigest / "data"
        )

    def push_tampered(self, repository: str, tag: str, layer: bytes, name: str, revision: str) -> str:
        """Upload ``layer``, flip one byte of it in the registry's storage, then tag a manifest
        that names its true digest: the registry now serves bytes that do not match. Returns
        the manifest's digest."""
        from authz.bundle import oci

        client = oci.RegistryClient(self.host, plain_http=True)
        scope = f"repository:{repository}:pull,push"
        deadline = time.monotonic() + 30
        for blob in (oci.EMPTY_BLOB, layer):
            oci._upload_blob(client, repository, blob, scope, deadline)
        stored = self.blob_path(oci.sha256_digest(layer))
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
        manifest = oci.manifest_for(layer, name, revision)
        client.request(
            "PUT", f"/v2/{repository}/manifests/{tag}", scope=scope, deadline=deadline,
            max_bytes=65536, headers={"Content-Type": oci.MANIFEST_MEDIA_TYPE}, body=manifest,
            ok=(201,),
        )
        return oci.sha256_digest(manifest)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return int(exc.code), None


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A plain-HTTP registry without auth, for one test (tests/conftest.py makes it a fixture)."""
    reg = Registry(tmp_path / "registry")
    try:
        yield reg
    finally:
        reg.close()
