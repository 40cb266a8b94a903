from authz import spiffe


def test_parse() -> None:
    sid = spiffe.parse("spiffe://cluster.local/ns/prod/sa/checkout")
    assert sid is not None
    assert (sid.trust_domain, sid.namespace, sid.service_account) == ("cluster.local", "prod", "checkout")
    assert sid.uri == "spiffe://cluster.local/ns/prod/sa/checkout"


def test_parse_rejects_invalid() -> None:
    for bad in ["", "cluster.local/ns/a", "spiffe://", "spiffe://UPPER/ns/a", "spiffe://td/ns//a",
                "spiffe://td/ns/../a", "spiffe://td/ns/a%2Fb", "http://td/ns/a"]:
        assert spiffe.parse(bad) is None, bad


def test_canonical_adds_scheme_and_replaces_aliases() -> None:
    td = spiffe.TrustDomains("cluster.local", frozenset({"old.example"}))
    assert td.canonical("cluster.local/ns/a/sa/b") == "spiffe://cluster.local/ns/a/sa/b"
    assert td.canonical("spiffe://old.example/ns/a/sa/b") == "spiffe://cluster.local/ns/a/sa/b"
    assert td.canonical("spiffe://other.example/ns/a/sa/b") == "spiffe://other.example/ns/a/sa/b"
    assert td.canonical("*") == "*"
    assert td.canonical("*/sa/b") == "*/sa/b"
    assert td.canonical("old.example/ns/a/*") == "spiffe://cluster.local/ns/a/*"
