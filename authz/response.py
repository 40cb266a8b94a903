"""Decision -> Envoy CheckResponse.

Allowed: OK with the x-authz-* upstream headers, overwriting whatever the client sent
under those names (and removing x-authz-tenant when there is no tenant), so an upstream
can trust them, plus the headers the allowing rule sets and removes (authz.engine.shaping;
they can never name x-authz-*). Denied: PERMISSION_DENIED, HTTP 403 or the status the
policy or bundle sets, a small JSON body with the decision id, a public reason and the
policy's message if any. Dynamic metadata names the policy, rule and bundle revision for
Envoy's access log; the client never sees those.
"""

from __future__ import annotations

import json

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz.engine.model import Decision

HEADER_TENANT = "x-authz-tenant"
HEADER_PRINCIPAL = "x-authz-principal"
HEADER_DECISION_ID = "x-authz-decision-id"
OWN_HEADERS = (HEADER_TENANT, HEADER_PRINCIPAL, HEADER_DECISION_ID)

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK_STATUS = status_pb2.Status(code=code_pb2.OK)
_DENIED_STATUS = status_pb2.Status(code=code_pb2.PERMISSION_DENIED)
_FORBIDDEN = http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden)
_DENY_STATUSES = {
    401: http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
    403: _FORBIDDEN,
    404: http_status_pb2.HttpStatus(code=http_status_pb2.NotFound),
    429: http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
}
_JSON = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", value="application/json"), append_action=_OVERWRITE
)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def _metadata(decision: Decision, decision_id: str, revision: str) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    md.update(
        {
            "decision_id": decision_id,
            "allowed": decision.allowed,
            "policy": decision.policy,
            "rule": decision.rule,
            "revision": revision,
            "tenant": decision.tenant or "",
        }
    )
    return md


def to_check_response(
    decision: Decision, decision_id: str, revision: str, principal: str
) -> external_auth_pb2.CheckResponse:
    md = _metadata(decision, decision_id, revision)
    if decision.allowed:
        headers = [_header(HEADER_PRINCIPAL, principal), _header(HEADER_DECISION_ID, decision_id)]
        remove: list[str] = list(decision.remove_headers)
        if decision.tenant:
            headers.append(_header(HEADER_TENANT, decision.tenant))
        else:
            remove.append(HEADER_TENANT)
        if not principal:
            headers.pop(0)
            remove.append(HEADER_PRINCIPAL)
        # The policy's headers first: Envoy applies them in order, so ours have the last word
        # (their names are refused at load anyway).
        headers[:0] = [_header(k, v) for k, v in decision.upstream_headers]
        return external_auth_pb2.CheckResponse(
            status=_OK_STATUS,
            ok_response=external_auth_pb2.OkHttpResponse(headers=headers, headers_to_remove=remove),
            dynamic_metadata=md,
        )
    doc = {"decision_id": decision_id, "reason": decision.reason}
    if decision.deny_message:
        doc["message"] = decision.deny_message
    body = json.dumps(doc, separators=(",", ":"))
    return external_auth_pb2.CheckResponse(
        status=_DENIED_STATUS,
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=_DENY_STATUSES.get(decision.http_status, _FORBIDDEN),
            headers=[_JSON, _header(HEADER_DECISION_ID, decision_id)], body=body,
        ),
        dynamic_metadata=md,
    )
