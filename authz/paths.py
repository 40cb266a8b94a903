"""Request paths: normalisation as Envoy does it, and path templates.

Normalisation decodes percent-escapes once, removes dot segments and merges slashes
(Envoy's ``normalize_path`` plus ``merge_slashes``). Anything that would still let two
parsers disagree about which resource is meant is refused with a reason instead of
guessed at: encoded separators, NUL and control characters, a fragment, a leftover
escape after the one decoding, and ``..;``-style segments that servlet containers fold.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_LEFTOVER_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# Percent-escapes that would turn into a separator or terminator after decoding.
_FORBIDDEN_DECODED = {"/", "\\", "\x00"}


class PathError(ValueError):
    """The path is ambiguous or malformed; the message is the reason given to the client."""


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    path: str  # decoded, normalised, without query
    query: str  # raw query string, without '?'


# Paths with none of these need no decoding or dot-segment work (the common case).
_NEEDS_WORK = re.compile(r"[%\\#\x00-\x1f\x7f]|/\.|//")


def normalize(raw: str) -> NormalizedPath:
    path, _, query = raw.partition("?")
    if path.startswith("/") and not _NEEDS_WORK.search(path) and "#" not in query:
        return NormalizedPath(path, query)
    return _normalize_slow(raw)


def _normalize_slow(raw: str) -> NormalizedPath:
    if not raw:
        raise PathError("empty path")
    if "#" in raw:
        raise PathError("path contains a fragment")
    path, _, query = raw.partition("?")
    if not path:
        raise PathError("empty path")
    # As Envoy's canonicaliser does: a relative path is taken from the root, and a literal
    # backslash is a separator (an encoded one stays refused below).
    path = "/" + path.replace("\\", "/") if not path.startswith("/") else path.replace("\\", "/")
    decoded = _decode_once(path)
    if _LEFTOVER_ESCAPE.search(decoded):
        raise PathError("path is percent-encoded more than once")
    for ch in decoded:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise PathError("path contains a control character")
    if not decoded.isascii() and _compat_structure(decoded) != _compat_structure(
        unicodedata.normalize("NFKC", decoded)
    ):
        # Fullwidth '．' or '／' become '.' and '/' in servers that NFKC-normalise: the
        # upstream would see other segments than the ones we matched.
        raise PathError("path contains characters that normalise to separators or dots")
    return NormalizedPath(_remove_dot_segments(decoded), query)


def _compat_structure(path: str) -> tuple[int, int, int, int]:
    return (path.count("/"), path.count("."), path.count("\\"), path.count("%"))


def _decode_once(path: str) -> str:
    if "%" not in path:
        return path
    raw = bytearray()
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch == "%":
            m = _ESCAPE.match(path, i)
            if m is None:
                raise PathError("path contains a malformed percent-escape")
            byte = int(m.group(1), 16)
            if chr(byte) in _FORBIDDEN_DECODED:
                raise PathError("path contains an encoded '/', '\\' or NUL")
            raw.append(byte)
            i += 3
        else:
            raw.extend(ch.encode("utf-8"))
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("path is not valid UTF-8 after decoding") from None


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")[1:]
    trailing = False
    for seg in segments:
        trailing = False
        if seg == "":
            trailing = True  # merged slash; remembers a trailing '/'
            continue
        base = seg.split(";", 1)[0]
        if seg != base and base in (".", ".."):
            raise PathError("path contains a dot segment with parameters")
        if seg == ".":
            trailing = True
            continue
        if seg == "..":
            if out:
                out.pop()
            trailing = True
            continue
        out.append(seg)
    result = "/" + "/".join(out)
    if trailing and out:
        result += "/"
    return result


# --- templates ----------------------------------------------------------------------

_VAR = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TemplateError(ValueError):
    """A path template is invalid; the message says why."""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """``/v1/tenants/{tenant}/orders/{**}`` compiled to one anchored regex.

    ``{*}`` and ``{name}`` match exactly one non-empty segment, ``{**}`` one or more
    segments and must come last. Literal text matches itself.
    """

    source: str
    regex: re.Pattern[str]
    captures: tuple[str, ...]

    def match(self, path: str) -> dict[str, str] | None:
        m = self.regex.match(path)
        if m is None:
            return None
        return m.groupdict() if self.captures else {}


def is_template(pattern: str) -> bool:
    return "{" in pattern or "}" in pattern


def compile_template(pattern: str) -> PathTemplate:
    if not pattern.startswith("/"):
        raise TemplateError("a path template must start with '/'")
    parts: list[str] = []
    captures: list[str] = []
    pos = 0
    seen_rest = False
    for m in _VAR.finditer(pattern):
        literal = pattern[pos:m.start()]
        if "{" in literal or "}" in literal:
            raise TemplateError("unbalanced '{' or '}'")
        if seen_rest and (literal or m.start() != len(pattern)):
            raise TemplateError("'{**}' must be the last part of a template")
        parts.append(re.escape(literal))
        name = m.group(1)
        if not literal.endswith("/") or (m.end() < len(pattern) and pattern[m.end()] != "/"):
            raise TemplateError(f"'{{{name}}}' must span a whole path segment")
        if name == "*":
            parts.append(r"[^/]+")
        elif name == "**":
            parts.append(r"[^/]+(?:/[^/]+)*")
            seen_rest = True
        elif _NAME.match(name):
            if name in captures:
                raise TemplateError(f"capture '{{{name}}}' is used twice")
            captures.append(name)
            parts.append(f"(?P<{name}>[^/]+)")
        else:
            raise TemplateError(
                f"'{{{name}}}' is not a template operator: use {{*}}, {{**}} or {{name}}"
            )
        pos = m.end()
    tail = pattern[pos:]
    if "{" in tail or "}" in tail:
        raise TemplateError("unbalanced '{' or '}'")
    if seen_rest and tail:
        raise TemplateError("'{**}' must be the last part of a template")
    parts.append(re.escape(tail))
    return PathTemplate(pattern, re.compile("".join(parts) + r"\Z"), tuple(captures))
