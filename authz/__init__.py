"""authz: an Envoy ext_authz policy decision service.

The library surface, for embedding the engine or testing bundles from Python:

    ps = load_policy_set(Path("policies/example"))
    decision = ps.decide(from_check_request(check_request, ps.trust_domains, ps.path_normalization))
"""

from authz.bundle.loader import BundleError
from authz.engine.compile import load_policy_set
from authz.engine.decide import PolicySet
from authz.engine.model import Decision
from authz.request import MalformedRequest, Request, from_check_request

__all__ = [
    "BundleError",
    "Decision",
    "MalformedRequest",
    "PolicySet",
    "Request",
    "from_check_request",
    "load_policy_set",
]
