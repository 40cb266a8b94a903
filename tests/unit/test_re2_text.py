"""authz.spiffe.re2_text: policy text istiod pastes into Envoy's RE2 patterns, read by Python's
re as RE2 reads it, or refused.

istiod builds namespaces (`.*/ns/<ns>/.*`), service accounts and `*suffix` principals
(`spiffe://.*<suffix>`) by pasting the policy's text into an RE2 pattern unescaped. Where re
read that text otherwise, a namespace `dev{,2}` (literal text to RE2, `dev{0,2}` to re)
allowed namespaces `de` and `devv` that Istio denies (pair regex-braces)."""

from __future__ import annotations

import re
import warnings

import pytest

from authz.spiffe import namespace_regex, re2_compile, re2_text, service_account_regex


@pytest.mark.parametrize(("text", "matches", "misses"), [
    ("dev{,2}", ["dev{,2}"], ["dev", "de", "devv"]),  # RE2: literal text
    ("x{}", ["x{}"], ["x"]),
    ("a{x}", ["a{x}"], ["a"]),
    ("a{2,3}", ["aa", "aaa"], ["a", "aaaa"]),  # a repetition to both
    ("[[:digit:]]+", ["42"], ["4]", "x"]),  # a POSIX class to RE2
    ("[]a]", ["]", "a"], ["b"]),
    ("[a[b]", ["[", "a", "b"], ["c"]),  # '[' in a class: a literal (re would warn: nested set)
    ("[a&&b]", ["&", "a"], ["c"]),
    ("\\d", ["7"], ["\u0667", "\uff17"]),  # RE2's \d is ASCII; re's str patterns take any digit
    ("\\w+", ["ab_1"], ["\u00e9", "\u212a"]),
    ("a\\z", ["a"], ["a\n"]),  # RE2's end of text
    ("(?:a|b)c", ["ac", "bc"], ["c"]),
    ("(?P<n>a)b*?", ["a", "abb"], ["b"]),
    ("a.c", ["abc", "a.c"], ["ac"]),
    # ranges as RE2 reads them (checked against Envoy's RE2): a '-' after a character starts a
    # range whose end is the next character, whatever it is
    ("[--z]", [".", "A", "0", "z"], ["{"]),
    ("[+--]", [",", "+", "-"], ["."]),
    ("[%-[:alpha:]]", ["B]", "%]", ":]", "a]"], ["b", "Z", "-", "B"]),
    ("[!-[:digit:]]", ["5]", "d]"], ["5"]),
    ("[\\d-z]", ["5", "-", "z"], ["a"]),  # after a class escape '-' is itself
    ("[a-c-e]", ["b", "-", "e"], ["d"]),
    ("x\\sy", ["x y", "x\ty"], ["x\x0by"]),  # RE2's \s has no vertical tab
    ("bar$", ["bar"], ["bar\n"]),  # RE2's '$' is the end of the text
])
def test_read_as_re2_reads_it(text: str, matches: list[str], misses: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # re's FutureWarning: it would read the text another way one day
        pattern = re2_compile(re2_text(text))
    for value in matches:
        assert pattern.fullmatch(value), value
    for value in misses:
        assert not pattern.fullmatch(value), value


@pytest.mark.parametrize("text", [
    "(?i)dev",  # RE2 folds Unicode case, re with re.ASCII only ASCII
    "(?=a)a", "(?!a)b", "(?<=a)b",  # look-arounds: RE2 refuses
    "(?>a)", "(?P=n)", "a*+", "a++", "a?+", "a{2}+",  # atomic, backreference, possessive: re only
    "a\\1", "\\0", "a\\Z", "\\u0041", "\\N{DIGIT ONE}",  # re-only escapes
    "\\x{41}", "\\pN", "\\Qa\\E", "\\C",  # RE2-only escapes
    "a{1001}", "a{1,2000}",  # RE2's repeat limit
    "a)(b", "(a", "a|b)",  # istiod's text around it would read otherwise
    "[[:foo:]]", "[[:^alpha:]]", "[\\b]", "a\\",
    "[a--]", "[a-\\d]", "[\\S]",  # a range down, a range to a class: RE2 refuses; no \S in a class
])
def test_refused_where_the_two_would_differ(text: str) -> None:
    with pytest.raises(re.error):
        re2_compile(re2_text(text))


def test_namespace_and_service_account_patterns_read_as_istiod_builds_them() -> None:
    ns = namespace_regex(["dev{,2}", "prod-*"])
    assert ns.fullmatch("spiffe://cluster.local/ns/dev{,2}/sa/x")
    assert ns.fullmatch("spiffe://cluster.local/ns/prod-eu/sa/x")
    assert not ns.fullmatch("spiffe://cluster.local/ns/dev/sa/x")
    sa = service_account_regex(["bot{,1}"], "foo")
    assert sa.fullmatch("spiffe://cluster.local/ns/foo/sa/bot{,1}")
    assert not sa.fullmatch("spiffe://cluster.local/ns/foo/sa/bo")


@pytest.mark.parametrize("suffix", ["+evil", "*evil", "{2}x"])
def test_a_suffix_pasted_after_a_repetition_cannot_start_with_one(suffix: str) -> None:
    """istiod writes `*<suffix>` principals as `spiffe://.*<suffix>`: `.*+evil` is RE2's error
    and Python's possessive `.*+`, which never matched, so a DENY on `*+evil` loaded and
    never fired."""
    with pytest.raises(re.error):
        re2_compile(re2_text(suffix, after_repeat=True))
