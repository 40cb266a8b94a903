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
    p = n.path
    assert p.startswith("/")
    assert "//" not in p
    segments = p.split("/")[1:]
    assert all(s not in (".", "..") for s in segments)
    assert "\\" not in p and "\x00" not in p and "#" not in p
    # decoding once more changes nothing: no escapes are left to decode
    assert not re.search("%[0-9A-Fa-f]{2}", p)


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
        # the captured tenant is exactly the segment an upstream sees after the same decoding
        assert n.path.split("/")[3] == tenant
