"""Explain output (`authz check --explain`, /v1/explain, gRPC Explain) never shows a credential:
a never-logged header is shown by its length only, an authority without its user info, and a
bundle's own patterns for such a header (a break-glass token in a rule) by their length too."""

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
    assert "FAILED headers[authorization]: <redacted, 13 characters> does not match [<redacted, 7 characters>]" in text
    assert "FAILED headers[x-api-key]: <redacted, 8 characters> does not match [<redacted, 8 characters>]" in text
    # Other headers stay readable: policy authors need them.
    assert "FAILED headers[x-plan]: 'silver' does not match [gold]" in text


def test_absent_and_negative_credential_headers(tmp_path: Path) -> None:
    text = trace(tmp_path, path="/c", headers={"cookie": "session=SECRET"})
    assert "SECRET" not in text
    assert "notHeaders[cookie]: <redacted, 14 characters> matches [*] (excluded)" in text
    assert "headers[authorization]: (none) does not match [<redacted, 7 characters>]" in trace(tmp_path / "2")


def test_credentials_written_into_the_bundle_are_not_shown(tmp_path: Path) -> None:
    """A rule or a condition holding a static credential must not hand it to whoever may ask
    for an explanation; other literals of other conditions stay readable."""
    token, key = "Bearer BREAKGLASS-0123456789", "STATIC-KEY-abcdef"
    policies: list[dict[str, Any]] = [
        {"name": "break-glass", "action": "ALLOW", "rules": [
            {"name": "token", "to": [{"operation": {"headers": {"authorization": [token]}}}]},
            {"name": "key", "when": [f'request.headers["x-api-key"] == "{key}"']},
            {"name": "key-single", "when": [f"request.headers['x-api-key'].startsWith('{key}')"]},
            {"name": "plan", "when": ['request.headers["x-plan"] == "gold"']},
            # names the search for credential names cannot read: escaped or computed
            {"name": "escaped", "when": ["request.headers['x-api\\x2dkey'] == 'k-SECRET2'"]},
            {"name": "computed", "when": ["request.headers['x-api-' + 'key'] == 'k-SECRET3'"]},
        ]},
    ]
    store = BundleStore(None)
    store.current = policy_set(tmp_path, policies)
    tracer = Explainer()
    Checker(store, None).run(check_request(headers={"authorization": "Bearer x", "x-api-key": "k",
                                                    "x-plan": "silver"}), tracer)
    text = "\n".join(tracer.lines())
    assert "BREAKGLASS" not in text and key not in text and "SECRET" not in text, text
    assert f"[<redacted, {len(token)} characters>]" in text
    assert 'request.headers["x-api-key"] == "…" = false' in text
    assert 'request.headers["x-plan"] == "gold" = false' in text


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
