"""Issue 8, "Must show": authz never allows what Istio denies.

For every pair in pairs/ (Istio AuthorizationPolicy ``-in`` + the RBAC filter(s) istiod emits
for it ``-out*``), the requests gen_requests.py derives from the policy plus the pair's
hand-written hostile ones are decided twice, each by a real Envoy 1.40 (see harness.py):
by the RBAC filters (the oracle) and by authz through ext_authz, with the policy converted by
``authz import-istio``. Every request must get the same answer, or authz may be stricter for
a reason docs/bundle-format.md lists under "Differences from Istio". A request authz allows
and the oracle denies fails the test, always.

The path pairs also run with the HCM path options of the shipped deploy/envoy/envoy.yaml on
both Envoys (the oracle then shows what RBAC would decide behind that proxy), every request
over HTTP/1.1 and HTTP/2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .harness import (
    STRICTNESS_KINDS,
    Pair,
    Row,
    compare,
    decide_with_authz,
    decide_with_oracle,
    documented_entries,
    import_bundle,
    kind_documented,
    load_pairs,
    path_normalization_for,
    requests_for,
    shipped_path_options,
)

pytestmark = pytest.mark.differential

PAIRS = load_pairs()
EXAMPLES = 12  # disagreements shown per kind in a failure message


def _failure(row: Row) -> str:
    parts = [f"{row.pair}: {row.looser} looser, {row.stricter_undocumented} stricter without a documented reason"]
    if row.note:
        parts.append(row.note)
    if row.looser_examples:
        parts.append("authz ALLOWS what Istio denies:\n  " + "\n  ".join(row.looser_examples[:EXAMPLES]))
    if row.undocumented_examples:
        parts.append("authz stricter, not a documented difference:\n  "
                     + "\n  ".join(row.undocumented_examples[:EXAMPLES]))
    return "\n".join(parts)


def _run(pair: Pair, reqs: list[dict[str, Any]], tmp: Path, label: str,
         path_options: dict[str, Any] | None, agreement_rows: list[Row]) -> Row:
    oracle_res = decide_with_oracle(pair, reqs, tmp, path_options)
    reached = [r for r in oracle_res if r.get("status") in (200, 403)]
    assert reached, f"{label}: no request reached the oracle's RBAC filters: {oracle_res[:3]}"
    bundle = tmp / "bundle"
    problem = import_bundle(pair, bundle, path_normalization_for(path_options) if path_options else None)
    if problem is not None:
        row = Row(label, requests=len(reqs), note=problem)
        agreement_rows.append(row)
        return row
    try:
        authz_res = decide_with_authz(pair, reqs, bundle, tmp, path_options)
    except RuntimeError as exc:  # authz did not start (e.g. the bundle does not load)
        row = Row(label, requests=len(reqs), note=f"authz serve: {exc}")
        agreement_rows.append(row)
        return row
    row = compare(label, reqs, oracle_res, authz_res, documented_entries(), pair.left_out)
    agreement_rows.append(row)
    return row


@pytest.mark.parametrize("pair", PAIRS, ids=[p.name for p in PAIRS])
def test_authz_agrees_with_envoy_rbac(pair: Pair, tmp_path: Path, agreement_rows: list[Row]) -> None:
    reqs = requests_for(pair)
    row = _run(pair, reqs, tmp_path, pair.name, pair.hcm_options, agreement_rows)
    assert not row.failed, _failure(row)


SHIPPED = [p for p in PAIRS if p.shipped]


@pytest.mark.parametrize("pair", SHIPPED, ids=[p.name for p in SHIPPED])
def test_paths_through_shipped_envoy_settings(pair: Pair, tmp_path: Path, agreement_rows: list[Row]) -> None:
    options = shipped_path_options()
    reqs = []
    for r in requests_for(pair):
        for protocol in ("http1", "h2"):
            reqs.append(dict(r, protocol=protocol, id=f"{r['id']}-{protocol}"))
    row = _run(pair, reqs, tmp_path, f"{pair.name} [shipped envoy.yaml]", options, agreement_rows)
    assert not row.failed, _failure(row)


def test_every_issue_class_has_a_pair() -> None:
    wanted = {"methods", "paths", "principals", "trust-domains", "namespaces", "service-accounts", "headers",
              "dry-run", "ports", "hosts", "plaintext", "ip-blocks", "sni", "destination-ip", "caller-identity"}
    covered = {c for p in PAIRS for c in p.classes}
    assert wanted <= covered, f"classes without a pair: {sorted(wanted - covered)}"
    assert SHIPPED, "no path pair runs through the shipped Envoy settings"


def test_strictness_kinds_name_documented_sections() -> None:
    """The docs list every intended difference the comparison may accept."""
    entries = documented_entries()
    missing = [k.name for k in STRICTNESS_KINDS if not kind_documented(k, entries)]
    assert not missing, (f"docs/bundle-format.md, section 'Differences from Istio', has no entry for: {missing} "
                         f"(entries found there: {entries})")
