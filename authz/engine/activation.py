"""The CEL variables of one request (cel.VARIABLES), each looked up when a condition reads it.

A condition reads two or three of the 26 variables; the common one, ``source.principal in
tenant.callers``, reads two. Building all of them into a dict for every check (and a copy
with the tenant's for every rule with a condition) cost more than evaluating the condition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from authz.engine.model import Tenant
from authz.request import Request

_NO_CAPTURES: Mapping[str, str] = {}


class Activation(Mapping[str, Any]):
    """``request``'s variables, ``tenant``'s (when there is one; otherwise they are missing,
    a KeyError like any unknown name), the rule's path ``captures`` and the bundle's ``data``."""

    __slots__ = ("request", "data", "tenant", "captures")

    def __init__(self, request: Request, data: Mapping[str, Any], tenant: Tenant | None = None,
                 captures: Mapping[str, str] | None = None) -> None:
        self.request = request
        self.data = data
        self.tenant = tenant
        self.captures = captures or _NO_CAPTURES

    def __getitem__(self, name: str) -> Any:
        of_request = _REQUEST.get(name)
        if of_request is not None:
            return of_request(self)
        of_tenant = _TENANT.get(name)
        if of_tenant is None or self.tenant is None:
            raise KeyError(name)
        return of_tenant(self.tenant)

    def __iter__(self) -> Iterator[str]:
        yield from _REQUEST
        if self.tenant is not None:
            yield from _TENANT

    def __len__(self) -> int:
        return len(_REQUEST) + (len(_TENANT) if self.tenant is not None else 0)


def _source_part(part: str) -> Callable[[Activation], str]:
    def get(a: Activation) -> str:
        source = a.request.source
        return getattr(source, part) if source is not None else ""
    return get


_REQUEST: dict[str, Callable[[Activation], Any]] = {
    "request.method": lambda a: a.request.method,
    "request.path": lambda a: a.request.path,
    "request.query": lambda a: a.request.query,
    "request.host": lambda a: a.request.host,
    "request.scheme": lambda a: a.request.scheme,
    "request.protocol": lambda a: a.request.protocol,
    "request.id": lambda a: a.request.request_id,
    "request.headers": lambda a: a.request.headers,
    "request.path_params": lambda a: a.captures,
    "request.context_extensions": lambda a: a.request.context_extensions,
    "connection.sni": lambda a: a.request.sni,
    "source.principal": lambda a: a.request.principal,
    # As the native trustDomains field reads it: a SPIFFE ID without a path is in none.
    "source.trust_domain": lambda a: a.request.source.trust_domain if a.request.source and a.request.source.path else "",
    "source.namespace": _source_part("namespace"),
    "source.service_account": _source_part("service_account"),
    "source.address": lambda a: a.request.source_address,
    "source.port": lambda a: a.request.source_port,
    "destination.principal": lambda a: a.request.destination_principal,
    "destination.address": lambda a: a.request.destination_address,
    "destination.port": lambda a: a.request.destination_port,
    "data": lambda a: a.data,
}

_TENANT: dict[str, Callable[[Tenant], Any]] = {
    "tenant.id": lambda t: t.id,
    "tenant.plan": lambda t: t.plan,
    "tenant.flags": lambda t: t.flags,
    "tenant.callers": lambda t: t.cel_callers,
    "tenant.attributes": lambda t: t.attributes,
    # Not a CEL variable: what the native `source.principal in tenant.callers` reads.
    "tenant.callers_set": lambda t: t.callers,
}
