"""The CheckResponse written from precomputed pieces equals the one built field by field."""

from __future__ import annotations

import json
import os

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from authz import response
from authz.check import new_decision_id
from authz.engine.model import Decision

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=OVERWRITE)


def reference(d: Decision, decision_id: str, revision: str, principal: str) -> external_auth_pb2.CheckResponse:
    """What the response must be, written out with the protobuf API."""
    md = struct_pb2.Struct()
    md.update({"decision_id": decision_id, "allowed": d.allowed, "policy": d.policy, "rule": d.rule,
               "revision": revision, "tenant": d.tenant or ""})
    if d.allowed:
        headers = [header(k, v) for k, v in d.upstream_headers]
        remove = list(d.remove_headers)
        if principal:
            headers.append(header("x-authz-principal", principal))
        headers.append(header("x-authz-decision-id", decision_id))
        if d.tenant:
            headers.append(header("x-authz-tenant", d.tenant))
        else:
            remove.append("x-authz-tenant")
        if not principal:
            remove.append("x-authz-principal")
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(headers=headers, headers_to_remove=remove),
            dynamic_metadata=md)
    doc = {"decision_id": decision_id, "reason": d.reason}
    if d.deny_message:
        doc["message"] = d.deny_message
    body = json.dumps(doc, separators=(",", ":"))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=d.http_status if d.http_status in (401, 403, 404, 429) else 403),
            headers=[header("content-type", "application/json"), header("x-authz-decision-id", decision_id)],
            body=body),
        dynamic_metadata=md)


texts = st.text(min_size=0, max_size=300)


@settings(max_examples=300, deadline=None)
@given(allowed=st.booleans(), reason=texts, policy=st.text(min_size=1, max_size=40), rule=texts,
       tenant=st.none() | st.text(min_size=1, max_size=63), revision=texts, principal=texts,
       decision_id=st.binary(min_size=16, max_size=16).map(bytes.hex),
       upstream=st.lists(st.tuples(st.sampled_from(["x-a", "x-b", "x-c"]), texts), max_size=3),
       removals=st.lists(st.sampled_from(["x-r", "x-s", "cookie"]), max_size=3),
       deny_status=st.sampled_from([0, 401, 403, 404, 429]), deny_message=st.sampled_from(["", "ask ops", "é\"\n"]))
def test_pieces_equal_field_by_field(allowed: bool, reason: str, policy: str, rule: str, tenant: str | None,
                                     revision: str, principal: str, decision_id: str,
                                     upstream: list[tuple[str, str]], removals: list[str], deny_status: int,
                                     deny_message: str) -> None:
    d = Decision(allowed, reason, policy, rule, "ALLOW" if allowed else "DENY", tenant,
                 upstream_headers=tuple(upstream), remove_headers=tuple(removals),
                 deny_status=0 if allowed else deny_status, deny_message="" if allowed else deny_message)
    data = response.encode_check_response(d, decision_id, revision, principal)
    got = external_auth_pb2.CheckResponse.FromString(data)
    assert got == reference(d, decision_id, revision, principal)
    if not allowed:
        want = {"decision_id": decision_id, "reason": reason}
        if deny_message:
            want["message"] = deny_message
        assert json.loads(got.denied_response.body) == want


def test_the_same_decision_twice_differs_only_by_id() -> None:
    d = Decision(True, "allowed by policy", "p", "r", "ALLOW", "acme")
    a, b = new_decision_id(), new_decision_id()
    assert a != b
    ra = response.encode_check_response(d, a, "rev", "spiffe://td/ns/a/sa/b")
    rb = response.encode_check_response(d, b, "rev", "spiffe://td/ns/a/sa/b")
    assert ra.replace(a.encode(), b.encode()) == rb


def test_a_decision_id_that_is_not_32_hex_digits_is_refused() -> None:
    d = Decision(False, "denied by default", "default", "default", "default")
    for bad in ("", "abc", "Z" * 32, '"' * 32, new_decision_id() + "0"):
        try:
            response.encode_check_response(d, bad, "rev", "")
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_decision_ids_are_unique_and_hex_across_blocks_and_forks() -> None:
    ids = {new_decision_id() for _ in range(2000)}  # several blocks of os.urandom
    assert len(ids) == 2000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's next id must not be the parent's next id
        os.write(w, new_decision_id().encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 64).decode()
    os.close(r)
    assert child != new_decision_id()
