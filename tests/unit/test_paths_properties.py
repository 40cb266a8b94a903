"""Properties of path normalisation over generated hostile paths."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from authz import paths
from authz.engine.decide import TENANT_ID

# Pieces attackers combine: separators, dots, escapes of both, params, unicode lookalikes.
PIECES = st.sampled_from([
    "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%252e", "%00", ";", "..;", "\\",
    "?", "#", "%3f", "%3B", "acme", "globex", "orders", "tenants", "v1", "%EF%BC%8E", "%C0%AE", "a b",
    "%41", "~", "%7e", "\t", "é", "%C3%A9",
])
RAW = st.lists(PIECES, min_size=1, max_size=14).map(lambda xs: "/" + "".join(xs))


@settings(max_examples=3000, deadline=None)
@given(RAW)
def test_normalized_paths_are_canonical(raw: str) -> None:
    try:
        n = paths.normalize(raw)
    except paths.PathError:
        return
    for p in (n.path, *n.readings):
        assert p.startswith("/")
        assert all(s not in (".", "..") for s in p.split("/")[1:]), p
        assert "\\" not in p and "\x00" not in p and "#" not in p
        # no unreserved character is left encoded
        assert not re.search("%(2[Ee]|4[1-9A-Fa-f]|5[0-9Aa]|6[1-9A-Fa-f]|7[0-9Aa]|3[0-9]|2[Dd]|5[Ff]|7[Ee])", p)
    # the proxy form is a fixed point: normalising what was forwarded changes nothing
    assert paths.normalize(n.path).path == n.path
    assert n.path not in n.readings


@settings(max_examples=3000, deadline=None)
@given(RAW)
def test_merging_modes_leave_no_repeated_slash(raw: str) -> None:
    for mode in (paths.Normalization.MERGE_SLASHES, paths.Normalization.DECODE_AND_MERGE_SLASHES):
        try:
            n = paths.normalize(raw, mode)
        except paths.PathError:
            return
        assert "//" not in n.path


@settings(max_examples=3000, deadline=None)
@given(RAW)
def test_tenant_capture_is_a_plain_segment(raw: str) -> None:
    t = paths.compile_template("/v1/tenants/{tenant}/{**}")
    try:
        n = paths.normalize("/v1/tenants" + raw)
    except paths.PathError:
        return
    m = t.match(n.path)
    if m is not None and TENANT_ID.match(m["tenant"]):
        tenant = m["tenant"]
        assert "/" not in tenant and "%" not in tenant and tenant not in (".", "..")
        # the captured tenant is exactly the segment the proxy forwards
        assert n.path.split("/")[3] == tenant
