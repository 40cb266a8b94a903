"""Decision -> Envoy CheckResponse.

Allowed: OK with the x-authz-* upstream headers, overwriting whatever the client sent
under those names (and removing x-authz-tenant when there is no tenant), so an upstream
can trust them, plus the headers the allowing rule sets and removes (authz.engine.shaping;
they can never name x-authz-*). Denied: PERMISSION_DENIED, HTTP 403 or the status the
policy or bundle sets, a small JSON body with the decision id, a public reason and the
policy's message if any. Dynamic metadata names the policy, rule and bundle revision for
Envoy's access log; the client never sees those.

The answer is written straight to the wire form from pieces serialized once: protobuf
concatenates, so a message is the bytes of its fields one after another, and a repeated
field or map is its entries' bytes one after another. What depends only on the decision and
the revision (the metadata, the tenant header, the rule's header removals, a deny's status,
reason and message) is serialized once per distinct decision and cached; per check only the
decision id (always 32 characters, so its framing is fixed too), the caller's principal
header and the rule's upstream headers (their values may come from the request) are joined
in. tests/unit/test_response.py checks the bytes parse to the message built field by field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2

from authz.engine.model import Decision

HEADER_TENANT = "x-authz-tenant"
HEADER_PRINCIPAL = "x-authz-principal"
HEADER_DECISION_ID = "x-authz-decision-id"
OWN_HEADERS = (HEADER_TENANT, HEADER_PRINCIPAL, HEADER_DECISION_ID)

DECISION_ID_LENGTH = 32  # hex characters of check.new_decision_id()
_DECISION_ID = re.compile(r"[0-9a-f]{32}\Z")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
CheckResponse = external_auth_pb2.CheckResponse
_Ok = external_auth_pb2.OkHttpResponse
_Denied = external_auth_pb2.DeniedHttpResponse


def _field_tag(message: type, name: str) -> bytes:
    number = message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[attr-defined]
    return bytes([number << 3 | 2])  # length-delimited; every number used here is < 16


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


_PLACEHOLDER = "5a" * (DECISION_ID_LENGTH // 2)


def _around_id(make: Callable[[str], Message]) -> tuple[bytes, bytes]:
    """The bytes before and after the decision id in a piece whose only variable part it is."""
    data = make(_PLACEHOLDER).SerializeToString()
    before, found, after = data.partition(_PLACEHOLDER.encode())
    assert found and _PLACEHOLDER.encode() not in after
    return before, after


_TAG_OK = _field_tag(CheckResponse, "ok_response")
_TAG_DENIED = _field_tag(CheckResponse, "denied_response")
_TAG_METADATA = _field_tag(CheckResponse, "dynamic_metadata")
_TAG_BODY = _field_tag(_Denied, "body")
_STATUS_OK: bytes = CheckResponse(status=status_pb2.Status(code=code_pb2.OK)).SerializeToString()
_STATUS_DENIED: bytes = CheckResponse(status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED)).SerializeToString()
_FORBIDDEN = http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden)
_DENY_STATUSES = {
    401: http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
    403: _FORBIDDEN,
    404: http_status_pb2.HttpStatus(code=http_status_pb2.NotFound),
    429: http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
}
_JSON = _header("content-type", "application/json")
_OK_ID_HEADER = _around_id(lambda i: _Ok(headers=[_header(HEADER_DECISION_ID, i)]))
_DENIED_ID_HEADER = _around_id(lambda i: _Denied(headers=[_header(HEADER_DECISION_ID, i)]))
_METADATA_ID = _around_id(
    lambda i: struct_pb2.Struct(fields={"decision_id": struct_pb2.Value(string_value=i)}))
_REMOVE_TENANT: bytes = _Ok(headers_to_remove=[HEADER_TENANT]).SerializeToString()
_REMOVE_PRINCIPAL: bytes = _Ok(headers_to_remove=[HEADER_PRINCIPAL]).SerializeToString()


@dataclass(frozen=True, slots=True)
class _Pieces:
    """Everything of one response but the decision id, the principal and upstream headers."""

    metadata: bytes  # the Struct's entries other than decision_id
    removals: bytes  # OK: the rule's header removals
    tenant: bytes  # OK: the tenant header, or the removal of it
    denied_head: bytes  # denied: HTTP status and content-type
    body_tail: bytes  # denied: '","reason":...}'


_BODY_HEAD = b'{"decision_id":"'
_CACHE_LIMIT = 4096
_PiecesKey = tuple[bool, str, str, str, str, str, tuple[str, ...], int, str]
_pieces: dict[_PiecesKey, _Pieces] = {}
_principals: dict[str, bytes] = {}


def _pieces_for(decision: Decision, revision: str) -> _Pieces:
    key = (decision.allowed, decision.reason, decision.policy, decision.rule, decision.tenant or "", revision,
           decision.remove_headers, decision.http_status, decision.deny_message)
    pieces = _pieces.get(key)
    if pieces is None:
        md = struct_pb2.Struct()
        md.update({"allowed": decision.allowed, "policy": decision.policy, "rule": decision.rule,
                   "revision": revision, "tenant": decision.tenant or ""})
        if decision.tenant:
            tenant = _Ok(headers=[_header(HEADER_TENANT, decision.tenant)]).SerializeToString()
        else:
            tenant = _REMOVE_TENANT
        removals = _Ok(headers_to_remove=list(decision.remove_headers)).SerializeToString()
        denied_head = _Denied(status=_DENY_STATUSES.get(decision.http_status, _FORBIDDEN),
                              headers=[_JSON]).SerializeToString()
        tail = '","reason":' + json.dumps(decision.reason)
        if decision.deny_message:
            tail += ',"message":' + json.dumps(decision.deny_message)
        pieces = _Pieces(md.SerializeToString(), removals, tenant, denied_head, (tail + "}").encode())
        if len(_pieces) >= _CACHE_LIMIT:  # bounded whatever the reasons and revisions seen
            _pieces.clear()
        _pieces[key] = pieces
    return pieces


def _principal_header(principal: str) -> bytes:
    piece = _principals.get(principal)
    if piece is None:
        piece = _Ok(headers=[_header(HEADER_PRINCIPAL, principal)]).SerializeToString()
        if len(_principals) >= _CACHE_LIMIT:
            _principals.clear()
        _principals[principal] = piece
    return piece


def encode_check_response(decision: Decision, decision_id: str, revision: str, principal: str) -> bytes:
    """The serialized CheckResponse for a decision."""
    if not _DECISION_ID.match(decision_id):
        raise ValueError("a decision id is 32 lower-case hex digits")
    p = _pieces_for(decision, revision)
    did = decision_id.encode()
    metadata = b"".join((p.metadata, _METADATA_ID[0], did, _METADATA_ID[1]))
    metadata_field = _TAG_METADATA + _varint(len(metadata)) + metadata
    id_header = _OK_ID_HEADER if decision.allowed else _DENIED_ID_HEADER
    id_header_bytes = id_header[0] + did + id_header[1]
    if decision.allowed:
        # The policy's headers first: Envoy applies them in order, so ours have the last word
        # (their names are refused at load anyway). Removals likewise: the rule's, then ours.
        ok = p.removals
        if decision.upstream_headers:
            ok = _Ok(headers=[_header(k, v) for k, v in decision.upstream_headers]).SerializeToString() + ok
        if principal:
            ok += _principal_header(principal) + id_header_bytes + p.tenant
        else:
            ok += id_header_bytes + p.tenant + _REMOVE_PRINCIPAL
        return _STATUS_OK + _TAG_OK + _varint(len(ok)) + ok + metadata_field
    body = _BODY_HEAD + did + p.body_tail
    denied = p.denied_head + id_header_bytes + _TAG_BODY + _varint(len(body)) + body
    return _STATUS_DENIED + _TAG_DENIED + _varint(len(denied)) + denied + metadata_field

