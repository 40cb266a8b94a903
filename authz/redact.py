"""What may be shown of a request, a URL, a path or an error in logs, metrics, status, audit
records and explain output.

The values of the credential headers in ``NEVER_LOGGED`` are never shown, only their length.
An authority is shown without its user info (``***@host``), a URL likewise
(``https://***@host/...``) and with every query value replaced (presigned URLs carry their
signature there). A CEL error is shown with the values it echoes replaced (map keys, patterns:
they come from requests). File system paths are replaced by the label an operator configured
them as (``<bundle directory>``), unless ``--status-show-paths`` asks for them.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

REDACTED = "REDACTED"

# Request headers whose values are credentials (docs/audit.md, "Never logged"), lower case.
NEVER_LOGGED = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie",
    "x-api-key", "api-key", "x-goog-api-key",
    "x-auth-token", "x-access-token", "x-amz-security-token", "x-vault-token",
    "x-csrf-token", "x-xsrf-token",
})
# A header name (or an expression) that speaks of a credential: authz lint warns of an
# upstream header so named, and a bundle test's failure shows such a header's value by length.
SECRET_WORDS = re.compile(
    r"auth(?!z)|cookie|token|secret|passw(?:or)?d|api[-_]?key|credential|session|private[-_]?key",
    re.IGNORECASE)
# Headers holding the authority, which may carry user info (user:password@host).
_AUTHORITY_HEADERS = frozenset({"host", ":authority"})
# Headers holding a URL or a path, whose query may carry a token (`?access_token=`): shown
# with every query value replaced, as redact_url shows a URL.
_URL_HEADERS = frozenset({":path", "referer", "x-envoy-original-path", "x-original-url", "x-original-uri",
                          "x-forwarded-uri", "x-rewrite-url", "location", "content-location"})
# A path parameter's value (`;jsessionid=...`): servlet containers carry the session there.
_PARAM_VALUE = re.compile(r";([^/;=]*)=[^/;]*")

MAX_ERROR_TEXT = 256
# A quoted literal with its escapes; one left open (cut short) runs to the end of the text.
_QUOTED = re.compile(r""""(?:[^"\\]|\\.?)*"?|'(?:[^'\\]|\\.?)*'?""", re.DOTALL)
# The runtime's messages that echo a value without quotes: a map key that is not a string,
# the part of a regular expression RE2 could not parse.
_UNQUOTED_ECHO = re.compile(r"(Key not found in map : |invalid regular expression: [^:]*: ).+", re.DOTALL)


def redacted(value: str) -> str:
    """A credential as it may be shown: its length tells whether it was sent, and no more."""
    return f"<redacted, {len(value)} characters>"


def redact_authority(authority: str) -> str:
    """``authority`` with the user info before its last ``@`` replaced by ``***``: it says
    why the host did not match, and that credentials were sent."""
    return "***@" + authority.rpartition("@")[2] if "@" in authority else authority


def credential_pattern(pattern: str) -> str:
    """A bundle's pattern for a credential header as it may be shown: a break-glass token
    written into a rule is as secret as the one a request sends. `*` (present) says nothing."""
    return pattern if pattern == "*" else redacted(pattern)


_HEADER_KEY = re.compile(r"""request\.headers\s*\[\s*(['"])([^'"\\]*)\1\s*\]""")


def condition_text(source: str) -> str:
    """A CEL condition as it may be shown. One that may compare a credential header has every
    string literal but its plain header names replaced by ``"…"``
    (`request.headers["x-api-key"] == "…"`; names are no secrets): one naming a credential
    header, or reading
    headers by a name it computes or escapes (`'x-api-' + 'key'`, `'x-api\\x2dkey'`), or all
    of them (`request.headers.exists(...)`, `... in request.headers`)."""
    lowered = source.lower()
    names = {m.group(2).lower() for m in _HEADER_KEY.finditer(source)}
    indexed = len(_HEADER_KEY.findall(source))
    reads_any = ("request.headers" in source
                 and (source.count("request.headers") > indexed or "\\" in source))
    if not (reads_any or names & NEVER_LOGGED or any(name in lowered for name in NEVER_LOGGED)):
        return source
    keep = {f'"{n}"' for n in names | NEVER_LOGGED} | {f"'{n}'" for n in names | NEVER_LOGGED}

    def one(m: re.Match[str]) -> str:
        return m.group(0) if m.group(0).lower() in keep else '"…"'

    return _QUOTED.sub(one, source)


def header_value(name: str, value: str) -> str:
    """What may be shown of the value of request header ``name`` (lower case)."""
    if name in NEVER_LOGGED:
        return redacted(value)
    if name in _AUTHORITY_HEADERS:
        return redact_authority(value)
    if name in _URL_HEADERS:
        return redact_url(value)
    return value


def echo_free(error: BaseException | str) -> str:
    """An error's kind and message (CEL's, protobuf's JSON parser's) with every value it
    echoes replaced by ``"…"``, at most ``MAX_ERROR_TEXT`` characters (then ``…``): a map
    key, a header value or a pattern can be a secret."""
    text = _QUOTED.sub('"…"', _UNQUOTED_ECHO.sub(r'\1"…"', str(error)))
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"


def redact_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = redact_authority(parts.netloc)
    query = parts.query
    if query:
        # A key without '=' may be the token itself (`?AKIA...`): shown as REDACTED too.
        query = "&".join(f"{urllib.parse.quote(k)}={REDACTED}" if "=" in item else REDACTED
                         for item in query.split("&") if item
                         for k in (urllib.parse.unquote_plus(item.partition("=")[0]),)) or REDACTED
    path = _PARAM_VALUE.sub(lambda m: f";{m.group(1)}={REDACTED}", parts.path)
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, ""))


def hide_paths(value: T, hidden: Mapping[str, str]) -> T:
    """``value`` (a string, or dicts and lists of them) with each key of ``hidden`` replaced
    by its label, longest first so a directory does not leave its file names behind."""
    if not hidden:
        return value
    if isinstance(value, str):
        out: str = value
        for path in sorted(hidden, key=len, reverse=True):
            if path:
                out = out.replace(path, hidden[path])
        return out  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: hide_paths(v, hidden) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list):
        return [hide_paths(v, hidden) for v in value]  # type: ignore[return-value]
    return value
