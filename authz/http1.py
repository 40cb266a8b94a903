"""The HTTP/1.1 pieces both of our asyncio HTTP servers share: reading a request head
strictly, rendering an answer, and closing without losing it.

Used by the HTTP ext_authz listener (authz.http_authz) and the probe server
(authz.probe_server). One parser for both, so a head one of them refuses is not read
another way by the other.
"""

from __future__ import annotations

import asyncio
import re

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 200
ANSWER_TIMEOUT = 10.0  # seconds a client may take to read an answer
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large",
           429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}

# RFC 9110 token: what a header name may be made of.
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Malformed(Exception):
    """A request we refuse to read further: answered with ``status`` and closed."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def parse_head(head: bytes, *, require_host: bool = True) -> tuple[str, str, dict[str, str], bool]:
    """Request line and headers: (method, target, lower-cased headers, close after).

    ``require_host`` False accepts a head without Host (an HTTP/1.0 health probe may send
    none); a second Host header is refused either way."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise Malformed("undecodable request head") from None
    unbroken = text.replace("\r\n", "")
    if "\0" in unbroken or "\n" in unbroken or "\r" in unbroken:
        # A bare LF or CR ends a line for some parsers and not for others: a hop reading the
        # head otherwise than here could see another request, and take our answer for its.
        raise Malformed("bare CR, LF or NUL in the request head")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1].startswith("/") or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise Malformed("bad request line")
    method, target, version = parts
    try:  # the head was read as latin-1: the target's bytes, read as what they encode
        target = target.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("request target is not UTF-8") from None
    headers: dict[str, str] = {}
    count = 0
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not TOKEN.fullmatch(name):
            raise Malformed("bad header line")
        count += 1
        if count > MAX_HEADERS:
            raise Malformed("too many headers", 431)
        key = name.lower()
        try:  # read as latin-1 with the head: the value's bytes, read as the UTF-8 Envoy sends
            value = value.strip(" \t").encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            # No name in the reason: it is a metric label, and a client choosing names would
            # make one series per request.
            raise Malformed("a header value is not UTF-8") from None
        if key == "host" and key in headers:
            raise Malformed("more than one host header")  # joined, it would match no host rule
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    conn = headers.get("connection", "").lower()
    close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
    if require_host and "host" not in headers:
        raise Malformed("request has no host header")
    return method, target, headers, close


def render(status: int, headers: list[tuple[str, str]], body: bytes, close: bool, head: bool = False) -> bytes:
    """An HTTP/1.1 answer with a content-length; a header holding CR or LF is left out.
    ``head``: the answer to a HEAD request, which has no body (RFC 9110 9.3.2): bytes after
    it would be read as the start of the next answer on the connection."""
    # An unknown status is an ext_authz deny's (the policy chose it): "Forbidden" reads right.
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Forbidden')}"]
    for k, v in headers:
        if "\r" in k or "\n" in k or "\r" in v or "\n" in v:
            continue  # never let a value split the response
        lines.append(f"{k}: {v}")
    lines.append(f"content-length: {len(body)}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + (b"" if head else body)


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_bytes: int = 2 * 1024 * 1024, seconds: float = 1.0) -> None:
    """Half-close, then read and drop what the client is still sending (bounded in bytes and
    time) before closing: closing with unread data would reset the connection and could
    destroy the answer before the client reads it."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        dropped = 0
        async with asyncio.timeout(seconds):  # not wait_for: it can lose a cancel (gh-86296)
            while dropped < max_bytes:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                dropped += len(chunk)
    except Exception:  # noqa: BLE001 - best effort; the answer is already sent
        return
