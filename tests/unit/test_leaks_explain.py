"""Explain output (`authz check --explain`, /v1/explain, gRPC Explain) never shows a credential:
a never-logged header is shown by its length only, an authority without its user info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import check_request, policy_set, write_bundle

from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.cli import main
from authz.decision_api import handle_json
from authz.engine.explain import Explainer
from authz.metrics import Metrics

SECRET = "Bearer SECRET"  # 13 characters

POLICIES: list[dict[str, Any]] = [
    {"name": "no-basic", "action": "DENY",
     "rules": [{"name": "basic", "to": [{"operation": {"headers": {"authorization": ["Basic *"]}}}]}]},
    {"name": "no-cookie", "action": "DENY",
     "rules": [{"name": "cookie", "to": [{"operation": {"notHeaders": {"cookie": ["*"]}, "paths": ["/c"]}}]}]},
    {"name": "keyed", "action": "DENY",
     "rules": [{"name": "key", "to": [{"operation": {"headers": {"x-api-key": ["legacy-*"]}}}]}]},
    {"name": "plans", "action": "ALLOW",
     "rules": [{"name": "gold", "to": [{"operation": {"headers": {"x-plan": ["gold"]}, "hosts": ["svc"]}}]}]},
]


def trace(tmp_path: Path, **request: Any) -> str:
    store = BundleStore(None)
    store.current = policy_set(tmp_path, POLICIES)
    tracer = Explainer()
    Checker(store, None).run(check_request(**request), tracer)
    return "\n".join(tracer.lines())


def test_credential_headers_are_shown_by_length_only(tmp_path: Path) -> None:
    text = trace(tmp_path, headers={"authorization": SECRET, "x-api-key": "k-SECRET", "x-plan": "silver"})
    assert "SECRET" not in text
    assert "FAILED headers[authorization]: <redacted, 13 characters> does not match [Basic *]" in text
    assert "FAILED headers[x-api-key]: <redacted, 8 characters> does not match [legacy-*]" in text
    # Other headers stay readable: policy authors need them.
    assert "FAILED headers[x-plan]: 'silver' does not match [gold]" in text


def test_absent_and_negative_credential_headers(tmp_path: Path) -> None:
    text = trace(tmp_path, path="/c", headers={"cookie": "session=SECRET"})
    assert "SECRET" not in text
    assert "notHeaders[cookie]: <redacted, 14 characters> matches [*] (excluded)" in text
    assert "headers[authorization]: (none) does not match [Basic *]" in trace(tmp_path / "2")


def test_user_info_of_the_authority_is_not_shown(tmp_path: Path) -> None:
    text = trace(tmp_path, host="user:SECRET@svc", headers={"x-plan": "gold"})
    assert "SECRET" not in text.upper()
    # Shown as a URL's would be: the marker says why the host did not match.
    assert "FAILED hosts: '***@svc' does not match [svc]" in text


def test_explain_cli_and_decision_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = write_bundle(tmp_path / "bundle", POLICIES)
    req = {"attributes": {"request": {"http": {"method": "GET", "path": "/", "host": "svc",
                                               "headers": {"authorization": SECRET}}}}}
    f = tmp_path / "req.json"
    f.write_text(json.dumps(req))
    for fmt in ("text", "json"):
        assert main(["check", "--bundle", str(bundle), "--request", str(f), "--explain", "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert "SECRET" not in out and "<redacted, 13 characters>" in out, fmt
    store = BundleStore(Metrics())
    assert store.load(bundle)
    body = json.dumps({"method": "GET", "path": "/", "host": "svc", "headers": {"authorization": SECRET}})
    status, answer = handle_json(Checker(store, None), "/v1/explain", body.encode())
    assert status == 200, answer
    assert b"SECRET" not in answer and b"<redacted, 13 characters>" in answer
