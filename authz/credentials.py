"""Outbound credentials for bundle servers and audit collectors.

- A bearer token from a file (``--bundle-token-file``, ``--audit-token-file``), re-read when
  the file changes (a projected service-account token, a Vault agent sink). A file that
  turns unreadable or empty keeps the last good token and is logged once per state.
- ``user:pass@`` in a URL becomes HTTP Basic authentication; the URL used and shown from
  then on has no user info. A URL with both user info and a token file is refused.

Tokens and passwords only ever go into the ``Authorization`` header: never into a message,
a log line, a metric or status (see authz/redact.py for how URLs are shown).
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import urllib.parse
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from authz.certs import CredentialError
from authz.redact import redact_url

log = logging.getLogger("authz.credentials")


def _stat(path: Path) -> Hashable:
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class TokenFile:
    def __init__(self, path: Path, flag: str) -> None:
        self.path = Path(path)
        self.flag = flag  # names the file in messages: the path may be shown, never the token
        self._lock = threading.Lock()
        self._seen = _stat(self.path)
        self._token = self._read()  # CredentialError at start: a usage error
        self.rotations = 0

    def _read(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CredentialError(f"{self.flag}: cannot read the token file: {reason}") from None
        token = text.strip()
        if not token:
            raise CredentialError(f"{self.flag}: the token file is empty")
        if any(c in token for c in "\r\n\0"):
            raise CredentialError(f"{self.flag}: the token file holds more than one line")
        return token

    def token(self) -> str:
        """The current token: re-read when the file changed, the last good one if it broke."""
        seen = _stat(self.path)
        if seen == self._seen:
            return self._token
        with self._lock:
            if seen != self._seen:
                self._seen = seen
                try:
                    self._token = self._read()
                    self.rotations += 1
                    log.info("%s: token re-read after the file changed", self.flag)
                except CredentialError as exc:
                    log.error("%s; still using the previous token", exc)
            return self._token


def split_userinfo(url: str) -> tuple[str, str | None]:
    """(the URL without user info, a Basic ``Authorization`` value or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    clean = urllib.parse.urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, "Basic " + base64.b64encode(pair.encode()).decode("ascii")


@dataclass
class ClientAuth:
    """What an outbound request presents in its ``Authorization`` header, if anything."""

    token: TokenFile | None = None
    basic: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        if self.token is not None:
            return {"Authorization": f"Bearer {self.token.token()}"}
        if self.basic is not None:
            return {"Authorization": self.basic}
        return {}

    def __repr__(self) -> str:  # never the secret, even in a traceback
        kind = "bearer token file" if self.token else "basic" if self.basic else "none"
        return f"ClientAuth({kind})"


def client_auth(url: str, token: TokenFile | None) -> tuple[str, ClientAuth]:
    """The URL to use (no user info) and its credentials; CredentialError when they conflict."""
    clean, basic = split_userinfo(url)
    if basic is not None and token is not None:
        raise CredentialError(f"{token.flag} and user info in the URL both give credentials: "
                              "use one")
    if (basic is not None or token is not None) and clean.startswith("http://"):
        log.warning("credentials for %s travel in clear text over http://; use https://",
                    redact_url(clean))
    return clean, ClientAuth(token, basic)
