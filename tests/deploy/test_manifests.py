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
CRDS = REPO.parent / "shared" / "data" / "istio-crds"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def crds() -> dict:
    assert CRDS.is_dir(), f"Istio CRD schemas expected beside the repository at {CRDS}"
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


def test_kubernetes_deployment_matches_the_cli() -> None:
    manifests = {d["kind"]: d for d in docs(DEPLOY / "kubernetes" / "authz.yaml")}
    container = manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "serve"
    help_text = subprocess.run([sys.executable, "-m", "authz", "serve", "--help"], capture_output=True,
                               text=True, check=True, timeout=60).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, flag
    grpc_port = int(args[args.index("--grpc-addr") + 1].rsplit(":", 1)[1])
    http_port = int(args[args.index("--http-addr") + 1].rsplit(":", 1)[1])
    authz_port = int(args[args.index("--http-authz-addr") + 1].rsplit(":", 1)[1])
    assert {p["containerPort"] for p in container["ports"]} == {grpc_port, http_port, authz_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": http_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": http_port}
    assert manifests["Service"]["spec"]["selector"] == manifests["Deployment"]["spec"]["selector"]["matchLabels"]


def test_envoy_sidecar_config_is_valid(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path / "pki")
    server = pki.servers["orders-api"]
    text = (DEPLOY / "envoy" / "envoy.yaml").read_text()
    for name, path in {"server.pem": server.cert, "server-key.pem": server.key, "ca.pem": pki.ca_cert}.items():
        text = text.replace(f"/etc/envoy/tls/{name}", str(path))
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    envoy = Path(sys.executable).parent / "envoy"
    proc = subprocess.run([str(envoy), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "OK" in proc.stdout + proc.stderr


def test_envoy_http_ext_authz_config_is_valid(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path / "pki", clients={"proxy": "spiffe://cluster.local/ns/mesh/sa/envoy"})
    server, proxy = pki.servers["orders-api"], pki.clients["proxy"]
    text = (DEPLOY / "envoy" / "envoy-http.yaml").read_text()
    assert "http_service" in text and "grpc_service" not in text
    files = {"server.pem": server.cert, "server-key.pem": server.key, "proxy.pem": proxy.cert,
             "proxy-key.pem": proxy.key, "ca.pem": pki.ca_cert}
    for name, path in files.items():
        text = text.replace(f"/etc/envoy/tls/{name}", str(path))
    config = tmp_path / "envoy-http.yaml"
    config.write_text(text)
    envoy = Path(sys.executable).parent / "envoy"
    proc = subprocess.run([str(envoy), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
