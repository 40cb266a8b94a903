"""The pipeline of one check, top to bottom:

    CheckRequest -> Request -> PolicySet.decide -> Decision -> CheckResponse
                                                     ├─> audit (queued)
                                                     ├─> trace span (queued, when on)
                                                     └─> metrics

``Checker.check`` never raises: a malformed request, a missing bundle or any internal
error becomes a deny with a reason and a decision id.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from envoy.service.auth.v3 import external_auth_pb2

from authz import request as request_mod
from authz import response
from authz.audit import AuditEntry, AuditLog
from authz.engine.decide import PolicySet, Tracer
from authz.engine.model import Decision
from authz.limits import RequestLimits
from authz.metrics import Metrics

if TYPE_CHECKING:
    from authz.bundle.store import BundleStore  # its reload gate runs bundle tests: no import back
    from authz.tracing import Tracing  # the OTLP protos load only when tracing is on

log = logging.getLogger("authz.check")


# Who asked: Envoy over gRPC or HTTP ext_authz, or an application through the decision API.
CALLER_ENVOY_GRPC = "envoy_grpc"
CALLER_ENVOY_HTTP = "envoy_http"
CALLER_API = "api"
CALLERS = (CALLER_ENVOY_GRPC, CALLER_ENVOY_HTTP, CALLER_API)
# HTTP ext_authz and the decision API carry no socket attributes; see PolicySet.needs_socket.
UNCARRIED = "the bundle reads connection attributes this caller does not carry"
UNCARRIED_REQUEST = "the bundle reads request attributes this caller does not carry"
# Envoy's include_peer_certificate (gRPC) or XFCC's Cert (HTTP): see PolicySet.needs_certificate.
UNCARRIED_CERTIFICATE = "the bundle reads caller identities, and the caller's certificate was not forwarded"


_ID_BLOCK = 256  # decision ids drawn from the OS per read: one system call per 256 checks
_ids: Iterator[str] = iter(())


def new_decision_id() -> str:
    """32 random hex digits (response.DECISION_ID_LENGTH), from os.urandom read in blocks."""
    global _ids
    for decision_id in _ids:  # a list iterator: next() is atomic, so threads may share it
        return decision_id
    block = os.urandom(16 * _ID_BLOCK).hex()
    ids = [block[i:i + 32] for i in range(0, len(block), 32)]
    _ids = iter(ids[1:])
    return ids[0]


def _fresh_ids_after_fork() -> None:
    global _ids
    _ids = iter(())  # a forked worker must not hand out its parent's ids


os.register_at_fork(after_in_child=_fresh_ids_after_fork)


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    decision_id: str
    revision: str
    request: request_mod.Request | None
    response: external_auth_pb2.CheckResponse


class Checker:
    def __init__(self, store: BundleStore, metrics: Metrics | None, audit: AuditLog | None = None,
                 tracing: Tracing | None = None, limits: RequestLimits = RequestLimits()) -> None:
        """``metrics`` None: count nothing (bundle tests must not show up as served checks)."""
        self.store = store
        self.metrics = metrics
        self.audit = audit
        self.tracing = tracing
        self.limits = limits
        self._uncarried_said: set[tuple[str, str, str]] = set()

    def check(self, check_request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        return self.run(check_request).response

    def check_bytes(self, data: bytes) -> bytes:
        """The wire form of a check: bytes in, bytes out. A request that does not even parse
        is denied like any other malformed request, with a reason and a decision id; one over
        the size limit is denied before it is parsed."""
        started = time.perf_counter()
        if len(data) > self.limits.max_request_bytes:
            return self._check(started, None, None, CALLER_ENVOY_GRPC, "", None, False,
                               too_large=self.limits.too_large)[1]
        try:
            check_request: external_auth_pb2.CheckRequest | None = external_auth_pb2.CheckRequest.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError, but any failure denies
            check_request = None
        return self._check(started, check_request, None, CALLER_ENVOY_GRPC, "not a CheckRequest", None, False,
                           size=len(data))[1]

    def run(self, check_request: external_auth_pb2.CheckRequest | None, tracer: Tracer | None = None,
            caller: str = CALLER_ENVOY_GRPC, *, malformed: str = "not a CheckRequest",
            tenant_hint: str | None = None, size: int | None = None,
            too_large: str | None = None, socket: bool = True,
            carries: frozenset[str] | None = None) -> Outcome:
        """Decide one request; ``tracer``, when given, receives each step (``authz check --explain``).
        ``caller`` is the kind of caller (one of CALLERS), a label of metrics and audit records;
        ``malformed`` the reason given when ``check_request`` is None; ``tenant_hint`` (decision
        API) turns an allow for any other tenant into a deny. ``size`` is the request's size on
        the wire when known; ``too_large`` the reason it was not even parsed (limits.py).
        ``socket`` False: the caller carries no socket attributes (addresses, destination
        port, SNI), so a bundle whose decisions could depend on them denies (UNCARRIED).
        ``carries``: what the caller carries of the request, in PolicySet.reads' terms (None:
        all of it, as Envoy's gRPC check); a bundle reading anything else where its absence
        could loosen a decision denies (UNCARRIED_REQUEST)."""
        started = time.perf_counter()
        outcome, _ = self._check(started, check_request, tracer, caller, malformed, tenant_hint, True,
                                 size=size, too_large=too_large, socket=socket, carries=carries)
        assert outcome is not None
        return outcome

    def _uncarried(self, policy_set: PolicySet, policy: str, caller: str, reason: str = UNCARRIED) -> Decision:
        """A deny for a check whose caller cannot carry what ``policy`` reads; said once per
        bundle and caller, since every such check is denied until another bundle serves."""
        said = (policy_set.revision, caller, reason)
        if said not in self._uncarried_said:
            self._uncarried_said.add(said)
            what = {UNCARRIED: "connection attributes (addresses, destination port, SNI) that",
                    UNCARRIED_CERTIFICATE: "the caller's identity on every name of its certificate, "
                                           "which"}.get(reason, "request attributes that")
            log.warning("bundle %s: policy %s reads %s %s checks do not carry; they are denied while "
                        "it serves (%s)", policy_set.revision, policy, what, caller, reason)
        return _deny(reason)

    def _missing(self, policy_set: PolicySet, carries: frozenset[str]) -> str:
        """PolicySet.uncarried, remembered on the bundle itself per caller kind (a check does
        no more than a lookup, and a replaced bundle takes its answers with it: held here,
        each kept an old bundle alive)."""
        found = policy_set.uncarried_seen.get(carries)
        if found is None:
            found = policy_set.uncarried(carries)
            policy_set.uncarried_seen[carries] = found
        return found

    def _check(self, started: float, check_request: external_auth_pb2.CheckRequest | None,
               tracer: Tracer | None, caller: str, malformed: str,
               tenant_hint: str | None, outcome: bool, *, size: int | None = None,
               too_large: str | None = None, socket: bool = True,
               carries: frozenset[str] | None = None) -> tuple[Outcome | None, bytes]:
        """The answer's bytes and, if ``outcome``, the whole Outcome (the gRPC path needs only bytes)."""
        decision_id = new_decision_id()
        policy_set = self.store.current  # read once: one bundle for the whole check
        revision = policy_set.revision if policy_set is not None else ""
        req: request_mod.Request | None = None
        try:
            if too_large is not None:
                decision = _deny(too_large)
            elif check_request is None:
                decision = _deny(f"malformed request: {malformed}")
            elif (over := self.limits.violation(check_request, size)) is not None:
                decision = _deny(over)  # before any normalising or matching
            elif policy_set is None:
                decision = _deny("no policy bundle loaded")
            elif not socket and policy_set.needs_socket:
                decision = self._uncarried(policy_set, policy_set.needs_socket, caller)
            elif carries is not None and (missing := self._missing(policy_set, carries)):
                decision = self._uncarried(policy_set, missing, caller, UNCARRIED_CERTIFICATE
                                           if missing.endswith("(certificate)") else UNCARRIED_REQUEST)
            else:
                req = request_mod.from_check_request(check_request, policy_set.trust_domains,
                                                   policy_set.path_normalization, policy_set.xff_trusted_hops)
                if not socket and policy_set.needs_remote_address and not req.remote_address:
                    decision = self._uncarried(policy_set, policy_set.needs_remote_address, caller)
                elif (caller == CALLER_ENVOY_GRPC and req.principal and policy_set.needs_certificate
                      and not check_request.attributes.source.certificate):  # other callers: carries
                    decision = self._uncarried(policy_set, policy_set.needs_certificate, caller,
                                               UNCARRIED_CERTIFICATE)
                else:
                    decision = policy_set.decide(req, tracer)
                if tenant_hint is not None and decision.allowed and decision.tenant != tenant_hint:
                    decision = Decision(False, "tenant mismatch", decision.policy, decision.rule, "DENY",
                                        decision.tenant, decision.audit, decision.dry_run)
        except request_mod.MalformedRequest as exc:
            decision = _deny(f"malformed request: {exc}")
        except Exception:  # noqa: BLE001 - fail closed, never crash the servicer
            log.exception("internal error while deciding %s", decision_id,
                          extra={"decision_id": decision_id, "revision": revision, "reason": "internal error"})
            decision = _deny("internal error")
        if policy_set is not None:
            try:
                if policy_set.shapes:
                    decision = policy_set.shape(decision, req)
            except Exception:  # noqa: BLE001
                log.exception("internal error while shaping %s", decision_id)
                decision = _deny("internal error")
        try:
            answer = response.encode_check_response(decision, decision_id, revision,
                                                    req.principal if req else "")
        except Exception:  # noqa: BLE001
            log.exception("internal error while answering %s", decision_id,
                          extra={"decision_id": decision_id, "revision": revision, "reason": "internal error"})
            decision = _deny("internal error")
            answer = response.encode_check_response(decision, decision_id, revision, "")
        elapsed = time.perf_counter() - started
        self._observe(decision, decision_id, revision, req, elapsed, policy_set, caller, size or 0)
        if not outcome:
            return None, answer
        return Outcome(decision, decision_id, revision, req, response.CheckResponse.FromString(answer)), answer

    def _observe(self, decision: Decision, decision_id: str, revision: str,
                 req: request_mod.Request | None, elapsed: float, policy_set: PolicySet | None,
                 caller: str, size: int) -> None:
        # Side effects only; nothing here may change or delay the answer: counters and one
        # put_nowait onto the audit queue (AuditLog.submit), O(1) and never blocking. Each
        # in its own try, so that a failing counter cannot cost the audit record.
        if self.audit is not None:
            try:
                self.audit.submit(AuditEntry(time.time(), decision_id, decision, req, revision,
                                             int(elapsed * 1e6), caller), 2 * size if req is not None else 0)
            except Exception:  # noqa: BLE001
                log.exception("audit failed for %s", decision_id, extra={"decision_id": decision_id})
        if self.metrics is not None:
            try:
                # Only a tenant the serving bundle defines may become a metric label value.
                tenant = decision.tenant if policy_set is not None and decision.tenant in policy_set.tenants else None
                self.metrics.count_check(decision.allowed, decision.reason, decision.policy, elapsed, tenant,
                                         caller)
                if decision.condition_error:
                    self.metrics.condition_errors.inc()
                for entry in decision.dry_run:
                    self.metrics.dry_run.labels(entry.rpartition("=")[2]).inc()
            except Exception:  # noqa: BLE001
                log.exception("metrics failed for %s", decision_id, extra={"decision_id": decision_id})
        if self.tracing is not None:  # one append to a bounded queue, like the audit
            try:
                self.tracing.check(req.headers.get("traceparent") if req else None, decision,
                                   decision_id, revision, elapsed, caller)
            except Exception:  # noqa: BLE001
                log.exception("tracing failed for %s", decision_id, extra={"decision_id": decision_id})


def _deny(reason: str) -> Decision:
    return Decision(False, reason, "default", "default", "DENY")
