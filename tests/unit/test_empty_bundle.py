"""A bundle without policies (a ConfigMap mounted without items: gives only bundle.yaml) is
refused, naming the missing policies, unless --allow-empty-bundle: it would deny every request
while reporting ready."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bundle_factory import write_bundle
from test_serve import http_get, start

from authz.bundle.loader import BundleError, read_bundle
from authz.bundle.store import LOADED, REJECTED, BundleStore
from authz.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
POLICY = {"name": "probe", "action": "ALLOW",
          "rules": [{"name": "probe", "to": [{"operation": {"methods": ["GET"], "paths": ["/probe"]}}]}]}


def only_manifest(tmp_path: Path) -> Path:
    """What `kubectl create configmap authz-bundle --from-file=policies/example` mounts: the
    top-level file only, since a ConfigMap key cannot hold a directory."""
    root = tmp_path / "mounted"
    root.mkdir()
    shutil.copy(REPO / "policies" / "example" / "bundle.yaml", root / "bundle.yaml")
    return root


def test_serve_refuses_a_bundle_with_only_bundle_yaml(tmp_path: Path) -> None:
    proc, _, h = start("--bundle", str(only_manifest(tmp_path)), "--audit-log", "/dev/null")
    try:
        code, body = http_get(h, "/readyz")
        assert code == 503 and "the bundle has no policies (no policies/ directory)" in body
        assert json.loads(http_get(h, "/v1/status")[1])["revision"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert re.search(r"bundle\.yaml:\d+:1: error: the bundle has no policies \(no policies/ directory\)", err)
    assert "items:" in err and "--allow-empty-bundle" in err


def test_allow_empty_bundle_serves_it(tmp_path: Path) -> None:
    proc, _, h = start("--bundle", str(only_manifest(tmp_path)), "--allow-empty-bundle", "--audit-log", "/dev/null")
    try:
        deadline = time.monotonic() + 30
        while http_get(h, "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http_get(h, "/readyz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_empty_policies_directory_is_refused_too(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", [])  # policies/p.yaml holds no document
    with pytest.raises(BundleError) as info:
        read_bundle(root, require_policies=True)
    (problem,) = info.value.problems
    assert str(problem).startswith("bundle.yaml:1:1: error: the bundle has no policies (no policy in its "
                                   "policies/ files)")
    assert read_bundle(root).policies == []  # authoring tools may still read it


def test_a_reload_that_drops_every_policy_keeps_the_old_bundle(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    store = BundleStore(Metrics())
    assert store.load(root)
    write_bundle(root, [], revision="r2")
    assert not store.load(root)
    assert store.status().last_result == REJECTED and store.current is not None and store.current.revision == "r1"
    assert "no policies" in (store.status().last_error or "")
    lenient = BundleStore(Metrics(), allow_empty=True)
    assert lenient.load(root) and lenient.status().last_result == LOADED


def test_build_refuses_an_empty_bundle(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "authz", "build", str(only_manifest(tmp_path)), "-o",
                           str(tmp_path / "b.tar.gz")], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "the bundle has no policies" in proc.stderr
    assert not (tmp_path / "b.tar.gz").exists()


def test_lint_reports_a_bundle_without_policies_as_an_error(tmp_path: Path) -> None:
    from authz.lint import lint_bundle

    root = tmp_path / "b"
    root.mkdir()
    (root / "bundle.yaml").write_text("apiVersion: authz/v1\nkind: Bundle\nname: n\nrevision: r\ntrustDomain: td\n")
    problems = lint_bundle(root)
    assert any(p.severity == "error" and "polic" in p.message for p in problems), problems
