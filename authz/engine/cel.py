"""The one place that knows the CEL library (cel-expr-python, the CEL project's runtime).

Conditions see a flat, typed environment: every attribute is its own declared variable
(``request.method``, ``tenant.callers``...), so a misspelt field is a compile error with
a column, and a check passes only the few values an expression names instead of
converting whole nested maps on every request.
"""

from __future__ import annotations

import re
import time
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
# String literals (raw, bytes, triple-quoted too) and comments: blanked before names are
# looked for, so `request.headers['tenant.plan']` reads no tenant.
_LITERAL_OR_COMMENT = re.compile(
    r"""[rRbB]{0,2}(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')|//[^\n]*""")
# The roots of the dotted variables: `tenant . plan` or `(tenant).plan` compile, and then
# name nothing an activation holds; every check would be a condition error.
_ROOTS = re.compile(r"(?<![\w.])(tenant|request|source|destination|connection)(?![\w])")
# CEL's root-scope dot (`.request.path`): the same variable, which the name search above
# would miss; refused rather than read, one spelling being enough.
_ROOT_DOT = re.compile(r"(?:^|(?<=[^\w)\]}\s.]))\s*(\.)\s*(?:tenant|request|source|destination|connection|data)(?![\w])")
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


class CelBudgetError(CelEvalError):
    """A condition over its cost budget (inputs too large, or too slow): denied."""


# Cost bounds: what one condition may cost a check (docs/bundle-format.md). The CEL runtime
# offers no cost limit of its own, so the bound is made of three parts:
# - compile time: at most MAX_NESTED_COMPREHENSIONS macros (all, exists, exists_one, map,
#   filter) inside each other, so no condition is worse than quadratic in its inputs;
# - inputs: a string from the request longer than MAX_INPUT_CHARS, or a request map with
#   more than MAX_MAP_INPUT_CHARS of keys and values, is not handed to CEL at all;
# - run time: the runtime stops a comprehension after 10,000 iterations, and an evaluation
#   that took longer than EVAL_BUDGET_SECONDS is denied all the same (the bounds above keep
#   that rare and short; it cannot be interrupted once started).
MAX_NESTED_COMPREHENSIONS = 2
# Above what the request limits let through with their defaults (64 KiB paths, 96 KiB of
# headers): a request Envoy passes is decided, not denied over budget.
MAX_INPUT_CHARS = 64 * 1024
MAX_MAP_INPUT_CHARS = 96 * 1024
EVAL_BUDGET_SECONDS = 0.05
_REQUEST_MAPS = frozenset({"request.headers", "request.path_params", "request.context_extensions"})
_MACRO = re.compile(r"\.\s*(all|exists_one|exists|map|filter)\s*\(")


_DATA_REF = re.compile(r"(?<![\w.])data\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*(?:'([^']*)'|\"([^\"]*)\")\s*\])")


@dataclass(frozen=True, slots=True)
class Condition:
    source: str
    variables: tuple[str, ...]
    needs_tenant: bool
    program: Any  # cel.Expression, or None for a native condition
    native: Callable[[Mapping[str, Any]], bool] | None = None
    # The headers it reads by a literal name ('*': some other way), set at load
    # (authz.engine.compile): a DENY reads each as any of the lines it may have come in.
    headers_read: tuple[str, ...] = ()

    @property
    def data_names(self) -> tuple[str, ...]:
        """Names of bundle data files the expression reads (data.<name> or data['name'])."""
        return tuple(next(g for g in m.groups() if g is not None) for m in _DATA_REF.finditer(self.source))


def cel_code(expression: str) -> str:
    """``expression`` with its strings emptied and its comments dropped: what is code."""
    return _LITERAL_OR_COMMENT.sub(lambda m: '""' if m.group(0)[:2] != "//" else "", expression)


def cel_code_blanked(expression: str) -> str:
    """``expression`` with the inside of its strings and its comments blanked, positions kept:
    a match in it is a match in code, at the same place in ``expression``."""
    def blank(m: re.Match[str]) -> str:
        t = m.group(0)
        if t.startswith("//"):
            return " " * len(t)
        q = len(t) - len(t.lstrip("rRbB"))  # prefix letters, then the quotes stay
        quote = 3 if t[q:q + 3] in ('"""', "'''") else 1
        return t[:q + quote] + " " * (len(t) - 2 * quote - q) + t[len(t) - quote:]
    return _LITERAL_OR_COMMENT.sub(blank, expression)


def _variables(expression: str) -> tuple[str, ...]:
    """The variables ``expression`` reads, found in its code (not its strings or comments).
    Raises CelCompileError for a variable spelled so that it would name nothing."""
    code = cel_code(expression)
    dot = _ROOT_DOT.search(cel_code_blanked(expression))
    if dot is not None:
        before = expression[:dot.start(1)]
        raise CelCompileError("write the variable without the leading '.'", before.count("\n") + 1,
                              dot.start(1) - (before.rfind("\n") + 1) + 1)
    for m in _ROOTS.finditer(code):
        if not _NAME_RE.match(code, m.start()):
            before = code[:m.start()]
            raise CelCompileError(
                f"write {m.group(1)}.<field> with nothing between the name, the dot and the field "
                f"(variables: {', '.join(v for v in VARIABLES if v.startswith(m.group(1) + '.'))})",
                before.count("\n") + 1, m.start() - (before.rfind("\n") + 1) + 1)
    return tuple(sorted(set(_NAME_RE.findall(code))))


# A header name with upper case used on request.headers, whose keys are lower case: it never
# matches, and a DENY written with it would never fire.
_UPPER_HEADER = re.compile(
    r"""request\.headers\s*\[\s*(?P<q1>['"])(?P<k1>[^'"]*[A-Z][^'"]*)(?P=q1)\s*\]"""
    r"""|(?P<q2>['"])(?P<k2>[^'"]*[A-Z][^'"]*)(?P=q2)[\s)]*\s+in\s+request\.headers(?![\w.])"""
    r"""|request\.headers\.(?P<k3>\w*[A-Z]\w*)""")


def _header_names_in_lower_case(expression: str) -> None:
    m = _UPPER_HEADER.search(expression)
    if m is not None:
        name = m.group("k1") or m.group("k2") or m.group("k3")
        before = expression[:m.start()]
        raise CelCompileError(f"request.headers has lower-case names: {name!r} never matches, write "
                              f"{name.lower()!r}", before.count("\n") + 1, m.start() - (before.rfind("\n") + 1) + 1)


# A comprehension over a bundle data collection: `data.users.map(u, ...)`, `data['a'].b.exists(...)`.
_DATA_COMPREHENSION = re.compile(
    r"(?<![\w.])data((?:\s*\.\s*\w+|\s*\[\s*(?:'[^']*'|\"[^\"]*\")\s*\])+)\s*\.\s*"
    r"(all|exists_one|exists|map|filter)\s*\(")
_SEGMENT = re.compile(r"\.\s*(\w+)|\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]")


def data_comprehensions(expression: str) -> list[tuple[tuple[str, ...], str, int, bool]]:
    """(path under `data`, macro, column, whether its body copies request input) of each
    comprehension whose range is a data collection, found in the code (not in strings or
    comments): its size is known at load."""
    code = cel_code_blanked(expression)
    bound = _bound_to_request(code)
    out = []
    for m in _DATA_COMPREHENSION.finditer(code):
        # the path's names come from the expression itself (string keys were blanked in code)
        segments = tuple(next(g for g in seg.groups() if g is not None)
                         for seg in _SEGMENT.finditer(expression[m.start(1):m.end(1)]))
        out.append((segments, m.group(2), m.start() + 1,
                    _copies_request_input(_body(code, m.end() - 1), bound)))
    return out


# `request.path + '/'`, `x + request.headers['a']`: a copy of a request input (up to 64 KiB)
# at every iteration, which the runtime keeps until the evaluation ends (9,000 items over a
# 64 KB path held 600 MB).
_REQUEST_CONCAT = re.compile(
    r"(?<![\w.])request\.\w+(?:\s*\.\s*\w+|\s*\[[^\]]*\])*[\s)]*\+(?!\+)"
    r"|\+[\s(]*(?:string\s*\()?[\s(]*request\.\w+")
# A request input turned into a number: `size(request.headers[k]) + 1` adds numbers.
_AS_NUMBER = re.compile(r"(?<![\w.])(?:size|int|uint|double)\s*\([^()]*\)")


def _copies_request_input(body: str, bound: frozenset[str] = frozenset()) -> bool:
    """Whether ``body`` concatenates a request input: a request variable, or a comprehension
    variable ``bound`` to one (`[request.path].exists(p, p + x ...)`), also in parentheses
    or through string()."""
    body = _AS_NUMBER.sub("0", body)
    if _REQUEST_CONCAT.search(body) is not None:
        return True
    return any(re.search(rf"(?<![\w.]){v}[\s)]*\+(?!\+)|\+[\s(]*(?:string\s*\()?[\s(]*{v}(?![\w])", body)
               for v in bound)


def _bound_to_request(code: str) -> frozenset[str]:
    """Variables of comprehensions whose range holds a request input."""
    out: set[str] = set()
    for m in _MACRO.finditer(code):
        receiver = _receiver(code, m.start())
        var = _FIRST_NAME.match(code, m.end())
        if var is not None and ("request." in receiver or any(
                re.search(rf"(?<![\w.]){v}(?![\w])", receiver) for v in out)):
            out.add(var.group(1))
    return frozenset(out)


_FIRST_NAME = re.compile(r"\s*([A-Za-z_]\w*)\s*,")


def _receiver(code: str, dot: int) -> str:
    """The expression before ``.macro(`` at ``dot``: names, dots and bracketed groups."""
    i = dot
    while i > 0:
        ch = code[i - 1]
        if ch in ")]":
            depth, j = 0, i - 1
            while j >= 0:
                depth += code[j] in ")]"
                depth -= code[j] in "(["
                if not depth:
                    break
                j -= 1
            i = j
        elif ch.isalnum() or ch in "_.":
            i -= 1
        else:
            break
    return code[i:dot]


def _body(code: str, open_paren: int) -> str:
    """The text between the parenthesis at ``open_paren`` and the one that closes it."""
    depth = 0
    for i in range(open_paren, len(code)):
        if code[i] == "(":
            depth += 1
        elif code[i] == ")":
            depth -= 1
            if not depth:
                return code[open_paren + 1:i]
    return code[open_paren + 1:]


def _request_copies_in_comprehensions(expression: str) -> int:
    """The column of a comprehension that copies a request input at every iteration over a
    range not sized at load (a request map, a computed list), or 0. Over a data collection
    the size is checked at load (authz.engine.compile, data_cost)."""
    code = cel_code_blanked(expression)
    sized = {m.end() - 1 for m in _DATA_COMPREHENSION.finditer(code)}
    bound = _bound_to_request(code)
    for m in _MACRO.finditer(code):
        if m.end() - 1 not in sized and _copies_request_input(_body(code, m.end() - 1), bound):
            return m.start() + 1
    return 0


# '!' as a CEL string escape would write it: the literal's text alone would hide it.
_BANG_ESCAPE = re.compile(r"\\(?:x21|u0021|U00000021|041)", re.IGNORECASE)


def _no_bang_beside_headers(expression: str, variables: tuple[str, ...]) -> None:
    """Envoy sends ext_authz each header byte that is not UTF-8 as '!' (authz.engine.compile
    refuses the same in header patterns): `x-ver: v1\\xff` arrives as `v1!`, so a condition
    comparing a header with a string holding '!' cannot tell them apart. Refused whichever way
    the comparison goes: `==` would allow what the upstream reads otherwise, `!=` would let
    it past a DENY."""
    if "request.headers" not in variables:
        return
    for m in _LITERAL_OR_COMMENT.finditer(expression):
        text = m.group(0)
        if text.startswith("//") or not ("!" in text or _BANG_ESCAPE.search(text)):
            continue
        before = expression[:m.start()]
        raise CelCompileError(
            "a string with '!' in a condition that reads request.headers: Envoy sends ext_authz "
            "each byte of a header value that is not UTF-8 as '!', so it could not be told apart",
            before.count("\n") + 1, m.start() - (before.rfind("\n") + 1) + 1)


def compile_condition(expression: str) -> Condition:
    if _CALLER_MEMBERSHIP.match(expression):
        return Condition(expression, ("source.principal", "tenant.callers"), True, None, _caller_in_tenant)
    try:
        program = _ENV.compile(expression)  # first: its errors (a misspelt name) say more
    except RuntimeError as exc:
        raise _compile_error(str(exc)) from None
    variables = _variables(expression)
    _header_names_in_lower_case(expression)
    _no_bang_beside_headers(expression, variables)
    needs_tenant = any(v.startswith("tenant.") for v in variables)
    _regexes_compile(expression)
    depth, column = _comprehension_depth(expression)
    if depth > MAX_NESTED_COMPREHENSIONS:
        raise CelCompileError(
            f"condition too expensive: {depth} comprehensions nested (at most "
            f"{MAX_NESTED_COMPREHENSIONS}); its cost would grow as its input to the power {depth}",
            1, column)
    copies = _request_copies_in_comprehensions(expression)
    if copies:
        before = expression[:copies - 1]
        raise CelCompileError(
            "condition too expensive: a comprehension over a range not sized at load copies a request "
            "input at every iteration (`request.path + ...`); compare without concatenating "
            "(startsWith, endsWith, contains) or iterate over bundle data",
            before.count("\n") + 1, copies - (before.rfind("\n") + 1))
    rtype = program.return_type()
    if rtype != _T.BOOL and rtype != _T.DYN:
        raise CelCompileError(f"condition must be a bool, this one is {rtype.name()}", 1, 1)
    return Condition(expression, variables, needs_tenant, program)


# `x.matches('...')` with a literal pattern: compiled at load. The runtime compiles it at each
# evaluation, and an invalid one (`^/admin(`) denied every request with `condition error`.
_LITERAL_MATCHES = re.compile(
    r"""\.\s*matches\s*\(\s*([rR]?(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"))\s*\)""")


_GLOBAL_MATCHES = re.compile(r"(?<![\w.])matches\s*\(")
_LITERAL = re.compile(r"""\s*([rR]?(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"))\s*""")


def _regexes_compile(expression: str) -> None:
    code = cel_code_blanked(expression)
    patterns = [(m.start(1), m.group(1)) for m in _LITERAL_MATCHES.finditer(expression) if code[m.start()] == "."]
    for m in _GLOBAL_MATCHES.finditer(code):  # matches(x, '...')
        args = _body(code, m.end() - 1)
        comma = _top_level_comma(args)
        if comma >= 0:
            start = m.end() + comma + 1
            lit = _LITERAL.fullmatch(expression, start, m.end() + len(args))
            if lit is not None:
                patterns.append((lit.start(1), lit.group(1)))
    for at, literal in patterns:
        try:
            result = _ENV.compile(f"''.matches({literal})").eval(data={})
        except RuntimeError:
            continue  # not a plain literal after all: the runtime reports it
        if result.type() == _T.ERROR:
            before = expression[:at]
            raise CelCompileError(str(result.value()).removeprefix("INVALID_ARGUMENT: "),
                                  before.count("\n") + 1, at - (before.rfind("\n") + 1) + 1)


def _top_level_comma(args: str) -> int:
    depth = 0
    for i, ch in enumerate(args):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and not depth:
            return i
    return -1


def _caller_in_tenant(ctx: Mapping[str, Any]) -> bool:
    try:
        callers = ctx["tenant.callers_set"]
    except KeyError:  # no tenant: an error, as CEL's own evaluation would give
        raise CelEvalError("no value for tenant.callers") from None
    return ctx["source.principal"] in callers


def evaluate(condition: Condition, ctx: Mapping[str, Any]) -> bool:
    """True or False; raises CelEvalError for an error or a non-bool result."""
    if condition.native is not None:
        return condition.native(ctx)
    value, rtype = _run(condition, ctx, "condition")
    if value is True or value is False:
        return value
    raise CelEvalError(f"condition gave {rtype.name()}, not a bool")


def _run(expression: Condition, ctx: Mapping[str, Any], what: str) -> tuple[Any, Any]:
    """(value, type) of a compiled expression within the cost bounds; CelEvalError for an
    error value, CelBudgetError past a bound."""
    data = {}
    for name in expression.variables:
        try:
            data[name] = ctx[name]
        except KeyError:  # no tenant: left out, CEL reads the name as an error, which `a || b`
            pass  # and `a && b` absorb as CEL says (`true || tenant.plan == "x"` is true)
    for name, value in data.items():
        _check_input(name, value)
    started = time.perf_counter()
    try:
        result = expression.program.eval(data=data)
    except RuntimeError as exc:
        if "budget exceeded" in str(exc):  # the runtime's own bound: 10,000 iterations
            raise CelBudgetError(f"{what} over its budget: {exc}") from None
        raise CelEvalError(str(exc)) from None
    value = result.value()
    if time.perf_counter() - started > EVAL_BUDGET_SECONDS:
        raise CelBudgetError(f"{what} took over its budget of {EVAL_BUDGET_SECONDS * 1000:.0f} ms")
    rtype = result.type()
    if rtype == _T.ERROR:  # an error's value is its message, a str: test the type first
        raise CelEvalError(str(value))
    return value, rtype


def _check_input(name: str, value: Any) -> None:
    if isinstance(value, str):
        if len(value) > MAX_INPUT_CHARS:
            raise CelBudgetError(f"condition input {name} is over {MAX_INPUT_CHARS} characters")
    elif (name in _REQUEST_MAPS and value
          and sum(map(len, value)) + sum(map(len, value.values())) > MAX_MAP_INPUT_CHARS):
        raise CelBudgetError(f"condition input {name} is over {MAX_MAP_INPUT_CHARS} characters")


def _comprehension_depth(expression: str) -> tuple[int, int]:
    """The deepest nesting of comprehension macros, and the 1-based column of the deepest."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", lambda m: " " * len(m.group()), expression)
    opens = {m.end() - 1 for m in _MACRO.finditer(text)}
    stack: list[bool] = []
    depth = best = 0
    column = 1
    for i, ch in enumerate(text):
        if ch == "(":
            macro = i in opens
            stack.append(macro)
            if macro:
                depth += 1
                if depth > best:
                    best, column = depth, i + 1
        elif ch == ")" and stack and stack.pop():  # a macro's own parenthesis closes
            depth -= 1
    return best, column


def _compile_error(text: str) -> CelCompileError:
    for line in text.splitlines():
        m = _ERROR_POS.search(line)
        if m:
            message = m.group(3).removesuffix(" [INVALID_ARGUMENT]")
            return CelCompileError(message, int(m.group(1)), int(m.group(2)))
    return CelCompileError(text.strip(), 1, 1)


# --- string expressions (policy-set upstream headers) -------------------------------------


def compile_string(expression: str) -> Condition:
    """An expression whose result must be a string (type-checked here, at load): the value
    of an upstream header a rule sets. Raises CelCompileError."""
    try:
        program = _ENV.compile(expression)
    except RuntimeError as exc:
        raise _compile_error(str(exc)) from None
    variables = _variables(expression)
    _header_names_in_lower_case(expression)
    rtype = program.return_type()
    if rtype != _T.STRING:
        raise CelCompileError(f"a header value must be a string, this expression is {rtype.name()} "
                              "(convert it with string(...))", 1, 1)
    return Condition(expression, variables, any(v.startswith("tenant.") for v in variables), program)


def evaluate_string(expression: Condition, ctx: Mapping[str, Any]) -> str:
    """The string result; raises CelEvalError for an error or any other type."""
    value, rtype = _run(expression, ctx, "expression")
    if rtype == _T.STRING and isinstance(value, str):
        return value
    raise CelEvalError(f"expression gave {rtype.name()}, not a string")
