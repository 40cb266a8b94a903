"""Certificate rotation without a restart: files replaced under steady traffic, broken pairs
kept out, expiry turning /readyz to 503 (authz/certs.py, authz/tls_server.py)."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bundle_factory import write_bundle
from cryptography import x509
from support.bundle_sources import ConfigMapDir
from support.pki import PKI, CertKey, generate_pki, issue
from support.tls_serve import AUTHZ_ID, Serve, channel, check, metric, served_certificate, wait_for

POLICY = {
    "name": "probe",
    "action": "ALLOW",
    "rules": [{"name": "probe", "to": [{"operation": {"methods": ["GET"], "paths": ["/probe"]}}]}],
}
CALLER = "checkout-api"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return generate_pki(tmp_path_factory.mktemp("pki"))


def serial(cert: CertKey | x509.Certificate) -> int:
    if isinstance(cert, CertKey):
        cert = x509.load_pem_x509_certificate(cert.cert.read_bytes())
    return int(cert.serial_number)


def not_after(cert: CertKey) -> float:
    return x509.load_pem_x509_certificate(cert.cert.read_bytes()).not_valid_after_utc.timestamp()


class Traffic:
    """Checks every few milliseconds on one long-lived connection, and one check on a new
    connection (a new handshake) every 50 ms, until stopped (at most ``limit`` seconds)."""

    def __init__(self, port: int, pki: PKI, limit: float = 120.0) -> None:
        self.port, self.pki, self.limit = port, pki, limit
        self.ok = {"steady": 0, "fresh": 0}
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._steady, daemon=True),
                         threading.Thread(target=self._fresh, daemon=True)]

    def _call(self, ch: grpc.Channel, kind: str) -> None:
        client = self.pki.clients[CALLER]
        try:
            code = check(ch, client.spiffe_id)
            if code == 0:
                self.ok[kind] += 1
            else:
                self.failed.append(f"{kind}: decision code {code}")
        except grpc.RpcError as exc:
            self.failed.append(f"{kind}: {exc.code()} {exc.details()}")

    def _steady(self) -> None:
        end = time.monotonic() + self.limit
        with channel(self.port, self.pki, self.pki.clients[CALLER]) as ch:
            while not self._stop.is_set() and time.monotonic() < end:
                self._call(ch, "steady")
                time.sleep(0.003)

    def _fresh(self) -> None:
        end = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < end:
            with channel(self.port, self.pki, self.pki.clients[CALLER]) as ch:
                self._call(ch, "fresh")
            time.sleep(0.05)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def _start(tmp_path: Path, pki: PKI, cert: Path, key: Path, ca: Path) -> Serve:
    bundle = write_bundle(tmp_path / "bundle", [POLICY], revision="r1")
    server = Serve(tmp_path / "work", "--bundle", str(bundle), "--audit-log", str(tmp_path / "audit.log"),
                   "--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key), "--grpc-client-ca", str(ca),
                   "--allow-caller", pki.clients[CALLER].spiffe_id)
    assert wait_for(lambda: server.get("/readyz")[0] == 200), server.stderr()
    return server


def _files(cert: CertKey, pki: PKI) -> dict[str, bytes]:
    return {"tls.crt": cert.cert.read_bytes(), "tls.key": cert.key.read_bytes(),
            "ca.crt": pki.ca_cert.read_bytes()}


def _rotations(server: Serve) -> float:
    return metric(server.metrics(), "authz_tls_rotations_total", use="grpc") or 0.0


def _failures(server: Serve) -> float:
    return metric(server.metrics(), "authz_tls_rotation_failures_total", use="grpc") or 0.0


def _expect_serving(server: Serve, pki: PKI, cert: CertKey, rotations: float) -> None:
    assert wait_for(lambda: _rotations(server) >= rotations, 30), server.stderr()
    seen = served_certificate(server.grpc_port, pki, pki.clients[CALLER])  # a fresh handshake
    assert serial(seen) == serial(cert)
    expiry = metric(server.metrics(), "authz_tls_cert_expiry_timestamp_seconds", use="grpc")
    assert expiry == not_after(cert)


def test_kubernetes_secret_swap_under_traffic(tmp_path: Path, pki: PKI) -> None:
    v1 = issue(pki, tmp_path / "v1", "authz", AUTHZ_ID, server=True, lifetime=dt.timedelta(days=1))
    v2 = issue(pki, tmp_path / "v2", "authz", AUTHZ_ID, server=True, lifetime=dt.timedelta(days=2))
    secret = ConfigMapDir(tmp_path / "secret")  # ..data -> ..<version>, swapped atomically
    secret.publish(_files(v1, pki))
    root = secret.root
    server = _start(tmp_path, pki, root / "tls.crt", root / "tls.key", root / "ca.crt")
    try:
        _expect_serving(server, pki, v1, 0)
        with Traffic(server.grpc_port, pki) as traffic:
            assert wait_for(lambda: traffic.ok["fresh"] >= 5 and traffic.ok["steady"] >= 50, 60)
            secret.publish(_files(v2, pki))
            _expect_serving(server, pki, v2, 1)
            before = dict(traffic.ok)
            assert wait_for(lambda: traffic.ok["fresh"] >= before["fresh"] + 5, 60)
        print(f"secret swap under traffic: {traffic.ok} calls ok, {len(traffic.failed)} failed")
        assert traffic.failed == []
        assert traffic.ok["steady"] > 100
        assert _rotations(server) == 1 and _failures(server) == 0
        status = server.get("/v1/status")[1]
        assert f'"serial": "{serial(v2):x}"' in status
    finally:
        server.stop()


def test_rename_over_and_in_place_rewrites_under_traffic(tmp_path: Path, pki: PKI) -> None:
    certs = [issue(pki, tmp_path / f"v{i}", "authz", AUTHZ_ID, server=True,
                   lifetime=dt.timedelta(hours=30 + i)) for i in range(3)]
    live = tmp_path / "live"
    live.mkdir()
    for name, data in _files(certs[0], pki).items():
        (live / name).write_bytes(data)
    server = _start(tmp_path, pki, live / "tls.crt", live / "tls.key", live / "ca.crt")
    try:
        with Traffic(server.grpc_port, pki) as traffic:
            assert wait_for(lambda: traffic.ok["fresh"] >= 5, 60)
            # cert-manager style: write beside, rename over (key first, then certificate).
            for name, data in (("tls.key", certs[1].key.read_bytes()),
                               ("tls.crt", certs[1].cert.read_bytes())):
                (live / f".{name}.tmp").write_bytes(data)
                os.replace(live / f".{name}.tmp", live / name)
            _expect_serving(server, pki, certs[1], 1)
            # In place: the same inodes truncated and rewritten, one file after the other.
            for name, data in (("tls.crt", certs[2].cert.read_bytes()),
                               ("tls.key", certs[2].key.read_bytes())):
                with open(live / name, "r+b") as fh:
                    fh.truncate(0)
                    fh.write(data)
            _expect_serving(server, pki, certs[2], 2)
            before = traffic.ok["fresh"]
            assert wait_for(lambda: traffic.ok["fresh"] >= before + 5, 60)
        print(f"rename-over and in-place under traffic: {traffic.ok} calls ok, "
              f"{len(traffic.failed)} failed, {_failures(server):.0f} transient rejections")
        assert traffic.failed == []
    finally:
        server.stop()


def test_broken_pair_keeps_the_old_certificate_and_is_reported(tmp_path: Path, pki: PKI) -> None:
    good = issue(pki, tmp_path / "good", "authz", AUTHZ_ID, server=True)
    other = issue(pki, tmp_path / "other", "authz", AUTHZ_ID, server=True)
    live = tmp_path / "live"
    live.mkdir()
    for name, data in _files(good, pki).items():
        (live / name).write_bytes(data)
    server = _start(tmp_path, pki, live / "tls.crt", live / "tls.key", live / "ca.crt")
    try:
        client = pki.clients[CALLER]
        # A mismatched pair: another certificate with the old key.
        (live / "tls.crt").write_bytes(other.cert.read_bytes())
        assert wait_for(lambda: _failures(server) >= 1, 30), server.stderr()
        metrics = server.metrics()
        assert metric(metrics, "authz_tls_rotation_failing", use="grpc") == 1
        assert metric(metrics, "authz_tls_rotations_total", use="grpc") == 0
        assert serial(served_certificate(server.grpc_port, pki, client)) == serial(good)
        with channel(server.grpc_port, pki, client) as ch:
            assert check(ch, client.spiffe_id) == 0
        assert "does not belong to the certificate" in server.stderr()
        assert "still serving serial" in server.stderr()
        assert "does not belong to the certificate" in server.get("/v1/status")[1]
        # Half written: a truncated certificate.
        data = other.cert.read_bytes()
        (live / "tls.crt").write_bytes(data[: len(data) // 2])
        assert wait_for(lambda: _failures(server) >= 2, 30), server.stderr()
        assert serial(served_certificate(server.grpc_port, pki, client)) == serial(good)
        # The matching key arrives: the pair serves and the failure clears.
        (live / "tls.crt").write_bytes(other.cert.read_bytes())
        (live / "tls.key").write_bytes(other.key.read_bytes())
        _expect_serving(server, pki, other, 1)
        assert metric(server.metrics(), "authz_tls_rotation_failing", use="grpc") == 0
    finally:
        server.stop()


def test_expired_serving_certificate_turns_readyz_to_503(tmp_path: Path, pki: PKI) -> None:
    lifetime = dt.timedelta(seconds=20)
    short = issue(pki, tmp_path / "short", "authz", AUTHZ_ID, server=True, lifetime=lifetime)
    expires = not_after(short)
    live = tmp_path / "live"
    live.mkdir()
    for name, data in _files(short, pki).items():
        (live / name).write_bytes(data)
    server = _start(tmp_path, pki, live / "tls.crt", live / "tls.key", live / "ca.crt")
    try:
        assert time.time() < expires, "the machine was too slow to start the server in time"
        assert wait_for(lambda: server.get("/readyz")[0] == 503, 60)
        assert time.time() >= expires - 1
        status, body = server.get("/readyz")
        assert status == 503 and "grpc serving certificate has expired" in body
        assert '"expired": true' in server.get("/v1/status")[1]
        # A renewed certificate makes it ready again, without a restart.
        fresh = issue(pki, tmp_path / "fresh", "authz", AUTHZ_ID, server=True)
        for name, data in (("tls.key", fresh.key.read_bytes()), ("tls.crt", fresh.cert.read_bytes())):
            (live / f".{name}.tmp").write_bytes(data)
            os.replace(live / f".{name}.tmp", live / name)
        assert wait_for(lambda: server.get("/readyz")[0] == 200, 30), server.stderr()
    finally:
        server.stop()


@pytest.fixture
def https_probe_server(tmp_path: Path, pki: PKI) -> Iterator[tuple[Serve, Path, CertKey]]:
    cert = issue(pki, tmp_path / "h1", "authz-http", AUTHZ_ID, server=True)
    live = tmp_path / "live"
    live.mkdir()
    (live / "tls.crt").write_bytes(cert.cert.read_bytes())
    (live / "tls.key").write_bytes(cert.key.read_bytes())
    bundle = write_bundle(tmp_path / "bundle", [POLICY], revision="r1")
    server = Serve(tmp_path / "work", "--bundle", str(bundle), "--audit-log", str(tmp_path / "a.log"),
                   "--http-tls-cert", str(live / "tls.crt"), "--http-tls-key", str(live / "tls.key"),
                   https_ca=pki.ca_cert)
    try:
        yield server, live, cert
    finally:
        server.stop()


def test_http_endpoints_over_tls_rotate_too(https_probe_server: tuple[Serve, Path, CertKey],
                                            pki: PKI, tmp_path: Path) -> None:
    import ssl
    import urllib.request

    server, live, first = https_probe_server
    assert wait_for(lambda: server.get("/readyz")[0] == 200), server.stderr()
    # Plain HTTP is not answered.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=5).read()
    assert server.get("/healthz")[0] == 200
    assert "Traceback" not in server.stderr()  # a failed handshake is no crash report

    def served(sni: bool = True) -> int:
        import socket

        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.check_hostname = sni
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost" if sni else None) as s:
            der = s.getpeercert(binary_form=True)
        assert der is not None
        return serial(x509.load_der_x509_certificate(der))

    assert served() == serial(first)
    second = issue(pki, tmp_path / "h2", "authz-http", AUTHZ_ID, server=True)
    for name, src in (("tls.key", second.key), ("tls.crt", second.cert)):
        (live / f".{name}.tmp").write_bytes(src.read_bytes())
        os.replace(live / f".{name}.tmp", live / name)
    assert wait_for(lambda: served() == serial(second), 30), server.stderr()
    assert served(sni=False) == serial(second)  # a client without SNI gets it too
    assert metric(server.metrics(), "authz_tls_rotations_total", use="http") == 1
