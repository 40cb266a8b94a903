"""The configuration we ship in deploy/ is valid for the systems that read it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_schema import load_crds, validate
from support.pki import generate_pki

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CRDS = Path(__file__).resolve().parent / "crds"  # vendored: see crds/SOURCE.md


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def crds() -> dict:
    return load_crds(CRDS)


def test_istio_resources_validate_against_crds(crds: dict) -> None:
    checked = 0
    for path in sorted((DEPLOY / "istio").glob("*.yaml")):
        for doc in docs(path):
            key = (doc["apiVersion"], doc["kind"])
            if key[0].startswith("install.istio.io/"):
                continue  # IstioOperator: checked against the providers below
            assert key in crds, f"{path.name}: no CRD for {key}"
            assert validate(doc, crds[key]) == [], f"{path.name} {doc['metadata']['name']}"
            checked += 1
    assert checked >= 3


def test_validator_catches_mistakes(crds: dict) -> None:
    schema = crds[("security.istio.io/v1", "AuthorizationPolicy")]
    bad = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "x"},
           "spec": {"action": "PERMIT", "selector": {"matchLabels": {"app": "a*"}},
                    "rules": [{"to": [{"operation": {"path": ["/x"]}}]},
                              {"from": [{"source": {"serviceAccounts": ["a/b"], "principals": ["p"]}}]}]}}
    errors = validate(bad, schema)
    assert any("PERMIT" in e for e in errors)
    assert any("operation.path: unknown field" in e for e in errors)
    assert any("wildcard not allowed in label value" in e for e in errors)
    assert any("Cannot set serviceAccounts with namespaces or principals" in e for e in errors)


def test_custom_provider_points_at_the_authz_service() -> None:
    (operator,) = docs(DEPLOY / "istio" / "mesh-config.yaml")
    providers = {p["name"]: p for p in operator["spec"]["meshConfig"]["extensionProviders"]}
    policies = [d for d in docs(DEPLOY / "istio" / "authorization-policies.yaml") if d["kind"] == "AuthorizationPolicy"]
    assert policies and all(p["spec"]["action"] == "CUSTOM" for p in policies)
    assert {p["spec"]["provider"]["name"] for p in policies} <= set(providers)
    grpc = providers["authz"]["envoyExtAuthzGrpc"]
    service = next(d for d in docs(DEPLOY / "kubernetes" / "authz.yaml") if d["kind"] == "Service")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert grpc["service"] == f"{name}.{namespace}.svc.cluster.local"
    assert grpc["port"] in {p["port"] for p in service["spec"]["ports"]}
    assert grpc.get("failOpen", False) is False


def test_http_provider_points_at_the_http_authz_port() -> None:
    (operator,) = docs(DEPLOY / "istio" / "mesh-config-http.yaml")
    (provider,) = operator["spec"]["meshConfig"]["extensionProviders"]
    http = provider["envoyExtAuthzHttp"]
    policies = docs(DEPLOY / "istio" / "authorization-policies-http.yaml")
    assert policies and all(p["spec"]["provider"]["name"] == provider["name"] for p in policies)
    manifests = {d["kind"]: d for d in docs(DEPLOY / "kubernetes" / "authz.yaml")}
    args = manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert int(args[args.index("--http-authz-addr") + 1].rsplit(":", 1)[1]) == http["port"]
    assert http["port"] in {p["port"] for p in manifests["Service"]["spec"]["ports"]}
    assert args[args.index("--http-authz-path-prefix") + 1] == http["pathPrefix"]
    assert "x-forwarded-client-cert" in http["includeRequestHeadersInCheck"]
    assert "x-authz-*" in http["headersToUpstreamOnAllow"] and http.get("failOpen", False) is False


def envoy_validate(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    envoy = Path(sys.executable).parent / "envoy"
    return subprocess.run([str(envoy), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
                          cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_envoy_sidecar_config_is_valid_as_shipped(tmp_path: Path) -> None:
    # The shipped file, unchanged: its certificate paths are relative to Envoy's working
    # directory (see its header), so Envoy runs from a directory holding tls/ with test PKI.
    pki = generate_pki(tmp_path / "pki")
    server = pki.servers["orders-api"]
    tls = tmp_path / "tls"
    tls.mkdir()
    for name, path in {"server.pem": server.cert, "server-key.pem": server.key, "ca.pem": pki.ca_cert}.items():
        (tls / name).write_bytes(Path(path).read_bytes())
    envoy = Path(sys.executable).parent / "envoy"
    config = DEPLOY / "envoy" / "envoy.yaml"
    proc = subprocess.run([str(envoy), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "OK" in proc.stdout + proc.stderr
    # Without the certificates it is refused: validation reads them.
    (tls / "ca.pem").unlink()
    proc = envoy_validate(config, tmp_path)
    assert proc.returncode != 0 and "tls/ca.pem" in proc.stdout + proc.stderr


def test_envoy_http_ext_authz_config_is_valid_as_shipped(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path / "pki", clients={"proxy": "spiffe://cluster.local/ns/mesh/sa/envoy"})
    server, proxy = pki.servers["orders-api"], pki.clients["proxy"]
    config = DEPLOY / "envoy" / "envoy-http.yaml"
    text = config.read_text()
    assert "http_service" in text and "grpc_service" not in text and "filename: /" not in text
    files = {"server.pem": server.cert, "server-key.pem": server.key, "proxy.pem": proxy.cert,
             "proxy-key.pem": proxy.key, "ca.pem": pki.ca_cert}
    tls = tmp_path / "tls"
    tls.mkdir()
    for name, path in files.items():
        (tls / name).write_bytes(Path(path).read_bytes())
    proc = envoy_validate(config, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-mtls.yaml", "envoy-http.yaml"])
def test_envoy_configs_refuse_overload_before_it_reaches_authz(name: str) -> None:
    """docs/operations.md ("Overload"): a refusal by authz costs a third of a check, so the
    shipped Envoy configs bound the checks in flight to authz with a circuit breaker."""
    config = yaml.safe_load((DEPLOY / "envoy" / name).read_text())
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "authz")
    thresholds = cluster["circuit_breakers"]["thresholds"]
    assert len(thresholds) == 1 and thresholds[0].get("priority", "DEFAULT") == "DEFAULT"
    assert 0 < thresholds[0]["max_requests"] <= 1024  # Envoy's default is 1024: we must be tighter
    assert thresholds[0]["max_retries"] == 0  # a retry of a refused check is more overload
