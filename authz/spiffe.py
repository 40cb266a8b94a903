"""SPIFFE IDs: parsing, trust domains and their aliases, as Istio treats them.

A principal arrives from Envoy as the URI SAN of the client certificate
(``spiffe://<trust-domain>/<path>``) and is compared as received: the caller is never
rewritten. Trust-domain aliases work the way istiod applies them, on the *policy* side: a
policy principal ``td/ns/x/sa/y`` whose trust domain is the bundle's, an alias, or
``cluster.local`` (a pointer to the local trust domain) stands for the same identity in
every trust domain of the bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCHEME = "spiffe://"
LOCAL_POINTER = "cluster.local"


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # begins with '/', or is empty

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def after(self, key: str) -> str:
        """The segment that follows ``key`` (``ns`` -> namespace), or ''."""
        segs = self.segments
        for i in range(0, len(segs) - 1):
            if segs[i] == key:
                return segs[i + 1]
        return ""

    @property
    def namespace(self) -> str:
        return self.after("ns")

    @property
    def service_account(self) -> str:
        return self.after("sa")


def parse(value: str) -> SpiffeId | None:
    """Split ``spiffe://td/path``; None for anything else.

    Deliberately lenient about the characters of the path (Istio accepts non-strict IDs
    such as ``spiffe://td/ns/a[1]/sa/b:c``): matching never depends on this parse, only the
    attributes derived from it (namespace, tenant segments) do.
    """
    if not value.startswith(SCHEME):
        return None
    td, sep, path = value[len(SCHEME):].partition("/")
    if not td or any(c.isspace() for c in td):
        return None
    return SpiffeId(td, sep + path)


def _prefix_match(a: str, pattern: str) -> bool:
    return pattern.endswith("*") and a.startswith(pattern[:-1])


def _suffix_match(a: str, pattern: str) -> bool:
    return pattern.startswith("*") and a.endswith(pattern[1:])


def _td_match(a: str, b: str) -> bool:
    """istiod's trust-domain stringMatch: equal, or either side a prefix or suffix pattern of the other."""
    return a == b or _prefix_match(a, b) or _prefix_match(b, a) or _suffix_match(a, b) or _suffix_match(b, a)


def trust_domain_of(principal: str) -> str:
    """The trust-domain part of a principal, or '' when it is not a SPIFFE URI with a path.

    istiod matches ``trustDomains`` as the prefix ``spiffe://<td>/`` (or a regex ending in
    ``/.*``), so ``spiffe://cluster.local`` is in no trust domain: neither allowed by
    ``trustDomains: [cluster.local]`` nor exempted by ``notTrustDomains``.
    """
    if not principal.startswith(SCHEME):
        return ""
    td, slash, _ = principal[len(SCHEME):].partition("/")
    return td if slash else ""


def strip_scheme(value: str) -> str:
    return value[len(SCHEME):] if value.startswith(SCHEME) else value


@dataclass(frozen=True, slots=True)
class TrustDomains:
    """The bundle's trust domain and the aliases that name the same domain."""

    primary: str
    aliases: frozenset[str] = frozenset()
    # A mesh has few distinct callers; parsing each once keeps it off the hot path.
    _parsed: dict[str, SpiffeId | None] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def all(self) -> tuple[str, ...]:
        return (self.primary, *sorted(self.aliases))

    def known(self, td: str) -> bool:
        return td == self.primary or td in self.aliases

    def canonical(self, principal: str) -> str:
        """Full-URI form of a principal (pattern), an alias named by the trust domain.

        For tools that reason about bundles (lint, import); matching never rewrites.
        """
        if principal.startswith("*"):
            return principal
        td, sep, path = strip_scheme(principal).partition("/")
        if td in self.aliases:
            td = self.primary
        return f"{SCHEME}{td}{sep}{path}"

    def expand_principal(self, value: str) -> list[str]:
        """istiod's ReplaceTrustDomainAliases for one policy principal (scheme removed).

        Only a 5-part ``td/ns/x/sa/y`` whose trust domain is not ``*`` is expanded, and only
        when that trust domain matches the bundle's or an alias (either side may be a
        ``prefix*`` / ``*suffix`` pattern) or is ``cluster.local``. Each trust domain of the
        bundle then gets the principal with its own name, except one that a ``*suffix``
        trust domain already covers: there the principal stays as written.
        """
        value = strip_scheme(value)
        parts = value.split("/")
        if len(parts) != 5 or parts[0] == "*":
            return [value]
        td = parts[0]
        if not (td == LOCAL_POINTER or any(_td_match(td, d) for d in self.all)):
            return [value]
        out: list[str] = []
        for domain in self.all:
            candidate = value if _suffix_match(domain, td) else "/".join([domain, *parts[1:]])
            if candidate not in out:
                out.append(candidate)
        return out

    def expand_trust_domains(self, values: list[str]) -> list[str]:
        """istiod's ExpandTrustDomainAliases: a known trust domain stands for all of them."""
        out: list[str] = []
        for v in values:
            for d in (self.all if self.known(v) else (v,)):
                if d not in out:
                    out.append(d)
        return out

    def caller_forms(self, principal: str) -> list[str]:
        """A tenant's caller in full-URI form, expanded like a policy principal."""
        return [SCHEME + p for p in self.expand_principal(principal)]

    def resolve(self, principal: str) -> tuple[str, SpiffeId | None]:
        """(principal as received, its SPIFFE parse); non-SPIFFE values stay verbatim."""
        try:
            return principal, self._parsed[principal]
        except KeyError:
            pass
        sid = parse(principal)
        if len(self._parsed) >= 10_000:
            self._parsed.clear()
        self._parsed[principal] = sid
        return principal, sid


def namespace_regex(values: list[str], escaped: bool = False) -> re.Pattern[str]:
    """Istio's ``.*/ns/<ns>/.*`` over the whole principal; '*' in a value is '.*'."""
    return re2_compile("|".join(f".*/ns/{_istio_regex(v, True, escaped)}/.*" for v in values))


def service_account_regex(values: list[str], namespace: str, escaped: bool = False) -> re.Pattern[str]:
    """Istio's ``spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?``; a bare name is in ``namespace``."""
    alts = []
    for v in values:
        ns, sep, sa = v.partition("/")
        if not sep:
            ns, sa = namespace, v
        alts.append(f"spiffe://.+/ns/{_istio_regex(ns, False, escaped)}/(.+/|)sa/{_istio_regex(sa, False, escaped)}(/.+)?")
    return re2_compile("|".join(alts))


def _istio_regex(value: str, star: bool = False, escaped: bool = False) -> str:
    # Older istiod pastes the value into an RE2 pattern unescaped ('.' is any character, '[1]'
    # a class), so the same text is a pattern here too; a value that is no valid pattern fails
    # to compile (a load error). Patched istiod (CVE-2026-39350) escapes it (``escaped``).
    if escaped:
        return ".*".join(re.escape(part) for part in value.split("*")) if star else re.escape(value)
    return re2_text(value.replace("*", ".*") if star else value)


# --- RE2 text read by Python's re ---------------------------------------------------------
# Patterns istiod builds from policy text run in Envoy's RE2. Python's re reads most of that
# text the same way; where it would not, the text is translated, or refused (re.error) when
# RE2 would refuse it too or no translation is sure. Compiled with re.ASCII, as RE2 reads
# \d, \w, \s and \b (Python's str patterns would take any Unicode digit or letter).

def re2_compile(pattern: str) -> re.Pattern[str]:
    """A whole pattern made of ``re2_text`` pieces (and text of our own), compiled."""
    return re.compile(pattern, re.ASCII)


# RE2's POSIX classes, as the ranges Python's re reads the same way.
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7f", "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\v\\f\\r ", "upper": "A-Z", "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_POSIX_CLASS = re.compile(r"\[:(\^?)(\w+):\]")
_REPEAT = re.compile(r"\{([0-9]*)(,?)([0-9]*)\}")
_RE2_MAX_REPEAT = 1000
# Escapes both read alike (with re.ASCII): punctuation, classes, anchors, controls, \xHH.
_SAME_ESCAPES = frozenset("dDwWbBAfnrtv")
_RE2_SPACE = "\\t\\n\\f\\r "  # RE2's \s, inside a class


def re2_text(pattern: str, after_repeat: bool = False) -> str:
    """``pattern``, RE2 syntax, as Python's re must be given it to read it as Envoy's RE2
    does. Translated: POSIX classes (`[[:digit:]]`, a set and a literal `]` to re), `x{,n}`
    (literal text to RE2, a repetition to re), `\\z`. Refused (re.error): what RE2 refuses
    or reads otherwise and has no sure translation: `(?` groups but `(?:` and `(?P<name>`
    (flags, look-arounds, atomic groups), backreferences and octal escapes, `\\Z`, `\\u`,
    possessive quantifiers (`a*+`), repeat counts over 1000, unbalanced parentheses (istiod's
    text around them would read otherwise), any other `[:`. ``after_repeat``: the pattern is
    pasted right after a repetition (a `*suffix` principal after `.*`): a leading `+` or `*`
    would be re's possessive form or RE2's error."""
    out: list[str] = []
    i, n = 0, len(pattern)
    quantified = after_repeat  # the last item was a quantifier: a '+' now is re's possessive form
    depth = 0  # open groups: istiod's text around ours must not close one of them
    while i < n:
        c = pattern[i]
        if c == "\\":
            out.append(_escape(pattern, i))
            i += 2 if pattern[i + 1:i + 2] != "x" else 4
            quantified = False
        elif c == "$":  # RE2's end of text; re's '$' also matches before a last '\n'
            out.append("\\Z")
            i += 1
            quantified = False
        elif c == "[":
            text, i = _char_class(pattern, i)
            out.append(text)
            quantified = False
        elif c == "(" and pattern.startswith("(?", i):
            if not (pattern.startswith("(?:", i) or pattern.startswith("(?P<", i)):
                raise re.error(f"{pattern!r}: RE2 and Python read '(?' groups other than '(?:' and "
                               "'(?P<name>' differently (flags, look-arounds)")
            out.append(pattern[i:i + 3])
            i += 3
            depth += 1
            quantified = False
        elif c in "()":
            depth += 1 if c == "(" else -1
            if depth < 0:
                raise re.error(f"{pattern!r}: a ')' that closes no group")
            out.append(c)
            i += 1
            quantified = False
        elif c == "{":
            m = _REPEAT.match(pattern, i)
            if m is None:
                out.append("\\{")  # a literal to both
                i += 1
                quantified = False
                continue
            low, comma, high = m.groups()
            if not low:  # '{,n}' and '{}': literal text to RE2, a repetition (or error) to re
                out.append("\\{" + pattern[i + 1:m.end()])
                i = m.end()
                quantified = False
                continue
            if int(low) > _RE2_MAX_REPEAT or (high and int(high) > _RE2_MAX_REPEAT):
                raise re.error(f"{pattern!r}: RE2 refuses repeat counts over {_RE2_MAX_REPEAT}")
            if quantified:
                raise re.error(f"{pattern!r}: a repetition of a repetition")
            out.append(m.group(0))
            i = m.end()
            quantified = True
            if pattern.startswith("?", i):  # lazy: the same to both
                out.append("?")
                i += 1
        elif c in "*+?":
            if quantified:
                raise re.error(f"{pattern!r}: {pattern[i - 1:i + 1]!r} is a possessive quantifier to "
                               "Python, an error to RE2")
            out.append(c)
            i += 1
            quantified = True
            if pattern.startswith("?", i):
                out.append("?")
                i += 1
        else:
            out.append(c)
            i += 1
            quantified = False
    if depth:
        raise re.error(f"{pattern!r}: a '(' that is never closed")
    return "".join(out)


def _escape(pattern: str, i: int) -> str:
    """An escape outside a class, as re should read it."""
    nxt = pattern[i + 1:i + 2]
    if not nxt:
        raise re.error(f"{pattern!r}: a trailing backslash")
    if nxt == "x":
        return _hex_char(pattern, i)[0]
    if nxt == "z":
        return "\\Z"  # RE2's end of text is re's \Z
    if nxt == "s":  # RE2's \s has no \v; re's ASCII \s has
        return f"[{_RE2_SPACE}]"
    if nxt == "S":
        return f"[^{_RE2_SPACE}]"
    if nxt.isascii() and not nxt.isalnum():
        return pattern[i:i + 2]  # an escaped punctuation character: itself, to both
    if nxt in _SAME_ESCAPES:
        return pattern[i:i + 2]
    raise re.error(f"{pattern!r}: RE2 and Python read \\{nxt} differently (or one refuses it)")


def _hex_char(pattern: str, i: int) -> tuple[str, str]:
    """(re text, the character) of the \\xHH at ``i``."""
    hexa = pattern[i + 2:i + 4]
    if len(hexa) != 2 or any(h not in "0123456789abcdefABCDEF" for h in hexa):
        raise re.error(f"{pattern!r}: write \\x with two hex digits (RE2's \\x{{...}} is not read here)")
    return pattern[i:i + 4], chr(int(hexa, 16))


_CLASS_CONTROLS = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _class_char(pattern: str, j: int) -> tuple[str, int]:
    """One character of a class at ``j`` (plain or escaped, as RE2 reads it), and the index
    after it; re.error for an escape that is no single character (a class, \\b, ...)."""
    c = pattern[j]
    if c != "\\":
        return c, j + 1
    nxt = pattern[j + 1:j + 2]
    if nxt == "x":
        return _hex_char(pattern, j)[1], j + 4
    if nxt in _CLASS_CONTROLS:
        return _CLASS_CONTROLS[nxt], j + 2
    if nxt and nxt.isascii() and not nxt.isalnum():
        return nxt, j + 2
    raise re.error(f"{pattern!r}: \\{nxt} is no character where a class needs one")


def _lit(ch: str) -> str:
    """``ch`` spelt for the inside of an re class: ASCII other than letters and digits as
    \\xHH, so that none of re's class syntax ('-', ']', '^', '[', '&&', '~~') applies."""
    return ch if ch.isalnum() or ord(ch) > 0x7F else f"\\x{ord(ch):02x}"


def _char_class(pattern: str, i: int) -> tuple[str, int]:
    """The class opening at ``i`` as re should read it, and the index after it.

    Read item by item as RE2 reads it: a ']' first or a '-' first or last is itself; a
    character followed by '-' and anything but ']' starts a range whose end is the next
    character, whatever it is ('[%-[:alpha:]]' is '%'..'[' and ':alpha:', then a ']' outside);
    a '-' after a class escape or a range is itself."""
    out = ["["]
    j = i + 1
    if pattern.startswith("^", j):
        out.append("^")
        j += 1
    first = True
    while True:
        if j >= len(pattern):
            raise re.error(f"{pattern!r}: a '[' that is never closed")
        c = pattern[j]
        if c == "]" and not first:
            out.append("]")
            return "".join(out), j + 1
        first = False
        if c == "[" and pattern.startswith("[:", j):
            m = _POSIX_CLASS.match(pattern, j)
            if m is None or m.group(2) not in _POSIX_CLASSES or m.group(1):
                raise re.error(f"{pattern!r} has a '[:' that is no POSIX class read here")
            out.append(_POSIX_CLASSES[m.group(2)])
            j = m.end()
            continue
        if c == "\\" and pattern[j + 1:j + 2] in ("d", "D", "w", "W"):
            out.append(pattern[j:j + 2])
            j += 2
            continue
        if c == "\\" and pattern[j + 1:j + 2] == "s":
            out.append(_RE2_SPACE)
            j += 2
            continue
        lo, j = _class_char(pattern, j)
        if pattern.startswith("-", j) and pattern[j + 1:j + 2] not in ("", "]"):
            hi, j = _class_char(pattern, j + 1)
            if hi < lo:
                raise re.error(f"{pattern!r}: a range from {lo!r} down to {hi!r}")
            out.append(f"{_lit(lo)}-{_lit(hi)}")
        else:
            out.append(_lit(lo))
