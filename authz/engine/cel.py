"""The one place that knows the CEL library (cel-expr-python, the CEL project's runtime).

Conditions see a flat, typed environment: every attribute is its own declared variable
(``request.method``, ``tenant.callers``...), so a misspelt field is a compile error with
a column, and a check passes only the few values an expression names instead of
converting whole nested maps on every request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cel_expr_python import cel

_T = cel.Type
_STR_MAP = _T.Map(_T.STRING, _T.STRING)
_DYN_MAP = _T.Map(_T.STRING, _T.DYN)

# The documented condition environment. Keep docs/bundle-format.md in step with it.
VARIABLES: dict[str, Any] = {
    "request.method": _T.STRING,
    "request.path": _T.STRING,
    "request.query": _T.STRING,
    "request.host": _T.STRING,
    "request.scheme": _T.STRING,
    "request.protocol": _T.STRING,
    "request.id": _T.STRING,
    "request.headers": _STR_MAP,
    "request.path_params": _STR_MAP,
    "request.context_extensions": _STR_MAP,
    "connection.sni": _T.STRING,
    "source.principal": _T.STRING,
    "source.trust_domain": _T.STRING,
    "source.namespace": _T.STRING,
    "source.service_account": _T.STRING,
    "source.address": _T.STRING,
    "source.port": _T.INT,
    "destination.principal": _T.STRING,
    "destination.address": _T.STRING,
    "destination.port": _T.INT,
    "tenant.id": _T.STRING,
    "tenant.plan": _T.STRING,
    "tenant.flags": _DYN_MAP,
    "tenant.callers": _T.Map(_T.STRING, _T.BOOL),
    "tenant.attributes": _DYN_MAP,
    "data": _DYN_MAP,
}

_ENV = cel.NewEnv(variables=VARIABLES)

# Longest names first so "request.path_params" is not taken for "request.path".
_NAME_RE = re.compile(
    r"(?<![\w.])("
    + "|".join(re.escape(n) for n in sorted(VARIABLES, key=len, reverse=True))
    + r")(?![\w])"
)
_ERROR_POS = re.compile(r"<input>:(\d+):(\d+): (.*)")
# The membership test authors write most; answered from a frozenset instead of a CEL map
# so its cost does not grow with the number of callers a tenant has.
_CALLER_MEMBERSHIP = re.compile(r"^\s*source\.principal\s+in\s+tenant\.callers\s*$")


class CelCompileError(ValueError):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line  # 1-based, inside the expression
        self.column = column  # 1-based, inside the expression


class CelEvalError(RuntimeError):
    """A condition could not be evaluated; the decision fails closed."""


_DATA_REF = re.compile(r"(?<![\w.])data\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*(?:'([^']*)'|\"([^\"]*)\")\s*\])")


@dataclass(frozen=True, slots=True)
class Condition:
    source: str
    variables: tuple[str, ...]
    needs_tenant: bool
    program: Any  # cel.Expression, or None for a native condition
    native: Callable[[Mapping[str, Any]], bool] | None = None

    @property
    def data_names(self) -> tuple[str, ...]:
        """Names of bundle data files the expression reads (data.<name> or data['name'])."""
        return tuple(next(g for g in m.groups() if g is not None) for m in _DATA_REF.finditer(self.source))


def compile_condition(expression: str) -> Condition:
    variables = tuple(sorted(set(_NAME_RE.findall(expression))))
    needs_tenant = any(v.startswith("tenant.") for v in variables)
    if _CALLER_MEMBERSHIP.match(expression):
        return Condition(expression, ("source.principal", "tenant.callers"), True, None, _caller_in_tenant)
    try:
        program = _ENV.compile(expression)
    except RuntimeError as exc:
        raise _compile_error(str(exc)) from None
    rtype = program.return_type()
    if rtype != _T.BOOL and rtype != _T.DYN:
        raise CelCompileError(f"condition must be a bool, this one is {rtype.name()}", 1, 1)
    return Condition(expression, variables, needs_tenant, program)


def _caller_in_tenant(ctx: Mapping[str, Any]) -> bool:
    return ctx["source.principal"] in ctx["tenant.callers_set"]


def evaluate(condition: Condition, ctx: Mapping[str, Any]) -> bool:
    """True or False; raises CelEvalError for an error or a non-bool result."""
    if condition.native is not None:
        return condition.native(ctx)
    try:
        result = condition.program.eval(data={name: ctx[name] for name in condition.variables})
    except KeyError as exc:
        raise CelEvalError(f"no value for {exc.args[0]}") from None
    except RuntimeError as exc:
        raise CelEvalError(str(exc)) from None
    value = result.value()
    if value is True or value is False:
        return value
    if result.type() == _T.ERROR:
        raise CelEvalError(str(value))
    raise CelEvalError(f"condition gave {result.type().name()}, not a bool")


def _compile_error(text: str) -> CelCompileError:
    for line in text.splitlines():
        m = _ERROR_POS.search(line)
        if m:
            message = m.group(3).removesuffix(" [INVALID_ARGUMENT]")
            return CelCompileError(message, int(m.group(1)), int(m.group(2)))
    return CelCompileError(text.strip(), 1, 1)
