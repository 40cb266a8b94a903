"""Request paths: the form the proxy forwards, the other forms an upstream may read, templates.

Istio matches a path as the sidecar forwards it, and what the sidecar does to a path is
the mesh's ``pathNormalization`` (default ``BASE``: RFC 3986 dot segments removed, unreserved
``%XX`` decoded, ``\\`` taken as ``/``; repeated slashes and ``%2F`` kept). That form is the
*proxy form*: ALLOW rules are matched against it exactly as Istio's RBAC filter would.

An upstream may read the same bytes more aggressively (merge ``//``, decode ``%2F``, drop
``;params``, resolve dot segments the proxy left alone). Each such form is a *reading*. A DENY
rule matches when any reading matches and an ALLOW rule only when every reading matches, so
no spelling of a path slips past a DENY or into an ALLOW that covers another resource.

What no reading can settle is refused with a reason: a fragment, control characters and
NUL (encoded or not), malformed or doubled percent-encoding, invalid UTF-8 (overlong forms
included), ``..;``-style segments, and characters that NFKC folds into separators or dots
(fullwidth ``．`` and ``／``).
"""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass


class Normalization(enum.StrEnum):
    """Istio meshConfig ``pathNormalization``: what the proxy in front of authz does to paths."""

    NONE = "NONE"
    BASE = "BASE"
    MERGE_SLASHES = "MERGE_SLASHES"
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"


class PathError(ValueError):
    """The path is ambiguous or malformed; the message is the reason given to the client."""


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    path: str  # as the proxy forwards it, without query
    query: str  # raw query string, without '?'
    readings: tuple[str, ...] = ()  # other forms an upstream may read; empty for ordinary paths


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SEPARATOR_ESCAPE = re.compile(r"%(2[Ff]|5[Cc])")
# What an upstream may decode into structure: '/', '\' and the ';' that starts parameters.
_STRUCTURE_ESCAPE = re.compile(r"%(2[Ff]|5[Cc]|3[Bb])")
_PARAMS = re.compile(r";[^/]*")
# A path with none of these reads the same to every parser: no work beyond the split.
_NEEDS_WORK = re.compile(r"[%\\#; \x00-\x1f\x7f]|/\.|//|\.(?=/|$)|::")
# Characters whose NFKC form would change the structure an upstream sees.
_STRUCTURAL = "/.\\%?#;"
MAX_READINGS = 32
# Characters Windows' best-fit conversion to an ANSI code page turns into '/' or '\\' (DEVCORE,
# "WorstFit"): no NFKC form says so, and an upstream on Windows would see other segments.
# '¥' and '₩' are '\\' (0x5C) in the Japanese and Korean code pages (cp932, cp949).
_BEST_FIT_SEPARATORS = frozenset("\u2215\u2216\u2044\u29f5\u29f8\u29f9\u00a5\u20a9")
# Letters best-fit conversion (cp1252) and Java's equalsIgnoreCase (a case-insensitive Spring
# route) read as ASCII though NFKC keeps them: dotless 'ı' and dotted 'İ'. ('ſ' and Kelvin
# 'K' NFKC folds to 's' and 'K'.)
_ASCII_LOOKALIKES = str.maketrans({"\u0131": "i", "\u0130": "I"})
_NTFS_STREAM = re.compile(r"::\$[A-Za-z_]*")
# C1 controls and the Unicode line and paragraph separators: line breaks to some parsers.
_NON_ASCII_CONTROL = re.compile("[\x80-\x9f\u2028\u2029]")
MAX_FORMS = 128  # intermediate forms followed to find the readings


def normalize(raw: str, mode: Normalization = Normalization.BASE) -> NormalizedPath:
    path, _, query = raw.partition("?")
    if path.startswith("/") and path.isascii() and not _NEEDS_WORK.search(path) and "#" not in query:
        return NormalizedPath(path, query)
    return _normalize_slow(raw, mode)


def _normalize_slow(raw: str, mode: Normalization) -> NormalizedPath:
    if "#" in raw:
        raise PathError("path contains a fragment")
    path, _, query = raw.partition("?")
    if not path:
        raise PathError("empty path")
    _refuse_unreadable(path)
    if not path.startswith("/"):
        # Envoy sends none (it rejects them, or turns an absolute URL into host and path);
        # read as rooted, `http://evil/admin` would slip past a DENY on `/admin`.
        raise PathError("path does not start with '/'")
    if mode is Normalization.NONE:
        forwarded = path
    else:
        if mode is Normalization.DECODE_AND_MERGE_SLASHES:
            path = _decode_separators(path)
        forwarded = _rfc3986(path)
        if mode is not Normalization.BASE:
            forwarded = _merge_slashes(forwarded)
    return NormalizedPath(forwarded, query, _readings(forwarded))


def _refuse_unreadable(path: str) -> None:
    if _BAD_ESCAPE.search(path):
        raise PathError("path contains a malformed percent-escape")
    decoded = _decode_all(path)
    if "\x00" in decoded:
        raise PathError("path contains an encoded NUL")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded) or (
            not decoded.isascii() and _NON_ASCII_CONTROL.search(decoded)):
        raise PathError("path contains a control character")
    if _ESCAPE.search(decoded):
        raise PathError("path is percent-encoded more than once")
    if not decoded.isascii():
        folded = unicodedata.normalize("NFKC", decoded)
        if not (_BEST_FIT_SEPARATORS.isdisjoint(decoded) and _BEST_FIT_SEPARATORS.isdisjoint(folded)):
            raise PathError("path contains characters that Windows' best-fit conversion makes separators")
        if any(decoded.count(c) != folded.count(c) for c in _STRUCTURAL):
            # Fullwidth '．' or '／' become '.' and '/' in servers that NFKC-normalise: the
            # upstream would see other segments than the ones we matched.
            raise PathError("path contains characters that normalise to separators or dots")
    for seg in decoded.replace("\\", "/").split("/"):
        base = seg.split(";", 1)[0]
        if seg != base and base in (".", ".."):
            raise PathError("path contains a dot segment with parameters")


def _decode_all(path: str) -> str:
    if "%" not in path:
        return path
    out = bytearray()
    i = 0
    while i < len(path):
        if path[i] == "%":
            out.append(int(path[i + 1:i + 3], 16))
            i += 3
        else:
            out.extend(path[i].encode("utf-8"))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("path is not valid UTF-8 after decoding") from None


def _decode_unreserved(path: str) -> str:
    if "%" not in path:
        return path

    def one(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else m.group(0)

    return _ESCAPE.sub(one, path)


def canonical_pattern(value: str) -> str:
    """A policy path in the proxy's spelling: unreserved ``%XX`` decoded, other escapes kept.

    Only for matchers where matching more is stricter: Envoy decodes unreserved escapes in
    every request, so in Istio a policy path that keeps one matches nothing.
    """
    return _decode_unreserved(value)


def _decode_separators(path: str) -> str:
    return _SEPARATOR_ESCAPE.sub(lambda m: "/" if m.group(1) in ("2F", "2f") else "\\", path)


_QUERY_ESCAPE = re.compile(r"%(?:3[Ff]|23)")


def _cut_at_encoded_query(path: str) -> str:
    """``path`` up to an encoded ``?`` or ``#``: where an upstream that decodes first (Apache's
    mod_rewrite confusion, CVE-2024-38474; decode-then-parse routers) ends the path."""
    m = _QUERY_ESCAPE.search(path)
    return path[:m.start()] or "/" if m else path


def _decode_structure(path: str) -> str:
    return _STRUCTURE_ESCAPE.sub(lambda m: {"2": "/", "5": "\\", "3": ";"}[m.group(1)[0]], path)


def _rfc3986(path: str) -> str:
    """Envoy's ``normalize_path``: '\\' is '/', unreserved escapes decoded, dot segments removed."""
    return _remove_dot_segments(_decode_unreserved(path.replace("\\", "/")))


def _merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 5.2.4 over whole segments; empty segments are kept ('//' is not merged), so
    # '/admin//../x' is '/admin/x', as Envoy forwards it.
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


def _windows_trim(path: str) -> str:
    """``path`` as Windows reads its segments: trailing dots and spaces (also `%2e`, `%20`)
    dropped and an NTFS stream suffix cut (`admin.`, `admin%20` and `admin::$DATA` are
    `admin`). A segment of dots alone keeps them. Linear: a run of `%20` thousands long costs
    no more than reading it (a regex would backtrack over it from every position)."""
    parts = path.split("/")
    for k, seg in enumerate(parts):
        stream = seg.find("::$")
        if stream > 0 and _NTFS_STREAM.fullmatch(seg, stream):
            seg = seg[:stream]
        end = len(seg)
        while end:
            if seg[end - 1] in ". ":
                end -= 1
            elif end >= 3 and seg[end - 3] == "%" and seg[end - 2:end].lower() in ("2e", "20"):
                end -= 3
            else:
                break
        if seg[:end].strip("."):  # something other than dots stays: trim to it
            parts[k] = seg[:end]
        elif stream > 0:
            parts[k] = seg
    return "/".join(parts)


_NON_ASCII_ESCAPES = re.compile(r"(?:%[89A-Fa-f][0-9A-Fa-f])+")
MAX_FOLD_GROWTH = 2  # NFKC makes U+FDFA 18 characters: a path folded longer than this is refused


def _compatibility_fold(path: str) -> str:
    """``path`` with its non-ASCII text NFKC-folded (fullwidth ``ａdmin`` is ``admin``, ``e``
    and a combining acute one ``é``): how Windows' best-fit conversion to an ANSI code page,
    and servers that NFKC-normalise, read it. Folded whole, so a combining mark composes with
    the letter before it; what stays non-ASCII is percent-encoded if the path encoded any.
    The caller has refused paths whose folding would make separators, dots or escapes."""
    if path.isascii() and "%" not in path:
        return path
    encoded = _NON_ASCII_ESCAPES.search(path) is not None
    text = _NON_ASCII_ESCAPES.sub(lambda m: _decode_all(m.group(0)), path) if encoded else path
    if text.isascii():
        return path
    folded = unicodedata.normalize("NFKC", text).translate(_ASCII_LOOKALIKES)
    if folded == text:
        return path
    if len(folded) > MAX_FOLD_GROWTH * len(text):
        raise PathError("path has characters whose compatibility forms are too long to decide safely")
    if not encoded:
        return folded
    return "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in folded)


def _readings(forwarded: str) -> tuple[str, ...]:
    """Every other form of the forwarded path an upstream may act on.

    Upstreams merge slashes, decode separators, read '\\' as '/', drop parameters, drop a
    segment's trailing dots and spaces (Windows), end the path at an encoded `?` or `#`
    (decode-then-parse upstreams), fold compatibility characters (fullwidth
    letters: Windows' best-fit conversion, NFKC) and resolve dot segments in different
    orders: decoding `%2F` and merging `//` before
    resolving `..` climbs further than resolving first. So every order is followed (the
    closure of those steps), and each form reached is read as an upstream that resolves dot
    segments last would.
    """
    if forwarded.isascii() and not _NEEDS_WORK.search(forwarded):
        return ()
    # Folded once, up front: folding every form again would multiply the forms (and each may
    # have grown); the closure starts from the path as forwarded and as folded.
    folded = _compatibility_fold(forwarded)
    forms = {forwarded, folded}
    todo = [forwarded] if folded == forwarded else [forwarded, folded]
    readings: set[str] = set()
    while todo:
        p = todo.pop()
        readings.add(_rfc3986(p))
        for q in (_rfc3986(p), _merge_slashes(p), _decode_structure(p), _PARAMS.sub("", p),
                  p.replace("\\", "/"), _windows_trim(p), _cut_at_encoded_query(p)):
            if q not in forms:
                if len(forms) > MAX_FORMS:
                    raise PathError("path has too many readings to decide safely")
                forms.add(q)
                todo.append(q)
    readings.discard(forwarded)
    if len(readings) > MAX_READINGS:
        raise PathError("path has too many readings to decide safely")
    return tuple(sorted(readings))


# --- templates ----------------------------------------------------------------------

_VAR = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Envoy's URI template matcher (envoy.path.match.uri_template): a segment is one or more
# RFC 3986 pchars (unreserved, %XX, sub-delims, ':' and '@'; measured against Envoy 1.40:
# '*' and '=' match too, '[' and ']' do not); '{**}' is any run of them and '/', possibly empty.
SEGMENT_CHARS = r"A-Za-z0-9\-._~%!$&'()*+,;=:@"
_SEGMENT = f"[{SEGMENT_CHARS}]+"
_REST = f"[{SEGMENT_CHARS}/]*"


class TemplateError(ValueError):
    """A path template is invalid; the message says why."""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """``/v1/tenants/{tenant}/orders/{**}`` compiled to one anchored regex.

    ``{*}`` and ``{name}`` match exactly one non-empty segment of URI path characters,
    ``{**}`` any run of segments (zero or more, '/' included) and may only be followed by
    literal text, as in Envoy's URI template matcher that Istio generates. Literal text
    matches itself.
    """

    source: str
    regex: re.Pattern[str]
    captures: tuple[str, ...]

    def match(self, path: str, original: str | None = None) -> dict[str, str] | None:
        """The captures, or None. ``original``: ``path`` is its case-folded reading (same
        length, fold_case), and the captures are taken from it, in their own case."""
        m = self.regex.match(path)
        if m is None:
            return None
        if not self.captures:
            return {}
        if original is None:
            return m.groupdict()
        return {name: original[m.start(name):m.end(name)] for name in self.captures}


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_case(path: str) -> str:
    """``path`` with its ASCII letters lower-cased: how a case-insensitive upstream (Express's
    and ASP.NET Core's routers by default, IIS) compares paths. Other letters stay: their
    lower case may change the length or the characters a template accepts."""
    return path.lower() if path.isascii() else path.translate(_ASCII_LOWER)


def is_template(pattern: str) -> bool:
    return "{" in pattern or "}" in pattern


def compile_template(pattern: str, decode: bool = False) -> PathTemplate:
    """``decode``: take ``%7E`` in literal text as ``~`` (see canonical_pattern)."""
    if not pattern.startswith("/"):
        raise TemplateError("a path template must start with '/'")
    if decode:
        pattern = canonical_pattern(pattern)
    parts: list[str] = []
    captures: list[str] = []
    pos = 0
    seen_rest = False
    for m in _VAR.finditer(pattern):
        literal = pattern[pos:m.start()]
        if "{" in literal or "}" in literal:
            raise TemplateError("unbalanced '{' or '}'")
        if seen_rest:
            raise TemplateError("no operator may follow '{**}'")
        parts.append(re.escape(literal))
        name = m.group(1)
        if not literal.endswith("/") or (m.end() < len(pattern) and pattern[m.end()] != "/"):
            raise TemplateError(f"'{{{name}}}' must span a whole path segment")
        if name == "*":
            parts.append(_SEGMENT)
        elif name == "**":
            parts.append(_REST)
            seen_rest = True
        elif _NAME.match(name):
            if name in captures:
                raise TemplateError(f"capture '{{{name}}}' is used twice")
            captures.append(name)
            parts.append(f"(?P<{name}>{_SEGMENT})")
        else:
            raise TemplateError(
                f"'{{{name}}}' is not a template operator: use {{*}}, {{**}} or {{name}}"
            )
        pos = m.end()
    tail = pattern[pos:]
    if "{" in tail or "}" in tail:
        raise TemplateError("unbalanced '{' or '}'")
    parts.append(re.escape(tail))
    return PathTemplate(pattern, re.compile("".join(parts) + r"\Z"), tuple(captures))
