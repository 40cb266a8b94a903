"""The decision API (proto/authz/v1/decision.proto): Decide and Explain for applications.

    DecideRequest ─▶ to_check_request ─▶ Checker.run(caller="api") ─▶ DecideResponse
                                              (same engine, audit, metrics)

Served on the gRPC port (``decision_methods``) and as JSON over the HTTP port
(``handle_json``: POST /v1/decide, POST /v1/explain) in the proto3 JSON mapping. A body
that is not a DecideRequest, or a request that cannot be judged, is INVALID_ARGUMENT / 400
with the reason and decision id: an error, never an allow.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format

from authz.check import CALLER_API, Checker, Outcome
from authz.engine.explain import Explainer, summary
from authz.redact import echo_free
from authz.v1 import decision_pb2

SERVICE = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
MAX_JSON_BYTES = 1024 * 1024
MALFORMED = "malformed request"
# The request as a DecideRequest describes it: any header but :scheme, context extensions,
# the principals; no scheme or protocol (PolicySet.reads).
CARRIES = frozenset({"header:*", "context_extensions", "principal", "certificate"})  # an identity, no certificate


def to_check_request(req: decision_pb2.DecideRequest) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy would send for this request (Request is built from it, so the
    decision API and Envoy checks share one definition of a request)."""
    cr = external_auth_pb2.CheckRequest()
    attrs = cr.attributes
    attrs.source.principal = req.principal
    attrs.destination.principal = req.destination_principal
    http = attrs.request.http
    http.method = req.method
    http.path = req.path
    http.host = req.host
    http.headers.update(req.headers)
    # As in Envoy's CheckRequest, the request line is in the headers too.
    http.headers.update({":method": req.method, ":path": req.path, ":authority": req.host})
    attrs.context_extensions.update(req.context_extensions)
    return cr


def to_decide_response(outcome: Outcome) -> decision_pb2.DecideResponse:
    d = outcome.decision
    resp = outcome.response
    upstream: dict[str, str] = {}
    if resp.HasField("ok_response"):
        upstream = {h.header.key: h.header.value for h in resp.ok_response.headers}
        status = 200
    else:
        status = int(resp.denied_response.status.code) or 403
    return decision_pb2.DecideResponse(
        allowed=d.allowed, reason=d.reason, policy=d.policy, rule=d.rule, tenant=d.tenant or "",
        decision_id=outcome.decision_id, revision=outcome.revision, http_status=status,
        upstream_headers=upstream,
    )


def decide(checker: Checker, req: decision_pb2.DecideRequest | None, explain: bool
           ) -> tuple[decision_pb2.DecideResponse | decision_pb2.ExplainResponse, str | None]:
    """(answer, error): error is the INVALID_ARGUMENT message when the request cannot be judged."""
    tracer = Explainer() if explain else None
    if req is None:
        outcome = checker.run(None, caller=CALLER_API, malformed="not a DecideRequest")
    else:
        hint = req.tenant if req.HasField("tenant") else None
        outcome = checker.run(to_check_request(req), tracer, caller=CALLER_API, tenant_hint=hint, socket=False,
                              carries=CARRIES)
    answer = to_decide_response(outcome)
    error = None
    if outcome.decision.reason.startswith(MALFORMED):
        error = f"{outcome.decision.reason} (decision {outcome.decision_id})"
    if tracer is None:
        return answer, error
    steps = [decision_pb2.ExplainStep(step=s.what, policy=s.policy, rule=s.rule, detail=s.detail,
                                      **({} if s.ok is None else {"ok": s.ok})) for s in tracer.steps]
    text = "\n".join([summary(outcome.decision), *("  " + line for line in tracer.lines())])
    return decision_pb2.ExplainResponse(decision=answer, steps=steps, text=text), error


# --- gRPC --------------------------------------------------------------------------------


def decision_methods(checker: Checker, explain: bool) -> dict[str, Callable[[bytes, grpc.ServicerContext], bytes]]:
    """Decide (and Explain, when ``explain``: it shows the bundle's rules to its caller) on
    the gRPC server by full method name, taking raw bytes so that a body that does not parse
    is answered with INVALID_ARGUMENT (and audited), not a generic deserialisation error.
    Served through the admission gate (authz.admission), as Check is."""

    def method(explain: bool) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def call(data: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                req: decision_pb2.DecideRequest | None = decision_pb2.DecideRequest.FromString(data)
            except Exception:  # noqa: BLE001 - DecodeError; any failure is a bad argument
                req = None
            answer, error = decide(checker, req, explain)
            if error is not None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            return answer.SerializeToString()

        return call

    methods = {f"/{SERVICE}/Decide": method(False)}
    if explain:
        methods[f"/{SERVICE}/Explain"] = method(True)
    return methods


# --- JSON over HTTP ----------------------------------------------------------------------

JSON_PATHS = {"/v1/decide": False, "/v1/explain": True}


def handle_json(checker: Checker, path: str, body: bytes) -> tuple[int, bytes]:
    """POST /v1/decide or /v1/explain: (HTTP status, JSON body)."""
    explain = JSON_PATHS[path]
    problem = ""
    try:
        req: decision_pb2.DecideRequest | None = json_format.Parse(
            body.decode("utf-8"), decision_pb2.DecideRequest())
    except (json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        req = None
        problem = f": {echo_free(exc)}"  # its values may be the request's headers
    answer, error = decide(checker, req, explain)
    if error is not None:
        return error_json(400, error + problem)
    return 200, json_format.MessageToJson(
        answer, always_print_fields_with_no_presence=True, indent=None).encode()


def error_json(status: int, message: str) -> tuple[int, bytes]:
    """The proto3 JSON of a google.rpc.Status: {"code": 3, "message": ...}."""
    code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    return status, json.dumps({"code": code, "message": message}).encode()
