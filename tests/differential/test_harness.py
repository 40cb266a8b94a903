"""The comparison of the differential test counts what it should: a request authz allows and
the oracle denies is always a failure; a stricter answer passes only for a documented kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    STRICTNESS_KINDS,
    compare,
    documented_entries,
    path_is_ambiguous,
    shipped_path_options,
)

pytestmark = pytest.mark.differential

ALL_KINDS = [e for k in STRICTNESS_KINDS for e in k.doc_entries[:1]]


def res(status: int, reason: str = "", path: str = "/") -> dict[str, Any]:
    body = json.dumps({"local_body": json.dumps({"reason": reason}) if reason else ""})
    return {"status": status, "body": body, "envoy_saw": {"path": path}}


def req(**kw: Any) -> dict[str, Any]:
    return {"principal": "spiffe://cluster.local/ns/foo/sa/sleep", "method": "GET", "path": "/", **kw}


def test_looser_always_fails_even_when_every_kind_is_documented() -> None:
    row = compare("p", [req(method="get")], [res(403)], [res(200)], ALL_KINDS)
    assert (row.looser, row.agree, row.failed) == (1, 0, True)


def test_stricter_passes_only_for_a_documented_kind() -> None:
    reqs = [req(method="get"), req(path="//admin/x"), req(principal="")]
    authz = [res(403, "denied by policy"), res(403, "denied by policy"), res(403, "destination not identified")]
    oracle = [res(200)] * 3
    documented = compare("p", reqs, oracle, authz, ALL_KINDS)
    assert (documented.stricter_documented, documented.failed) == (3, False)
    undocumented = compare("p", reqs, oracle, authz, [])
    assert (undocumented.stricter_undocumented, undocumented.failed) == (3, True)


def test_stricter_without_a_matching_kind_fails() -> None:
    row = compare("p", [req(path="/plain")], [res(200)], [res(403, "no allow rule matched", "/plain")], ALL_KINDS)
    assert (row.stricter_undocumented, row.failed) == (1, True)


def test_plaintext_counts_as_unidentified_only_with_that_reason() -> None:
    row = compare("p", [req(principal="")], [res(200)], [res(403, "no allow rule matched")], ALL_KINDS)
    assert row.stricter_undocumented == 1


def test_skipped_and_agreeing_requests() -> None:
    row = compare("p", [req(), req(), req()], [res(200), res(403), {"skipped": "port"}],
                  [res(200), res(403), res(200)], [])
    assert (row.agree, row.skipped, row.failed) == (2, 1, False)


@pytest.mark.parametrize("path,ambiguous", [
    ("/a/b", False), ("/a//b", True), ("/a%2Fb", True), ("/a%5cb", True), ("/a;x/b", True),
    ("/a%3Bb", True), ("/a%252Fb", True), ("/a/%EF%BC%8E%EF%BC%8E/b", True), ("/caf%C3%A9", False),
    ("/a?x=//y", False), ("/a/%u002e%u002e/b", True), ("/a/100%", True), ("/a/%zz", True),
    ("/a/%c0%ae%c0%ae/b", True), ("/a/%FF", True), ("/a/%41%7e", False),
    ("/a%09/b", True), ("/a%7F", True), ("/a%1b", True),
])
def test_ambiguous_paths(path: str, ambiguous: bool) -> None:
    assert path_is_ambiguous(path) is ambiguous


def test_documented_entries_read_headings_and_table_rows(tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text("# T\n## Differences from Istio\ntext\n### Methods\nx\n| class | a |\n|---|---|\n"
                   "| repeated headers | b |\n## Next\n### Paths\n")
    assert documented_entries(doc) == ["Methods", "repeated headers"]


def test_shipped_settings_are_read_from_the_deploy_kit() -> None:
    options = shipped_path_options()
    assert set(options) == {"normalize_path", "merge_slashes", "path_with_escaped_slashes_action"}


@pytest.mark.parametrize("host,odd", [
    ("admin.example.com", False), ("admin.example.com:8080", True), ("admin.example.com:", True),
    ("admin.example.com:abc", True), ("[admin.example.com]:80", True), ("admin.example.com.", True),
    ("admin%E3%80%82example.com", True), ("admin\u3002example.com", True),
])
def test_a_deny_on_an_odd_authority_is_the_documented_host_kind(host: str, odd: bool) -> None:
    row = compare("p", [req(host=host)], [res(200)], [res(403, "denied by policy")], ALL_KINDS)
    assert (row.kinds == {"ambiguous-host": 1}) is odd


@pytest.mark.parametrize("path,override", [
    ("/m/x?_method=DELETE", True), ("/m/x?_method%00=DELETE", True), ("/m/x?_method%00x=DELETE", True),
    ("/m/x?%5Fmethod=DELETE", True), ("/m/x?method=DELETE", False), ("/m/x?_meth%00od=DELETE", False),
])
def test_a_deny_on_a_method_parameter_is_the_documented_override_kind(path: str, override: bool) -> None:
    row = compare("p", [req(method="POST", path=path)], [res(200)], [res(403, "denied by policy", "/m/x")], ALL_KINDS)
    assert (row.kinds == {"method-override": 1}) is override


@pytest.mark.parametrize("headers,kind", [
    ({"x-role": "admin"}, False), ({"x-role": " admin"}, True), ({"x-role": "admin\t"}, True),
    ({"x-role": "user,admin"}, True), ({"x-role": ["user", "admin"]}, True),
    ({"cookie": "a=1; session=admin"}, True), ({"x-role": "a=1; admin"}, False),
])
def test_a_deny_on_another_reading_of_a_header_is_the_documented_header_kind(headers: dict[str, Any], kind: bool) -> None:
    row = compare("p", [req(headers=headers)], [res(200)], [res(403, "denied by policy")], ALL_KINDS)
    assert (row.kinds == {"header-elements": 1}) is kind
