"""Audit records hold no credential: no user info of the authority, and none of the credential
headers of ``NEVER_LOGGED``, which ``--audit-header`` refuses at start-up."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from audit_helpers import check_request, loaded_store

from authz.audit import AuditEntry, RecordFormatter, build_record, check_header_allowlist
from authz.check import Checker
from authz.cli import main as cli_main
from authz.metrics import Metrics
from authz.redact import NEVER_LOGGED

REPO = Path(__file__).resolve().parents[2]
CREDENTIAL_HEADERS = ["x-api-key", "api-key", "x-auth-token", "x-access-token", "x-csrf-token",
                      "x-xsrf-token", "x-amz-security-token", "x-goog-api-key", "x-vault-token"]


def entry(tmp_path: Path, host: str, headers: dict[str, str] | None = None) -> AuditEntry:
    metrics = Metrics()
    o = Checker(loaded_store(tmp_path, metrics), metrics).run(check_request(host=host, headers=headers))
    return AuditEntry(time.time(), o.decision_id, o.decision, o.request, o.revision, 1)


@pytest.mark.parametrize(("host", "recorded"), [
    ("user:SECRET@api.example:8443", "***@api.example:8443"),
    ("a@b:SECRET@api.example", "***@api.example"),
    ("api.example:8443", "api.example:8443"),
])
def test_user_info_of_the_authority_is_not_recorded(tmp_path: Path, host: str, recorded: str) -> None:
    e = entry(tmp_path, host, {":authority": host})
    allow = (":authority",)
    for rec in (build_record(e, allow), json.loads(RecordFormatter(allow)(e))):
        assert rec["host"] == recorded
        assert rec["headers"] == {":authority": recorded}
        assert "secret" not in json.dumps(rec).lower()


@pytest.mark.parametrize("name", CREDENTIAL_HEADERS + ["X-API-Key"])
def test_credential_headers_can_never_be_allow_listed(name: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert name.lower() in NEVER_LOGGED
    with pytest.raises(ValueError, match="can never be written to audit records"):
        check_header_allowlist([name])
    rc = cli_main(["serve", "--bundle", str(tmp_path), "--audit-log", str(tmp_path / "a.log"),
                   "--audit-header", name, "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
    assert rc == 2
    assert f"authz serve: header {name!r} carries credentials" in capsys.readouterr().err


def test_record_builders_drop_credential_headers_even_if_asked(tmp_path: Path) -> None:
    e = entry(tmp_path, "api.example", {h: "SECRET" for h in CREDENTIAL_HEADERS})
    asked = tuple(CREDENTIAL_HEADERS)
    assert "SECRET" not in json.dumps(build_record(e, asked))
    assert "SECRET" not in RecordFormatter(asked)(e)


def test_docs_list_every_never_logged_header() -> None:
    text = (REPO / "docs" / "audit.md").read_text()
    section = text.split("### Never logged", 1)[1].split("\n### ", 1)[0]
    assert set(re.findall(r"`([a-z0-9-]+)`", section)) >= NEVER_LOGGED
