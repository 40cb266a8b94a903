"""deploy/envoy/envoy-mtls.yaml: valid for Envoy, and it really talks mTLS to authz."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from support.pki import generate_pki

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIG = DEPLOY / "envoy" / "envoy-mtls.yaml"


def test_envoy_mtls_sidecar_config_is_valid(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path / "pki")
    server, client = pki.servers["orders-api"], pki.servers["orders-api"]
    files = {"server.pem": server.cert, "server-key.pem": server.key, "ca.pem": pki.ca_cert,
             "client.pem": client.cert, "client-key.pem": client.key}
    text = CONFIG.read_text()
    for name, path in files.items():
        assert f"/etc/envoy/tls/{name}" in text, name
        text = text.replace(f"/etc/envoy/tls/{name}", str(path))
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    envoy = Path(sys.executable).parent / "envoy"
    proc = subprocess.run([str(envoy), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "OK" in proc.stdout + proc.stderr


def test_authz_cluster_uses_mtls_and_pins_the_authz_spiffe_id() -> None:
    doc = yaml.safe_load(CONFIG.read_text())
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "authz")
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    common = tls["common_tls_context"]
    assert common["tls_certificates"] and common["alpn_protocols"] == ["h2"]
    sans = common["validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "URI",
                     "matcher": {"exact": "spiffe://cluster.local/ns/authz-system/sa/authz"}}]
    ext_authz = [f for lst in doc["static_resources"]["listeners"] for fc in lst["filter_chains"]
                 for f in fc["filters"][0]["typed_config"]["http_filters"]
                 if f["name"] == "envoy.filters.http.ext_authz"]
    assert ext_authz and all(f["typed_config"]["failure_mode_allow"] is False for f in ext_authz)
