import pytest

from authz import paths


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/", "/", ""),
        ("/v1/orders", "/v1/orders", ""),
        ("/v1/orders?limit=5&x=%2F", "/v1/orders", "limit=5&x=%2F"),
        # Istio's default (BASE) keeps repeated slashes: '//x' is not '/x'
        ("/v1//orders", "/v1//orders", ""),
        ("//v1///orders//", "//v1///orders//", ""),
        ("/v1/./orders", "/v1/orders", ""),
        ("/v1/tenants/acme/../globex/orders", "/v1/tenants/globex/orders", ""),
        ("/../../etc/passwd", "/etc/passwd", ""),
        ("/v1/%2e%2e/admin", "/admin", ""),
        ("/v1/%2E/x", "/v1/x", ""),
        ("/a/b/..", "/a/", ""),
        # only unreserved escapes are decoded; the rest stay as the proxy forwards them
        ("/caf%C3%A9", "/caf%C3%A9", ""),
        ("/v1/orders%3Fx", "/v1/orders%3Fx", ""),
        ("/%7Euser/%41", "/~user/A", ""),
        ("/files/a%20b", "/files/a%20b", ""),
        # dot segments are resolved before anything else: the empty segment is what '..' removes
        ("/admin//../public/x", "/admin/public/x", ""),
        ("/v1/tenants/globex//../acme/orders", "/v1/tenants/globex/acme/orders", ""),
        # Envoy's canonicalisation (test/common/http/path_utility_test.cc)
        ("/a/b/../c", "/a/c", ""),
        ("/a/b/../../../../c", "/c", ""),
        ("/a/..\\c", "/c", ""),
        ("/v1/\\admin", "/v1//admin", ""),
        ("/a/b/%2E./c", "/a/c", ""),
        ("/a/b/%2E/c", "/a/b/c", ""),
        ("/../a/b", "/a/b", ""),
        ("/./a/b", "/a/b", ""),
        ("/A/B/C", "/A/B/C", ""),
        ("/a//b?a=///c", "/a//b", "a=///c"),
    ],
)
def test_normalize(raw: str, path: str, query: str) -> None:
    n = paths.normalize(raw)
    assert (n.path, n.query) == (path, query)


@pytest.mark.parametrize(
    ("mode", "raw", "path"),
    [
        (paths.Normalization.NONE, "/a//../b", "/a//../b"),
        (paths.Normalization.BASE, "/a//../b", "/a/b"),
        (paths.Normalization.MERGE_SLASHES, "//a//b/", "/a/b/"),
        (paths.Normalization.MERGE_SLASHES, "/a%2Fb", "/a%2Fb"),
        (paths.Normalization.DECODE_AND_MERGE_SLASHES, "/a%2Fb%5c/c", "/a/b/c"),
        (paths.Normalization.DECODE_AND_MERGE_SLASHES, "/a/x%2F..%2Fb", "/a/b"),
    ],
)
def test_normalize_follows_the_proxys_mode(mode: paths.Normalization, raw: str, path: str) -> None:
    assert paths.normalize(raw, mode).path == path


@pytest.mark.parametrize(
    ("raw", "readings"),
    [
        ("/v1/orders", ()),
        ("//admin/x", ("/admin/x",)),
        ("/admin%2Fx", ("/admin/x",)),
        ("/admin%5cx", ("/admin/x",)),
        ("/public/x%2F..%2F..%2Fadmin", ("/admin",)),
        ("/admin;jsessionid=1/x", ("/admin/x",)),
        # Decoded and merged before the dots are resolved, `..` climbs past `orders`.
        ("/v1/tenants/acme/orders/%2F%2F..%2F..%2Fglobex%2Forders", ("/v1/tenants/globex/orders",)),
        ("/v1/tenants/acme/orders/%5C%5C..%5C..%5Cglobex%5Corders", ("/v1/tenants/globex/orders",)),
        ("/public/%2F%2F..%2F..%2Fadmin%2Fx", ("/admin/x", "/public/admin/x")),
        # Windows drops a segment's trailing dots and spaces, and an NTFS stream suffix
        ("/admin./x", ("/admin/x",)),
        ("/admin%2e%2E/x", ("/admin/x",)),
        ("/admin%20/x", ("/admin/x",)),
        ("/admin::$DATA/x", ("/admin/x",)),
        ("/v1/tenants/acme./orders", ("/v1/tenants/acme/orders",)),
        # Fullwidth and other compatibility letters, as best-fit conversion and NFKC read them
        ("/%EF%BD%81dmin/x", ("/admin/x",)),
        ("/ａdmin/x", ("/admin/x",)),
        ("/v1/tenants/%EF%BD%87lobex/orders", ("/v1/tenants/globex/orders",)),
        ("/admin%C2%A0/x", ("/admin/x",)),  # a no-break space is a space, then trimmed
        ("/%EF%BD%81%C3%A9/x", ("/a%C3%A9/x",)),  # what stays non-ASCII keeps its escapes
        ("/cafe%CC%81/admin", ("/caf%C3%A9/admin",)),  # a combining mark composes with its letter
        # dotless and dotted i: 'i' to best-fit (cp1252) and to Java's equalsIgnoreCase
        ("/adm%C4%B1n/x", ("/admin/x",)),
        ("/admın/x", ("/admin/x",)),
        ("/%C4%B0NDEX/x", ("/INDEX/x",)),
        ("/%C5%BFecret/x", ("/secret/x",)),  # long s: NFKC folds it
        # decode-then-parse upstreams end the path at an encoded '?' or '#' (CVE-2024-38474)
        ("/user/profile%3Fx", ("/user/profile",)),
        ("/admin%3f.css", ("/admin",)),
        ("/admin%23.css", ("/admin",)),
    ],
)
def test_readings_are_what_an_upstream_may_act_on(raw: str, readings: tuple[str, ...]) -> None:
    assert set(readings) <= set(paths.normalize(raw).readings)
    assert paths.normalize(raw).path not in paths.normalize(raw).readings


def test_every_reading_is_free_of_dot_segments() -> None:
    n = paths.normalize("/a/b%2F..%2F..%2F..%2Fc//d/;x/e")
    for r in (n.path, *n.readings):
        assert "/../" not in r + "/" and "/./" not in r + "/", r


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("?x=1", "empty"),
        ("/v1/orders#frag", "fragment"),
        ("/%c0%af", "UTF-8"),
        ("/xyz/.%00../abc", "NUL"),
        ("/xyz/AAAAA%%0000/abc", "malformed"),
        ("/v1/%00", "NUL"),
        ("/v1/%252e%252e/admin", "more than once"),
        ("/v1/%25%32%66", "more than once"),
        ("/v1/%zz", "malformed"),
        ("/v1/%e", "malformed"),
        ("/v1/%C3", "UTF-8"),
        ("/v1/\x01", "control"),
        ("/v1/%0a", "control"),
        ("/v1/%C2%85x", "control"),  # U+0085, NEXT LINE
        ("/v1/\u2028x", "control"),
        ("/v1/tenants/acme/..;/globex/orders", "dot segment"),
        ("/v1/tenants/acme/.;x/orders", "dot segment"),
        ("http://evil/admin", "does not start with '/'"),
        ("v1/tenants/acme/orders", "does not start with '/'"),
        ("*", "does not start with '/'"),
        ("a/b/../c", "does not start with '/'"),
        ("..", "does not start with '/'"),
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


def test_template_rest_is_envoys_double_star() -> None:
    # Envoy's URI template '**' (what Istio generates for {**}): zero or more segments
    t = paths.compile_template("/v1/{**}")
    assert t.match("/v1/a") == {}
    assert t.match("/v1/a/b/c") == {}
    assert t.match("/v1/a/b/") == {}
    assert t.match("/v1/") == {}
    assert t.match("/v1") is None


def test_template_literal_text_may_follow_double_star() -> None:
    t = paths.compile_template("/v1/{**}/items")
    assert t.match("/v1/a/b/items") == {}
    assert t.match("/v1//items") == {}
    assert t.match("/v1/a/b") is None


def test_template_segments_take_envoys_characters_only() -> None:
    t = paths.compile_template("/v1/{*}")
    for ok in ["a-b.c_d~e", "%20", "!$&'()+,;:@", "a=b", "a*b"]:
        assert t.match("/v1/" + ok) == {}, ok
    for bad in ["[x]", "a b", "é", "a\"b"]:
        assert t.match("/v1/" + bad) is None, bad


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
        ("/v1/{**}/{*}", "no operator may follow"),
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
        "/public/..%E2%88%95secret",  # division slash: '/' to Windows' best-fit conversion
        "/public/..%E2%88%96secret",  # set minus: '\\'
        "/public/..%E2%81%84secret",  # fraction slash
        "/public/..%C2%A5secret",  # yen sign: '\\' in the Japanese code page (cp932)
        "/public/..\u20a9secret",  # won sign: '\\' in the Korean code page (cp949)
        "/public/..%EF%BF%A5secret",  # fullwidth yen: NFKC makes it the yen sign
    ],
)
def test_unicode_lookalikes_of_separators_are_refused(raw: str) -> None:
    with pytest.raises(paths.PathError):
        paths.normalize(raw)


def test_a_path_whose_compatibility_form_balloons_is_refused() -> None:
    """U+FDFA is 18 characters in NFKC: 6,400 of them in a 58 KB path took 6 s of CPU to read
    every way. Refused instead; text that folds to about its own length is read."""
    with pytest.raises(paths.PathError, match="compatibility forms are too long"):
        paths.normalize("/a;p/b%20/" + "%EF%B7%BA" * 6400 + "//x%2Fy")
    assert paths.normalize("/x/" + "%EF%BD%81" * 2000).readings == ("/x/" + "a" * 2000,)


def test_plain_unicode_is_kept_as_forwarded() -> None:
    assert paths.normalize("/caf%C3%A9/%E6%97%A5%E6%9C%AC").path == "/caf%C3%A9/%E6%97%A5%E6%9C%AC"
    assert paths.normalize("/café").path == "/café"
    # Already NFKC: no other reading, so an ALLOW on such a path is not made ambiguous.
    assert paths.normalize("/caf%C3%A9/%E6%97%A5%E6%9C%AC").readings == ()
    assert paths.normalize("/café").readings == ()


def test_unicode_lookalikes_are_refused_on_the_fast_path_too() -> None:
    for raw in ["/v1/tenants/acme／globex/orders", "/v1/．．/admin", "/v1/‥/admin"]:
        with pytest.raises(paths.PathError, match="normalise"):
            paths.normalize(raw)


def test_dot_segments_and_plain_dots_keep_their_meaning() -> None:
    """Only a segment with something before its trailing dots is trimmed: `..` stays `..`."""
    assert paths.normalize("/a/.../b").readings == ()
    assert paths.normalize("/v1/x.json").readings == ()
    assert paths.normalize("/a/b/../c").path == "/a/c"
