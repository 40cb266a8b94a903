"""A small client of the decision API (proto/authz/v1/decision.proto) for applications.

    with Client("authz.authz-system:9191", timeout=0.25) as authz:
        result = authz.decide(principal=peer_id, method="GET", path="/v1/tenants/acme/orders",
                              tenant="acme")
        if not result.allowed:
            abort(result.http_status)

``AsyncClient`` is the same over ``grpc.aio``. Both fail closed: a timeout, an unreachable
server, INVALID_ARGUMENT or any other error gives a deny ``Result`` whose ``error`` says
what happened (``raise_errors=True`` raises ``DecisionError`` instead). There is no
fail-open switch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from authz.v1 import decision_pb2, decision_pb2_grpc


class DecisionError(Exception):
    """No decision came back (``raise_errors=True``); the message says why."""


@dataclass(frozen=True, slots=True)
class Result:
    allowed: bool
    reason: str
    policy: str = ""
    rule: str = ""
    tenant: str = ""
    decision_id: str = ""
    revision: str = ""
    http_status: int = 403
    upstream_headers: Mapping[str, str] = field(default_factory=dict)
    # Set when the server gave no decision (the deny is the client's own): the gRPC code and detail.
    error: str = ""


@dataclass(frozen=True, slots=True)
class Explanation:
    result: Result
    text: str  # the trace as `authz check --explain` prints it
    steps: tuple[dict[str, Any], ...] = ()


def _request(principal: str, method: str, path: str, host: str, headers: Mapping[str, str] | None,
             tenant: str | None, destination_principal: str,
             context_extensions: Mapping[str, str] | None) -> decision_pb2.DecideRequest:
    req = decision_pb2.DecideRequest(
        principal=principal, method=method, path=path, host=host, headers=dict(headers or {}),
        destination_principal=destination_principal, context_extensions=dict(context_extensions or {}))
    if tenant is not None:
        req.tenant = tenant
    return req


def _result(resp: decision_pb2.DecideResponse) -> Result:
    return Result(resp.allowed, resp.reason, resp.policy, resp.rule, resp.tenant, resp.decision_id,
                  resp.revision, resp.http_status, dict(resp.upstream_headers))


def _explanation(resp: decision_pb2.ExplainResponse) -> Explanation:
    steps = tuple({"step": s.step, "ok": s.ok if s.HasField("ok") else None, "policy": s.policy,
                   "rule": s.rule, "detail": s.detail} for s in resp.steps)
    return Explanation(_result(resp.decision), resp.text, steps)


def _failed(exc: Exception, raise_errors: bool) -> Result:
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        detail = f"{code.name if code is not None else 'UNKNOWN'}: {exc.details()}"
    else:
        detail = f"{type(exc).__name__}: {exc}"
    if raise_errors:
        raise DecisionError(detail) from exc
    return Result(False, "no decision: " + detail, error=detail)


class Client:
    """Blocking client. ``target`` is host:port of the authz gRPC port; ``credentials`` gives
    TLS (default plaintext, as on a mesh-local port)."""

    def __init__(self, target: str, *, timeout: float = 1.0,
                 credentials: grpc.ChannelCredentials | None = None, raise_errors: bool = False) -> None:
        self.timeout = timeout
        self.raise_errors = raise_errors
        self._channel = (grpc.secure_channel(target, credentials) if credentials is not None
                         else grpc.insecure_channel(target))
        self._stub: Any = decision_pb2_grpc.DecisionServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def decide(self, *, principal: str = "", method: str, path: str, host: str = "",
               headers: Mapping[str, str] | None = None, tenant: str | None = None,
               destination_principal: str = "", context_extensions: Mapping[str, str] | None = None,
               timeout: float | None = None) -> Result:
        req = _request(principal, method, path, host, headers, tenant, destination_principal,
                       context_extensions)
        try:
            return _result(self._stub.Decide(req, timeout=timeout or self.timeout))
        except Exception as exc:  # noqa: BLE001 - fail closed on anything
            return _failed(exc, self.raise_errors)

    def explain(self, *, principal: str = "", method: str, path: str, host: str = "",
                headers: Mapping[str, str] | None = None, tenant: str | None = None,
                destination_principal: str = "", context_extensions: Mapping[str, str] | None = None,
                timeout: float | None = None) -> Explanation:
        req = _request(principal, method, path, host, headers, tenant, destination_principal,
                       context_extensions)
        try:
            return _explanation(self._stub.Explain(req, timeout=timeout or self.timeout))
        except Exception as exc:  # noqa: BLE001
            return Explanation(_failed(exc, self.raise_errors), "")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient:
    """The asyncio client: the same calls, awaited. Create it inside the running loop."""

    def __init__(self, target: str, *, timeout: float = 1.0,
                 credentials: grpc.ChannelCredentials | None = None, raise_errors: bool = False) -> None:
        self.timeout = timeout
        self.raise_errors = raise_errors
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                         else grpc.aio.insecure_channel(target))
        self._stub: Any = decision_pb2_grpc.DecisionServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def decide(self, *, principal: str = "", method: str, path: str, host: str = "",
                     headers: Mapping[str, str] | None = None, tenant: str | None = None,
                     destination_principal: str = "",
                     context_extensions: Mapping[str, str] | None = None,
                     timeout: float | None = None) -> Result:
        req = _request(principal, method, path, host, headers, tenant, destination_principal,
                       context_extensions)
        try:
            return _result(await self._stub.Decide(req, timeout=timeout or self.timeout))
        except Exception as exc:  # noqa: BLE001 - fail closed on anything
            return _failed(exc, self.raise_errors)

    async def explain(self, *, principal: str = "", method: str, path: str, host: str = "",
                      headers: Mapping[str, str] | None = None, tenant: str | None = None,
                      destination_principal: str = "",
                      context_extensions: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> Explanation:
        req = _request(principal, method, path, host, headers, tenant, destination_principal,
                       context_extensions)
        try:
            return _explanation(await self._stub.Explain(req, timeout=timeout or self.timeout))
        except Exception as exc:  # noqa: BLE001
            return Explanation(_failed(exc, self.raise_errors), "")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
