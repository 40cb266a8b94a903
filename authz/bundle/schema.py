"""The bundle file formats, as JSON Schema, and the validator the loader runs.

One schema serves three purposes: the loader validates every file against it (so an
unknown field is an error at its line and column), ``authz schema`` prints it for
editors, and the docs describe the same fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from authz.bundle.yamlpos import Document, Path, Position

API_VERSION = "authz/v1"

_STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 1}}


def _strings(description: str) -> dict[str, Any]:
    return {**_STRINGS, "description": description}


_MATCH_NOTE = (
    " Each value matches exactly, as a prefix ('abc*'), as a suffix ('*abc') or, as '*', "
    "any non-empty value."
)

SOURCE: dict[str, Any] = {
    "type": "object",
    "description": "Who sends the request. All fields given must match; within a field any value.",
    "additionalProperties": False,
    "properties": {
        "principals": _strings(
            "SPIFFE IDs of the caller, with or without 'spiffe://'; 'td/ns/x/sa/y' in the bundle's trust "
            "domain, an alias or cluster.local stands for every trust domain of the bundle." + _MATCH_NOTE),
        "notPrincipals": _strings("The caller must match none of these." + _MATCH_NOTE),
        "trustDomains": _strings("Trust domain of the caller's SPIFFE ID." + _MATCH_NOTE),
        "notTrustDomains": _strings("Trust domains the caller must not be in." + _MATCH_NOTE),
        "namespaces": _strings("Namespace of the caller: its principal contains '/ns/<name>/' ('*' in a "
                               "value matches any characters)."),
        "notNamespaces": _strings("Namespaces the caller must not be in."),
        "serviceAccounts": _strings("Service accounts as '<namespace>/<name>', or '<name>' in the policy's "
                                    "namespace."),
        "notServiceAccounts": _strings("Service accounts the caller must not be."),
        "ipBlocks": _strings("Peer addresses or CIDR blocks of the caller."),
        "notIpBlocks": _strings("Peer addresses or CIDR blocks the caller must not be in."),
        "remoteIpBlocks": _strings("Original client addresses (x-forwarded-for / x-envoy-external-address)."),
        "notRemoteIpBlocks": _strings("Original client addresses that must not match."),
    },
}

OPERATION: dict[str, Any] = {
    "type": "object",
    "description": "What the request does. All fields given must match; within a field any value.",
    "additionalProperties": False,
    "properties": {
        "methods": _strings("HTTP methods, exact and case-sensitive (write them upper case)." + _MATCH_NOTE),
        "notMethods": _strings("HTTP methods that must not match."),
        "paths": _strings(
            "Paths (query excluded, normalised). Exact, 'prefix*', '*suffix', '*', or a "
            "template with {*} (one segment), {**} (the rest) and captures like {tenant}."
        ),
        "notPaths": _strings("Paths that must not match."),
        "hosts": _strings("Hosts (case-insensitive, with or without port)." + _MATCH_NOTE),
        "notHosts": _strings("Hosts that must not match."),
        "ports": _strings("Destination ports, as strings."),
        "notPorts": _strings("Destination ports that must not match."),
        "headers": {"type": "object", "additionalProperties": _STRINGS,
                    "description": "Request headers (name -> values); every header named must match one of "
                                   "its values; '*' matches a header that is present, even empty."},
        "notHeaders": {"type": "object", "additionalProperties": _STRINGS,
                       "description": "Request headers that must not match any of the values given."},
        "sni": _strings("TLS server name (SNI) of the connection." + _MATCH_NOTE),
        "notSni": _strings("SNI values that must not match."),
        "destinationIpBlocks": _strings("Destination addresses or CIDR blocks."),
        "notDestinationIpBlocks": _strings("Destination addresses or CIDR blocks that must not match."),
    },
}

RULE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                 "description": "Names the rule in decisions, audit records and coverage."},
        "from": {
            "type": "array",
            "description": "Any one entry must match (OR).",
            "items": {"type": "object", "additionalProperties": False, "required": ["source"],
                      "properties": {"source": SOURCE}},
        },
        "to": {
            "type": "array",
            "description": "Any one entry must match (OR).",
            "items": {"type": "object", "additionalProperties": False, "required": ["operation"],
                      "properties": {"operation": OPERATION}},
        },
        "when": {
            "type": "array",
            "description": "CEL conditions; all must be true. An error denies the request.",
            "items": {"type": "string", "minLength": 1},
        },
        "upstreamHeaders": {
            "type": "object",
            "description": "ALLOW rules: headers added to the request the upstream receives, each a CEL "
                           "expression giving a string over request.*, source.*, tenant.*, data "
                           "(e.g. x-tenant-plan: tenant.plan). Lower-case names; never x-authz-* or "
                           "x-envoy-*; at most 16; a failing expression denies.",
            "additionalProperties": {"type": "string", "minLength": 1},
        },
        "removeHeaders": _strings("ALLOW rules: request headers removed before the upstream sees them "
                                  "(e.g. cookie); at most 32."),
    },
}

DENY_RESPONSE: dict[str, Any] = {
    "type": "object",
    "description": "How a deny looks to the client: status and a short public message.",
    "additionalProperties": False,
    "properties": {
        "status": {"enum": [401, 403, 404, 429], "description": "HTTP status (default 403)."},
        "message": {"type": "string", "description": "Public text in the JSON body (at most 256 characters)."},
    },
}

TENANT_SOURCE: dict[str, Any] = {
    "type": "object",
    "description": "Where the tenant id comes from: exactly one of the fields.",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {
        "pathCapture": {"type": "string", "description": "Name of a capture in the rule paths, e.g. 'tenant' for {tenant}."},
        "header": {"type": "string", "description": "Request header carrying the tenant id."},
        "principalSegment": {"type": "string", "description": "SPIFFE path key whose next segment is the tenant, e.g. 'ns'."},
    },
}

POLICY: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "authz policy",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "name", "action"],
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "Policy"},
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "description": {"type": "string"},
        "action": {"enum": ["ALLOW", "DENY", "AUDIT"]},
        "namespace": {"type": "string", "minLength": 1,
                      "description": "The policy's namespace (Istio metadata.namespace): what a service account "
                                     "without '<namespace>/' is in."},
        "dryRun": {"type": "boolean", "description": "Evaluate and record, never enforce."},
        "target": {
            "type": "object",
            "description": "The workload this policy protects; all given fields must match. Empty: every workload.",
            "additionalProperties": False,
            "properties": {
                "principals": _strings("Destination SPIFFE IDs." + _MATCH_NOTE),
                "hosts": _strings("Request hosts." + _MATCH_NOTE),
                "ports": _strings("Destination ports, as strings."),
                "contextExtensions": {"type": "object", "additionalProperties": {"type": "string"},
                                      "description": "Envoy context_extensions that must all be equal."},
            },
        },
        "tenant": TENANT_SOURCE,
        "rules": {"type": "array", "items": RULE},
        "denyResponse": {**DENY_RESPONSE, "description": "DENY policies: the response when one of "
                                                         "their rules denies."},
    },
}

MANIFEST: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "authz bundle manifest (bundle.yaml)",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "name", "revision", "trustDomain"],
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "Bundle"},
        "name": {"type": "string", "minLength": 1},
        "revision": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "trustDomain": {"type": "string", "pattern": r"^[a-z0-9._-]+$"},
        "trustDomainAliases": {"type": "array", "items": {"type": "string", "pattern": r"^[a-z0-9._-]+$"}},
        "defaultAction": {"enum": ["ALLOW", "DENY"], "description": "When no ALLOW policy applies. Default DENY."},
        "pathNormalization": {
            "enum": ["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"],
            "description": "What the proxy in front of authz does to paths (Istio meshConfig pathNormalization). "
                           "Default BASE.",
        },
        "xffTrustedHops": {
            "type": "integer", "minimum": 0, "maximum": 16,
            "description": "The proxy's xff_num_trusted_hops (Istio numTrustedProxies): which x-forwarded-for "
                           "entry is the original client for remoteIpBlocks. Default 0.",
        },
        "xffSkipAppend": {
            "type": "boolean",
            "description": "The proxy uses its peer address (use_remote_address) and does not append it to "
                           "x-forwarded-for (skip_xff_append): xffTrustedHops then count from the header as sent. "
                           "Default false.",
        },
        "denyResponse": {**DENY_RESPONSE, "description": "Every deny without a DENY policy's own "
                                                         "denyResponse: status and message."},
    },
}

TENANTS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "authz tenant data",
    "type": "object",
    "additionalProperties": False,
    "required": ["tenants"],
    "properties": {
        "tenants": {
            "type": "object",
            "description": "Tenant id -> its data. Ids: 1-63 of [A-Za-z0-9._-], starting with a letter or digit.",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "callers": _strings("SPIFFE IDs allowed to act for this tenant."),
                    "plan": {"type": "string"},
                    "flags": {"type": "object", "description": "Feature flags (any JSON values)."},
                    "attributes": {"type": "object", "description": "Anything else, visible to CEL as tenant.attributes."},
                },
            },
        }
    },
}

_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}

TEST_REQUEST: dict[str, Any] = {
    "type": "object",
    "description": "A request in short form; it is turned into an Envoy CheckRequest.",
    "additionalProperties": False,
    "properties": {
        "principal": {"type": "string", "description": "SPIFFE ID of the caller (source.principal); omit for none."},
        "destination": {"type": "string", "description": "SPIFFE ID of the workload called (destination.principal)."},
        "method": {"type": "string", "description": "HTTP method. Default GET."},
        "path": {"type": "string", "description": "Raw request path, query included. Default '/'."},
        "host": {"type": "string", "description": "Host / :authority."},
        "headers": {**_STRING_MAP, "description": "Request headers (names are lower-cased)."},
        "sourceAddress": {"type": "string", "description": "Peer IP address of the caller."},
        "destinationAddress": {"type": "string", "description": "IP address of the workload called."},
        "port": {"type": "integer", "description": "Destination port."},
        "contextExtensions": {**_STRING_MAP, "description": "Envoy context_extensions."},
    },
}

TEST_EXPECT: dict[str, Any] = {
    "type": "object",
    "description": "What must come back; only the fields given are compared.",
    "additionalProperties": False,
    "properties": {
        "allowed": {"type": "boolean"},
        "status": {"type": "integer", "description": "HTTP status: 200 when allowed, 403 when denied."},
        "policy": {"type": "string", "description": "Deciding policy, or 'default'."},
        "rule": {"type": "string", "description": "Deciding rule, or 'default'."},
        "reason": {"type": "string", "description": "Decision reason, e.g. 'denied by default'."},
        "tenant": {"type": ["string", "null"], "description": "Tenant of the decision; null for none."},
        "headers": {
            "type": "object",
            "description": "Headers sent upstream (x-authz-tenant, x-authz-principal...); null: must be absent.",
            "additionalProperties": {"type": ["string", "null"]},
        },
    },
}

BUNDLE_TEST: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "authz bundle test (tests/*.yaml)",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "name", "cases"],
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "BundleTest"},
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "cases": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "expect"],
                "description": "One request and its expected decision: give request or checkRequest.",
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "description": {"type": "string"},
                    "request": TEST_REQUEST,
                    "checkRequest": {"type": "object",
                                     "description": "An Envoy CheckRequest in protobuf JSON."},
                    "expect": TEST_EXPECT,
                },
            },
        },
    },
}


def _embedded(schema: dict[str, Any]) -> dict[str, Any]:
    # "$schema" belongs at the root of a schema resource only.
    return {k: v for k, v in schema.items() if k != "$schema"}


BUNDLE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://authz.dev/schema/bundle-v1.json",
    "title": "authz bundle file (manifest, policy, tenant data or bundle test)",
    "oneOf": [_embedded(s) for s in (MANIFEST, POLICY, TENANTS, BUNDLE_TEST)],
}


@dataclass(frozen=True, slots=True)
class Problem:
    position: Position
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.position}: {self.severity}: {self.message}"


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "null": (type(None),),
}


def validate(doc: Document, schema: dict[str, Any], path: Path = ()) -> list[Problem]:
    """Validate the part of ``doc`` at ``path``; problems carry file:line:column."""
    value: Any = doc.value
    for part in path:
        value = value[part]
    problems: list[Problem] = []
    _check(doc, value, schema, path, problems)
    return problems


def _check(doc: Document, value: Any, schema: dict[str, Any], path: Path, out: list[Problem]) -> None:
    where = doc.at(path)
    name = "/".join(str(p) for p in path) or "document"
    if "const" in schema and value != schema["const"]:
        out.append(Problem(where, f"{name} must be {schema['const']!r}, got {value!r}"))
        return
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(str(v) for v in schema["enum"])
        out.append(Problem(where, f"{name} must be one of {choices}, got {value!r}"))
        return
    expected = schema.get("type")
    if expected is not None:
        kinds: list[str] = expected if isinstance(expected, list) else [expected]
        ok = any(isinstance(value, _TYPES[t]) and not (t == "integer" and isinstance(value, bool))
                 for t in kinds)
        if not ok:
            wanted = " or ".join(f"{'an' if t[0] in 'aeiou' else 'a'} {t}" for t in kinds)
            out.append(Problem(where, f"{name} must be {wanted}, got {_kind(value)}"))
            return
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append(Problem(where, f"{name} must not be empty"))
        pattern = schema.get("pattern")
        if pattern and not re.match(pattern, value):
            out.append(Problem(where, f"{name} {value!r} does not match {pattern}"))
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for req in schema.get("required", []):
            if req not in value:
                out.append(Problem(where, f"{name} is missing required field '{req}'"))
        if "minProperties" in schema and len(value) < schema["minProperties"] or (
            "maxProperties" in schema and len(value) > schema["maxProperties"]
        ):
            fields = ", ".join(props)
            out.append(Problem(where, f"{name} needs exactly one of: {fields}"))
        for key, child in value.items():
            child_path = (*path, key)
            if key in props:
                _check(doc, child, props[key], child_path, out)
            elif extra is False:
                known = ", ".join(props) or "none"
                out.append(Problem(doc.at(child_path, key=True), f"unknown field '{key}' in {name} (known: {known})"))
            elif isinstance(extra, dict):
                _check(doc, child, extra, child_path, out)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(doc, item, schema["items"], (*path, i), out)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"
