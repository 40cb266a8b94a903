"""Envoy CheckRequest -> Request: the normalised, immutable view the engine decides on."""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz import paths, spiffe

CheckRequest = external_auth_pb2.CheckRequest


class MalformedRequest(ValueError):
    """The request cannot be judged; the message is the reason given to the client."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # decoded and normalised, without query
    query: str
    host: str  # lower-cased authority, port kept
    scheme: str = ""
    protocol: str = ""
    request_id: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    principal: str = ""  # canonical SPIFFE URI of the caller, or ''
    source: spiffe.SpiffeId | None = None
    source_address: str = ""
    source_port: int = 0
    remote_address: str = ""  # original client: right-most x-forwarded-for entry, else the peer
    destination_principal: str = ""
    destination_address: str = ""
    destination_port: int = 0
    context_extensions: dict[str, str] = field(default_factory=dict)
    raw_path: str = ""

    @property
    def host_without_port(self) -> str:
        host = self.host
        if host.startswith("["):  # [v6]:port
            end = host.find("]")
            return host[: end + 1] if end != -1 else host
        name, sep, port = host.rpartition(":")
        return name if sep and port.isdigit() else host


def from_check_request(check: external_auth_pb2.CheckRequest, trust_domains: spiffe.TrustDomains) -> Request:
    """Build a Request; raises MalformedRequest with a reason when it cannot be judged."""
    attrs = check.attributes
    if not attrs.HasField("request") or not attrs.request.HasField("http"):
        raise MalformedRequest("check request carries no HTTP attributes")
    http = attrs.request.http
    if not http.method:
        raise MalformedRequest("request has no method")
    headers = dict(http.headers) if http.headers else _header_map(http)
    if any(k != k.lower() for k in headers):  # Envoy sends lower case; hand-written requests may not
        headers = _lower_keys(headers)
    if http.fragment:
        raise MalformedRequest("path contains a fragment")
    try:
        normalized = paths.normalize(http.path)
    except paths.PathError as exc:
        raise MalformedRequest(str(exc)) from None
    query = normalized.query or http.query

    # A principal that is not a SPIFFE ID is kept verbatim: it can still match an exact
    # principal, but never a namespace, service account or tenant segment.
    principal, source = trust_domains.resolve(attrs.source.principal)
    dest_principal = trust_domains.resolve(attrs.destination.principal)[0]

    src_sock = attrs.source.address.socket_address
    dst_sock = attrs.destination.address.socket_address
    return Request(
        method=http.method.upper(),
        path=normalized.path,
        query=query,
        host=(http.host or headers.get(":authority", "")).lower(),
        scheme=http.scheme,
        protocol=http.protocol,
        request_id=headers.get("x-request-id") or http.id,
        headers=headers,
        principal=principal,
        source=source,
        source_address=src_sock.address,
        source_port=src_sock.port_value,
        remote_address=_remote_address(headers, src_sock.address),
        destination_principal=dest_principal,
        destination_address=dst_sock.address,
        destination_port=dst_sock.port_value,
        context_extensions=dict(attrs.context_extensions),
        raw_path=http.path,
    )


def _header_map(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    # Envoy fills header_map instead of headers when encode_raw_headers is set.
    out: dict[str, str] = {}
    for hv in http.header_map.headers:
        value = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
        key = hv.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _lower_keys(headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers.items():
        key = key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _remote_address(headers: dict[str, str], peer: str) -> str:
    # The original client as the nearest proxy saw it: the right-most x-forwarded-for entry
    # (each hop appends the address it received from). Entries to its left were written by
    # whoever sent the request and prove nothing; with no XFF it is the peer itself.
    xff = headers.get("x-forwarded-for")
    if xff:
        last = xff.rsplit(",", 1)[-1].strip()
        if last:
            return last
    return peer
