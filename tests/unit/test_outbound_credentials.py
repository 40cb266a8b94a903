"""Credentials towards bundle servers and audit collectors: bearer token files re-read on
change, a client certificate (mTLS), user:pass@ URLs; and none of them ever shown."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from support.auth_server import AuthServer
from support.pki import PKI, CertKey, generate_pki, issue
from support.tls_serve import AUTHZ_ID, REPO, Serve, check, metric, wait_for
from test_sources import bundle_bytes

from authz.bundle import archive
from authz.bundle.runtime import open_source
from authz.bundle.sources import PollPolicy, SourceUnavailable
from authz.tls import ClientTls

PASSWORD = "pa55-w0rd-xyzzy"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return generate_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def identity(pki: PKI) -> CertKey:
    """authz's own client certificate towards bundle servers and collectors."""
    return issue(pki, pki.directory / "authz-client", "client", AUTHZ_ID, server=False)


def mtls_server(pki: PKI) -> AuthServer:
    server = pki.servers["orders-api"]  # DNS:localhost, IP:127.0.0.1
    return AuthServer(tls=(server.cert, server.key), client_ca=pki.ca_cert)


def write_token(path: Path, token: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(token + "\n")
    os.replace(tmp, path)


def everything_shown(serve: Serve, audit_file: Path, collector: AuthServer | None) -> str:
    """Every place a credential must never appear: logs, status, probes, metrics, audit."""
    parts = [serve.stderr(), serve.stdout(), serve.get("/v1/status")[1], serve.get("/readyz")[1],
             serve.get("/metrics")[1], serve.get("/healthz")[1]]
    if audit_file.exists():
        parts.append(audit_file.read_text())
    if collector is not None:
        parts.append(json.dumps(collector.records()))
    return "\n".join(parts)


def test_token_and_client_certificate_to_bundle_server_and_collector(
    tmp_path: Path, pki: PKI, identity: CertKey
) -> None:
    bundles, collector = mtls_server(pki), mtls_server(pki)
    bundles.body = archive.build_archive(bundle_bytes(tmp_path, "t1"), "t", "t1")
    bundles.expect_auth = "Bearer bundle-token-one"
    collector.expect_auth = "Bearer audit-token-one"
    bundle_token, audit_token = tmp_path / "bundle.token", tmp_path / "audit.token"
    write_token(bundle_token, "bundle-token-one")
    write_token(audit_token, "audit-token-one")
    audit_file = tmp_path / "audit.log"
    serve = Serve(
        tmp_path / "work",
        "--bundle", bundles.url(), "--bundle-token-file", str(bundle_token),
        "--audit-log", collector.url("/v1/audit"), "--audit-log", str(audit_file),
        "--audit-token-file", str(audit_token),
        "--ca-file", str(pki.ca_cert), "--client-cert", str(identity.cert),
        "--client-key", str(identity.key),
        "--poll-min", "0.2", "--poll-max", "0.3", "--log-level", "DEBUG",
    )  # fmt: skip
    try:
        assert wait_for(lambda: serve.get("/readyz")[0] == 200), serve.stderr()
        first = bundles.requests()[0]
        assert first.authorization == "Bearer bundle-token-one"
        assert first.client_uris == (AUTHZ_ID,)
        with grpc.insecure_channel(f"127.0.0.1:{serve.grpc_port}") as ch:
            assert check(ch, "spiffe://cluster.local/ns/prod/sa/web") == 0
        assert wait_for(lambda: len(collector.records()) >= 1), serve.stderr()
        posted = [s for s in collector.requests() if s.method == "POST"]
        assert posted[0].authorization == "Bearer audit-token-one"
        assert posted[0].client_uris == (AUTHZ_ID,)

        # The bundle server's token rotates: the file changes, the next polls use the new one.
        bundles.expect_auth = "Bearer bundle-token-two"
        write_token(bundle_token, "bundle-token-two")
        bundles.body = archive.build_archive(bundle_bytes(tmp_path, "t2"), "t", "t2")
        assert wait_for(lambda: '"revision": "t2"' in serve.get("/v1/status")[1], 30), serve.stderr()
        assert bundles.requests()[-1].authorization == "Bearer bundle-token-two"

        expiry = x509.load_pem_x509_certificate(identity.cert.read_bytes()).not_valid_after_utc
        assert metric(serve.metrics(), "authz_tls_cert_expiry_timestamp_seconds",
                      use="client") == expiry.timestamp()
        shown = everything_shown(serve, audit_file, collector)
        for secret in ("bundle-token-one", "bundle-token-two", "audit-token-one", "PRIVATE KEY"):
            assert secret not in shown, secret
        assert "token re-read after the file changed" in serve.stderr()
    finally:
        serve.stop()
        bundles.close()
        collector.close()


def test_without_the_token_or_the_client_certificate_nothing_loads(
    tmp_path: Path, pki: PKI, identity: CertKey
) -> None:
    bundles = mtls_server(pki)
    bundles.body = archive.build_archive(bundle_bytes(tmp_path, "t1"), "t", "t1")
    bundles.expect_auth = "Bearer right"
    tls = ClientTls(pki.ca_cert, identity.cert, identity.key)
    with pytest.raises(SourceUnavailable, match="answered HTTP 401"):
        open_source(bundles.url(), policy=PollPolicy(timeout=5), tls=tls).fetch()
    with pytest.raises(SourceUnavailable, match="unreachable"):  # no client certificate
        open_source(bundles.url(), policy=PollPolicy(timeout=5), tls=ClientTls(pki.ca_cert)).fetch()
    bundles.close()


def test_rotated_client_certificate_is_used_by_the_next_fetch(
    tmp_path: Path, pki: PKI
) -> None:
    bundles = mtls_server(pki)
    bundles.body = archive.build_archive(bundle_bytes(tmp_path, "t1"), "t", "t1")
    one = issue(pki, tmp_path / "c1", "client", AUTHZ_ID, server=False)
    two = issue(pki, tmp_path / "c2", "client", AUTHZ_ID, server=False)
    live = tmp_path / "live"
    live.mkdir()
    (live / "tls.crt").write_bytes(one.cert.read_bytes())
    (live / "tls.key").write_bytes(one.key.read_bytes())
    src = open_source(bundles.url(), policy=PollPolicy(timeout=5),
                      tls=ClientTls(pki.ca_cert, live / "tls.crt", live / "tls.key"))
    src.fetch(force=True)
    for name, path in (("tls.key", two.key), ("tls.crt", two.cert)):
        (live / f".{name}.tmp").write_bytes(path.read_bytes())
        os.replace(live / f".{name}.tmp", live / name)
    time.sleep(1.2)  # the client looks at its files at most once a second
    src.fetch(force=True)
    serials = [s.client_serial for s in bundles.requests()]

    def hex_serial(c: CertKey) -> str:
        return format(x509.load_pem_x509_certificate(c.cert.read_bytes()).serial_number, "X")

    assert [s.lstrip("0") for s in serials if s] == [hex_serial(one).lstrip("0"),
                                                    hex_serial(two).lstrip("0")]
    bundles.close()


def test_user_info_urls_authenticate_and_are_never_shown(tmp_path: Path) -> None:
    bundles, collector = AuthServer(), AuthServer()
    basic = "Basic " + __import__("base64").b64encode(f"reader:{PASSWORD}".encode()).decode()
    bundles.expect_auth = collector.expect_auth = basic
    bundles.body = archive.build_archive(bundle_bytes(tmp_path, "u1"), "t", "u1")
    audit_file = tmp_path / "audit.log"
    url = bundles.url(userinfo=f"reader:{PASSWORD}@") + "?X-Signature=sig-s3cret"
    serve = Serve(tmp_path / "work", "--bundle", url,
                  "--audit-log", collector.url("/v1/audit", userinfo=f"reader:{PASSWORD}@"),
                  "--audit-log", str(audit_file), "--poll-min", "0.2", "--poll-max", "0.3",
                  "--log-level", "DEBUG")
    try:
        assert wait_for(lambda: serve.get("/readyz")[0] == 200), serve.stderr()
        with grpc.insecure_channel(f"127.0.0.1:{serve.grpc_port}") as ch:
            check(ch, "spiffe://cluster.local/ns/prod/sa/web")
        assert wait_for(lambda: len(collector.records()) >= 1), serve.stderr()
        assert bundles.requests()[0].authorization == basic
        assert bundles.requests()[0].path == "/bundle.tar.gz?X-Signature=sig-s3cret"
        status = json.loads(serve.get("/v1/status")[1])
        assert status["source"] == f"http://***@127.0.0.1:{bundles.port}/bundle.tar.gz?X-Signature=REDACTED"
        # Make the source fail so that its URL lands in logs and status too.
        bundles.expect_auth = "Basic nobody"
        assert wait_for(lambda: "HTTP 401" in serve.get("/v1/status")[1], 30)
        shown = everything_shown(serve, audit_file, collector)
        for secret in (PASSWORD, "sig-s3cret", basic.split()[1]):
            assert secret not in shown, secret
    finally:
        serve.stop()
        bundles.close()
        collector.close()


def _serve_exit(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "authz", "serve", "--grpc-addr", "127.0.0.1:0",
                           "--http-addr", "127.0.0.1:0", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stderr


def test_unusable_credentials_are_usage_errors(tmp_path: Path, pki: PKI, identity: CertKey) -> None:
    token = tmp_path / "token"
    write_token(token, "t0k3n-value")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = {
        "--bundle-token-file: cannot read the token file": [
            "--bundle", "https://127.0.0.1:1/b.tar.gz", "--bundle-token-file", str(tmp_path / "none")],
        "--bundle-token-file: the token file is empty": [
            "--bundle", "https://127.0.0.1:1/b.tar.gz", "--bundle-token-file", str(empty)],
        "both give credentials": [
            "--bundle", "https://u:p@127.0.0.1:1/b.tar.gz", "--bundle-token-file", str(token)],
        "--bundle-token-file is for a bundle server URL": ["--bundle-token-file", str(token)],
        "--audit-token-file is for http(s):// audit collectors": ["--audit-token-file", str(token)],
        "--client-cert and --client-key go together": ["--client-cert", str(identity.cert)],
        "does not belong to the certificate": [
            "--client-cert", str(identity.cert), "--client-key", str(pki.clients["billing"].key)],
    }
    for message, args in cases.items():
        code, stderr = _serve_exit(*args)
        assert code == 2, (message, stderr)
        assert message in stderr, stderr
        assert "t0k3n-value" not in stderr and ":p@" not in stderr
