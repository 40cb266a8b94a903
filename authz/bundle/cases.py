"""Bundle test cases (a bundle's tests/*.yaml), run through the real check path.

Each case is a request (short form, or an Envoy CheckRequest in protobuf JSON) and what
must come back. A case goes through ``authz.check.Checker`` exactly like a served check
(request normalisation, decision, response shaping), with an ``Explainer`` attached so a
failing case shows why and so coverage knows which rules matched.

``run_cases`` is what the store's reload gate runs before a swap and what ``authz test``
(authz/testing.py, the command line front end) reports; it never raises for a bad case, it
reports it as failed. It sits below the store: the store imports it, never the reverse.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import json_format

from authz.bundle.yamlpos import Document
from authz.check import Checker, Outcome
from authz.engine.decide import PolicySet
from authz.engine.explain import Explainer, summary
from authz.redact import NEVER_LOGGED, SECRET_WORDS, echo_free, redacted

if TYPE_CHECKING:
    from authz.bundle.store import BundleStore

_EXPECT_FIELDS = ("allowed", "status", "policy", "rule", "reason", "tenant")


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str  # "<test name>/<case name>"
    location: str  # "file:line" of the case
    passed: bool
    message: str  # why it failed ('' when it passed)
    explanation: tuple[str, ...] = ()  # the decision trace, for failures


@dataclass(frozen=True, slots=True)
class RuleRef:
    name: str  # "policy/rule"
    location: str  # file:line:column of the rule


@dataclass(frozen=True, slots=True)
class Coverage:
    rules: tuple[RuleRef, ...]  # every rule of the bundle, in bundle order
    exercised: frozenset[str]  # "policy/rule" matched by at least one case

    @property
    def uncovered(self) -> list[RuleRef]:
        return [r for r in self.rules if r.name not in self.exercised]

    @property
    def complete(self) -> bool:
        return not self.uncovered


@dataclass(slots=True)
class TestReport:
    results: list[CaseResult] = field(default_factory=list)
    coverage: Coverage = field(default_factory=lambda: Coverage((), frozenset()))

    __test__ = False  # not a pytest class

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def passed(self) -> list[CaseResult]:
        return [r for r in self.results if r.passed]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return f"{len(self.passed)} passed, {len(self.failed)} failed"


# --- running ----------------------------------------------------------------------------


def run_cases(policy_set: PolicySet, documents: Iterable[Document], pattern: str | None = None) -> TestReport:
    """Run every case of ``documents`` (BundleFiles.tests) against ``policy_set``.

    ``pattern`` keeps the cases whose "<test name>/<case name>" contains it (case-insensitive),
    or matches it as a glob when it has '*', '?' or '['.
    """
    checker = Checker(cast("BundleStore", _Fixed(policy_set)), None)
    report = TestReport()
    exercised: set[str] = set()
    for doc in documents:
        value = doc.value if isinstance(doc.value, dict) else {}
        test_name = str(value.get("name", doc.file))
        for i, case in enumerate(value.get("cases") or []):
            if not isinstance(case, dict):
                continue
            name = f"{test_name}/{case.get('name', f'case-{i + 1}')}"
            if pattern and not _selected(name, pattern):
                continue
            pos = doc.at(("cases", i))
            location = f"{pos.file}:{pos.line}"
            report.results.append(_run_case(checker, name, location, case, exercised))
    report.coverage = Coverage(
        tuple(RuleRef(f"{p.name}/{r.name}", r.location) for p in policy_set.policies for r in p.rules),
        frozenset(exercised),
    )
    return report


class _Fixed:
    """Serves one PolicySet, as a BundleStore would, without loading anything."""

    def __init__(self, policy_set: PolicySet) -> None:
        self.current = policy_set


def _selected(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name.lower(), pattern.lower())
    return pattern.lower() in name.lower()


def _run_case(checker: Checker, name: str, location: str, case: dict[str, Any], exercised: set[str]) -> CaseResult:
    try:
        check_request = build_check_request(case)
    except ValueError as exc:
        return CaseResult(name, location, False, f"{name} ({location}): {exc}")
    tracer = Explainer()
    outcome = checker.run(check_request, tracer)
    exercised.update(tracer.matched_rules())
    actual = observed(outcome)
    problems = compare(case.get("expect") or {}, actual)
    if not problems:
        return CaseResult(name, location, True, "")
    lines = [f"{name} ({location}): {len(problems)} expectation{'s' if len(problems) > 1 else ''} failed"]
    lines += [f"  {p}" for p in problems]
    lines.append(f"  decision: {summary(outcome.decision)}")
    return CaseResult(name, location, False, "\n".join(lines), tuple(tracer.lines()))


def build_check_request(case: dict[str, Any]) -> external_auth_pb2.CheckRequest:
    """The Envoy CheckRequest of a case; ValueError when the case does not describe one."""
    has_short, has_full = "request" in case, "checkRequest" in case
    if has_short == has_full:
        raise ValueError("a case needs exactly one of 'request' or 'checkRequest'")
    if has_full:
        try:
            return json_format.ParseDict(case["checkRequest"], external_auth_pb2.CheckRequest())
        except json_format.ParseError as exc:
            # A bundle test's values go to the reload log and /v1/status: no value echoed.
            raise ValueError(f"checkRequest is not an Envoy CheckRequest: {echo_free(exc)}") from None
    r = case["request"] or {}
    ctx = attribute_context_pb2.AttributeContext
    http = ctx.HttpRequest(
        method=str(r.get("method", "GET")),
        path=str(r.get("path", "/")),
        host=str(r.get("host", "")),
        headers={str(k).lower(): str(v) for k, v in (r.get("headers") or {}).items()},
        protocol="HTTP/1.1",
        scheme="http",
    )
    source = ctx.Peer(principal=str(r.get("principal", "")))
    if r.get("sourceAddress"):
        source.address.CopyFrom(_address(str(r["sourceAddress"]), 0))
    destination = ctx.Peer(principal=str(r.get("destination", "")))
    if r.get("destinationAddress") or r.get("port"):
        destination.address.CopyFrom(_address(str(r.get("destinationAddress", "")), int(r.get("port", 0))))
    attrs = ctx(source=source, destination=destination, request=ctx.Request(http=http),
                context_extensions={str(k): str(v) for k, v in (r.get("contextExtensions") or {}).items()})
    return external_auth_pb2.CheckRequest(attributes=attrs)


def _address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def observed(outcome: Outcome) -> dict[str, Any]:
    """What a case can assert on, read from the decision and the Envoy response."""
    d, resp = outcome.decision, outcome.response
    headers: dict[str, str] = {}
    if resp.HasField("ok_response"):
        status = 200
        headers = {h.header.key.lower(): h.header.value for h in resp.ok_response.headers}
    else:
        status = int(resp.denied_response.status.code) or 403
    return {"allowed": d.allowed, "status": status, "policy": d.policy, "rule": d.rule,
            "reason": d.reason, "tenant": d.tenant, "headers": headers}


# Denies that say the policy could not be evaluated, not that it decided.
_ERRORS = ("condition error", "condition over budget", "upstream header error")


_CREDENTIAL_SCHEME = re.compile(r"(?i)(?:bearer|basic|digest|token|negotiate|aws4-hmac-sha256)\s")


def compare(expect: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """One line per expectation that does not hold: 'field: expected X, got Y'. A case that
    expects nothing, or a deny that only came from an evaluation error without naming it,
    fails too: either would pass whatever the policy does."""
    if not any(key in expect for key in (*_EXPECT_FIELDS, "headers")):
        return ["the case expects nothing: give at least one of allowed, status, policy, rule, reason, "
                "tenant, headers"]
    if actual["reason"] in _ERRORS and "reason" not in expect:
        return [f"decided by an evaluation error ({actual['reason']} in {actual['policy']}/{actual['rule']}), "
                "not by the policy: fix the condition, or expect that reason"]
    problems = []
    for key in _EXPECT_FIELDS:
        if key in expect and expect[key] != actual[key]:
            problems.append(f"{key}: expected {_show(expect[key])}, got {_show(actual[key])}")
    for header, want in (expect.get("headers") or {}).items():
        got = actual["headers"].get(str(header).lower())
        if want != got:
            # The failure goes to the reload log and /v1/status: a credential-like header
            # (an upstream token built from data) is shown by its length only.
            if SECRET_WORDS.search(str(header)) or str(header).lower() in NEVER_LOGGED or any(
                    isinstance(v, str) and _CREDENTIAL_SCHEME.match(v) for v in (want, got)):
                shown_want, shown_got = (redacted(v) if isinstance(v, str) else _show(v, absent=True)
                                         for v in (want, got))
            else:
                shown_want, shown_got = _show(want, absent=True), _show(got, absent=True)
            problems.append(f"header {header}: expected {shown_want}, got {shown_got}")
    return problems


def _show(value: Any, absent: bool = False) -> str:
    if value is None:
        return "(absent)" if absent else "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)
