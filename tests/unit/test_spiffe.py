from authz import spiffe


def test_parse() -> None:
    sid = spiffe.parse("spiffe://cluster.local/ns/prod/sa/checkout")
    assert sid is not None
    assert (sid.trust_domain, sid.namespace, sid.service_account) == ("cluster.local", "prod", "checkout")
    assert sid.uri == "spiffe://cluster.local/ns/prod/sa/checkout"


def test_parse_rejects_what_is_no_spiffe_uri() -> None:
    for bad in ["", "cluster.local/ns/a", "spiffe://", "spiffe:///ns/a", "http://td/ns/a"]:
        assert spiffe.parse(bad) is None, bad


def test_parse_accepts_non_strict_ids_as_istio_does() -> None:
    sid = spiffe.parse("spiffe://td/ns/a[1]/sa/b:c")
    assert sid is not None and (sid.namespace, sid.service_account) == ("a[1]", "b:c")


def test_aliases_expand_policy_principals_like_istiod() -> None:
    td = spiffe.TrustDomains("td1", frozenset({"old-td"}))
    assert td.expand_principal("td1/ns/a/sa/b") == ["td1/ns/a/sa/b", "old-td/ns/a/sa/b"]
    assert td.expand_principal("spiffe://old-td/ns/a/sa/b") == ["td1/ns/a/sa/b", "old-td/ns/a/sa/b"]
    # cluster.local points at the local trust domain, and is not itself kept
    assert td.expand_principal("cluster.local/ns/a/sa/b") == ["td1/ns/a/sa/b", "old-td/ns/a/sa/b"]
    # only 5-part principals whose trust domain is not '*' and is known
    assert td.expand_principal("*/ns/a/sa/b") == ["*/ns/a/sa/b"]
    assert td.expand_principal("other/ns/a/sa/b") == ["other/ns/a/sa/b"]
    assert td.expand_principal("td1/ns/a/sa/b/x") == ["td1/ns/a/sa/b/x"]
    assert td.expand_principal("td1/ns/a/*") == ["td1/ns/a/*"]
    assert td.expand_trust_domains(["old-td", "x"]) == ["td1", "old-td", "x"]


def test_wildcard_trust_domains_expand_like_istiod() -> None:
    td = spiffe.TrustDomains("td1", frozenset({"old-td1", "cluster.local"}))
    # '*-td1' covers old-td1 (kept as written there); the others get their own name
    assert sorted(td.expand_principal("*-td1/ns/foo/sa/p2")) == sorted(
        ["td1/ns/foo/sa/p2", "cluster.local/ns/foo/sa/p2", "*-td1/ns/foo/sa/p2"])
    # a prefix pattern that matches is replaced by every trust domain
    assert sorted(td.expand_principal("old*/ns/foo/sa/p")) == sorted(
        ["td1/ns/foo/sa/p", "cluster.local/ns/foo/sa/p", "old-td1/ns/foo/sa/p"])
    assert td.expand_principal("*-other/ns/foo/sa/p") == ["*-other/ns/foo/sa/p"]


def test_canonical_adds_scheme_and_replaces_aliases() -> None:
    td = spiffe.TrustDomains("cluster.local", frozenset({"old.example"}))
    assert td.canonical("cluster.local/ns/a/sa/b") == "spiffe://cluster.local/ns/a/sa/b"
    assert td.canonical("spiffe://old.example/ns/a/sa/b") == "spiffe://cluster.local/ns/a/sa/b"
    assert td.canonical("spiffe://other.example/ns/a/sa/b") == "spiffe://other.example/ns/a/sa/b"
    assert td.canonical("*") == "*"
    assert td.canonical("*/sa/b") == "*/sa/b"
    assert td.canonical("old.example/ns/a/*") == "spiffe://cluster.local/ns/a/*"
