import pytest

from authz import paths


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/", "/", ""),
        ("/v1/orders", "/v1/orders", ""),
        ("/v1/orders?limit=5&x=%2F", "/v1/orders", "limit=5&x=%2F"),
        ("/v1//orders", "/v1/orders", ""),
        ("//v1///orders//", "/v1/orders/", ""),
        ("/v1/./orders", "/v1/orders", ""),
        ("/v1/tenants/acme/../globex/orders", "/v1/tenants/globex/orders", ""),
        ("/../../etc/passwd", "/etc/passwd", ""),
        ("/v1/%2e%2e/admin", "/admin", ""),
        ("/v1/%2E/x", "/v1/x", ""),
        ("/a/b/..", "/a/", ""),
        ("/caf%C3%A9", "/café", ""),
        ("/v1/orders%3Fx", "/v1/orders?x", ""),
        # Envoy's canonicalisation (test/common/http/path_utility_test.cc)
        ("/a/b/../c", "/a/c", ""),
        ("a/b/../c", "/a/c", ""),
        ("/a/b/../../../../c", "/c", ""),
        ("/a/..\\c", "/c", ""),
        ("/v1/\\admin", "/v1/admin", ""),
        ("/a/b/%2E./c", "/a/c", ""),
        ("/a/b/%2E/c", "/a/b/c", ""),
        ("..", "/", ""),
        ("/../a/b", "/a/b", ""),
        ("/./a/b", "/a/b", ""),
        ("/A/B/C", "/A/B/C", ""),
        ("/a//b?a=///c", "/a/b", "a=///c"),
    ],
)
def test_normalize(raw: str, path: str, query: str) -> None:
    n = paths.normalize(raw)
    assert (n.path, n.query) == (path, query)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("?x=1", "empty"),
        ("/v1/orders#frag", "fragment"),
        ("/v1/tenants/acme%2F..%2Fglobex/orders", "encoded"),
        ("/v1/tenants/acme%2fx", "encoded"),
        ("/v1%5Cadmin", "encoded"),
        ("/%5c%25", "encoded"),
        ("/a/%2F%2f/c", "encoded"),
        ("/%c0%af", "UTF-8"),
        ("/xyz/.%00../abc", "encoded"),
        ("/xyz/AAAAA%%0000/abc", "malformed"),
        ("/v1/%00", "encoded"),
        ("/v1/%252e%252e/admin", "more than once"),
        ("/v1/%25%32%66", "more than once"),
        ("/v1/%zz", "malformed"),
        ("/v1/%e", "malformed"),
        ("/v1/%C3", "UTF-8"),
        ("/v1/\x01", "control"),
        ("/v1/%0a", "control"),
        ("/v1/tenants/acme/..;/globex/orders", "dot segment"),
        ("/v1/tenants/acme/.;x/orders", "dot segment"),
    ],
)
def test_normalize_refuses_ambiguous(raw: str, reason: str) -> None:
    with pytest.raises(paths.PathError, match=reason):
        paths.normalize(raw)


def test_template_one_segment() -> None:
    t = paths.compile_template("/v1/orders/{*}/cancel")
    assert t.match("/v1/orders/42/cancel") == {}
    assert t.match("/v1/orders//cancel") is None
    assert t.match("/v1/orders/4/2/cancel") is None
    assert t.match("/v1/orders/42/cancel/") is None


def test_template_rest_needs_one_or_more_segments() -> None:
    t = paths.compile_template("/v1/{**}")
    assert t.match("/v1/a") == {}
    assert t.match("/v1/a/b/c") == {}
    assert t.match("/v1/") is None
    assert t.match("/v1") is None


def test_template_captures() -> None:
    t = paths.compile_template("/v1/tenants/{tenant}/orders/{id}")
    assert t.captures == ("tenant", "id")
    assert t.match("/v1/tenants/acme/orders/7") == {"tenant": "acme", "id": "7"}
    assert t.match("/v1/tenants/acme/orders") is None


def test_template_literal_regex_characters_are_literal() -> None:
    t = paths.compile_template("/v1.0/{*}")
    assert t.match("/v1.0/x") == {}
    assert t.match("/v1x0/x") is None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("/v1/{**}/x", "last"),
        ("/v1/{tenant", "unbalanced"),
        ("/v1/x{*}", "whole path segment"),
        ("/v1/{*}x", "whole path segment"),
        ("/v1/{a}/{a}", "twice"),
        ("/v1/{a-b}", "not a template operator"),
        ("v1/{*}", "start with"),
    ],
)
def test_template_errors(pattern: str, message: str) -> None:
    with pytest.raises(paths.TemplateError, match=message):
        paths.compile_template(pattern)


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/tenants/acme/orders/%EF%BC%8E%EF%BC%8E/%EF%BC%8E%EF%BC%8E/globex/orders",  # fullwidth dots
        "/v1/tenants/acme%EF%BC%8Fglobex/orders",  # fullwidth solidus
        "/v1/%EF%B9%92%EF%B9%92/x",  # small full stop
        "/v1/%C0%AE%C0%AE/x",  # overlong UTF-8 '.'
        "/v1/%E2%80%A5/x",  # two dot leader (NFKC: '..')
    ],
)
def test_unicode_lookalikes_of_separators_are_refused(raw: str) -> None:
    with pytest.raises(paths.PathError):
        paths.normalize(raw)


def test_plain_unicode_is_kept() -> None:
    assert paths.normalize("/caf%C3%A9/%E6%97%A5%E6%9C%AC").path == "/café/日本"
