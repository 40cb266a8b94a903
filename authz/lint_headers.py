"""`authz lint` warning for policy-set upstream headers that could carry a secret.

An ALLOW rule's ``upstreamHeaders`` copy request or tenant data to the upstream. A header
whose name or expression mentions a credential (authorization, cookie, token, secret,
password, API key, session, private key) would hand that secret to the upstream and to
whatever it logs; the author should confirm that is meant. lint.py calls ``secret_headers``.
"""

from __future__ import annotations

from authz.bundle.loader import BundleFiles
from authz.bundle.schema import Problem
from authz.redact import SECRET_WORDS



def secret_headers(files: BundleFiles) -> list[Problem]:
    out: list[Problem] = []
    for doc in files.policies:
        if not isinstance(doc.value, dict):
            continue
        for i, rule in enumerate(doc.value.get("rules") or []):
            headers = rule.get("upstreamHeaders") if isinstance(rule, dict) else None
            if not isinstance(headers, dict):
                continue
            for name, expression in headers.items():
                hit = SECRET_WORDS.search(str(name)) or SECRET_WORDS.search(str(expression))
                if hit is None:
                    continue
                out.append(Problem(doc.at(("rules", i, "upstreamHeaders", name)),
                                   f"upstream header {name!r} may carry a secret ({hit.group(0)!r} in "
                                   f"{'its name' if SECRET_WORDS.search(str(name)) else 'its expression'}): "
                                   "the upstream and its logs would see it", "warning"))
    return out
