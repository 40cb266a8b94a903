"""/readyz and /v1/status show no file system paths unless --status-show-paths asks."""

from __future__ import annotations

import json
from pathlib import Path

from support.tls_serve import Serve, wait_for

from authz.redact import hide_paths, redact_url


def test_paths_hidden_by_default_and_shown_on_request(tmp_path: Path) -> None:
    missing = tmp_path / "secret-location" / "bundle"
    persist = tmp_path / "persisted-here"
    hidden = Serve(tmp_path / "a", "--bundle", str(missing), "--persist", str(persist),
                   "--audit-log", str(tmp_path / "a.log"))
    try:
        # Until the first load has failed, /readyz says "no bundle loaded yet": wait for the failure.
        assert wait_for(lambda: "does not exist" in hidden.get("/readyz")[1]), hidden.stderr()
        code, readyz = hidden.get("/readyz")
        assert code == 503
        status = hidden.get("/v1/status")[1]
        for body in (readyz, status):
            assert "secret-location" not in body and "persisted-here" not in body, body
        assert "bundle directory <bundle> does not exist" in readyz
        assert json.loads(status)["source"] == "<bundle>"
    finally:
        hidden.stop()
    shown = Serve(tmp_path / "b", "--bundle", str(missing), "--status-show-paths",
                  "--audit-log", str(tmp_path / "b.log"))
    try:
        assert wait_for(lambda: "does not exist" in shown.get("/readyz")[1]), shown.stderr()
        code, readyz = shown.get("/readyz")
        assert code == 503 and str(missing) in readyz
        assert json.loads(shown.get("/v1/status")[1])["source"] == str(missing)
    finally:
        shown.stop()


def test_redact_url() -> None:
    assert redact_url("https://u:p@h:8443/b.tar.gz?sig=abc&x=") == "https://***@h:8443/b.tar.gz?sig=REDACTED&x=REDACTED"
    assert redact_url("https://h/b.tar.gz") == "https://h/b.tar.gz"
    assert redact_url("http://tok@h/") == "http://***@h/"
    # a key without '=' may be the token itself; a path parameter may hold the session
    assert redact_url("http://h/b.tar.gz?GHTOKEN123") == "http://h/b.tar.gz?REDACTED"
    assert redact_url("/a;jsessionid=SECRET/b?x=1&y") == "/a;jsessionid=REDACTED/b?x=REDACTED&REDACTED"


def test_hide_paths_longest_first() -> None:
    doc = {"a": "/x/bundle/p.yaml: bad", "b": ["/x/bundle-other"], "n": 3}
    assert hide_paths(doc, {"/x/bundle": "<bundle>", "/x/bundle/p.yaml": "<file>"}) == {
        "a": "<file>: bad", "b": ["<bundle>-other"], "n": 3}
