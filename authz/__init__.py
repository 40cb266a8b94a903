"""authz: an Envoy ext_authz policy decision service.

The library surface, for embedding the engine or testing bundles from Python:

    ps = load_policy_set(Path("policies/example"))
    decision = ps.decide(from_check_request(check_request, ps.trust_domains, ps.path_normalization, ps.xff_trusted_hops))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from authz.bundle.loader import BundleError
    from authz.engine.compile import load_policy_set
    from authz.engine.decide import PolicySet
    from authz.engine.model import Decision
    from authz.request import MalformedRequest, Request, from_check_request

# Imported on first use, so that `authz serve` starts (and takes over its signals) quickly.
_HOMES = {
    "BundleError": "authz.bundle.loader",
    "load_policy_set": "authz.engine.compile",
    "PolicySet": "authz.engine.decide",
    "Decision": "authz.engine.model",
    "MalformedRequest": "authz.request",
    "Request": "authz.request",
    "from_check_request": "authz.request",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'authz' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


__all__ = [
    "BundleError",
    "Decision",
    "MalformedRequest",
    "PolicySet",
    "Request",
    "from_check_request",
    "load_policy_set",
]
