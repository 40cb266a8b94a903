"""Validate Kubernetes manifests against a CRD's structural schema the way the API server does.

Types, enums, required fields, unknown fields (which the API server would prune silently,
so a typo would vanish) and the CRD's CEL rules (x-kubernetes-validations), evaluated with
the CEL project's runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from cel_expr_python import cel

_ENV = cel.NewEnv(variables={"self": cel.Type.DYN})
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}


def load_crds(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every CRD."""
    out = {}
    for path in sorted(directory.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def validate(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    _walk(body, schema, "", errors)
    if not obj.get("metadata", {}).get("name"):
        errors.append("metadata.name: required")
    return errors


def _walk(value: Any, schema: dict[str, Any], where: str, errors: list[str]) -> None:
    expected = schema.get("type")
    if expected and not (isinstance(value, _TYPES[expected]) and not (expected == "integer" and isinstance(value, bool))):
        if not (value is None and schema.get("nullable")):
            errors.append(f"{where or '.'}: expected {expected}, got {type(value).__name__}")
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not one of {schema['enum']}")
    if "maxItems" in schema and isinstance(value, list) and len(value) > schema["maxItems"]:
        errors.append(f"{where}: more than {schema['maxItems']} items")
    if isinstance(value, dict):
        props = schema.get("properties")
        for req in schema.get("required", []):
            if req not in value:
                errors.append(f"{where}.{req}: required")
        for key, child in value.items():
            if props is not None and key in props:
                _walk(child, props[key], f"{where}.{key}", errors)
            elif isinstance(schema.get("additionalProperties"), dict):
                _walk(child, schema["additionalProperties"], f"{where}.{key}", errors)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{where}.{key}: unknown field (the API server would drop it)")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _walk(item, schema["items"], f"{where}[{i}]", errors)
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        result = _ENV.compile(rule["rule"]).eval(data={"self": value})
        if result.value() is not True:
            errors.append(f"{where or '.'}: {rule.get('message', rule['rule'])}")
