"""Per-policy rule index: which rules of a policy can possibly match a request.

Built once per bundle from the compiled rules. A check then evaluates only the candidates,
in their order in the policy, instead of every rule: with 10,000 rules on one destination
a decision costs about what it costs with 10.

The index is conservative: it narrows by what every match needs and never by anything a
matcher could read another way.

- path: an operation's exact paths, its ``prefix*`` and ``*suffix`` forms, and the literal
  text before the first ``{`` of a template (a template match starts with it) are keys;
  ``*``, no ``paths`` at all, or a rule with no ``to`` puts the rule in the any-path bucket.
  The engine may compare several readings of one request path; the caller passes them all.
- method: keys are upper-cased, and so is the request's method: a rule whose method equals
  the request's in any case is a candidate, whatever the engine's case rule is.
- caller: a rule whose every ``from`` source lists only exact principals is keyed by them;
  any other rule matches any caller here. Not in a policy whose tenant comes from a path
  capture: the engine judges the tenant before the caller.

``not*`` fields, hosts, ports, conditions and tenants only ever exclude, so they are left to
the engine. The property test (tests/unit/test_rule_index.py) checks that deciding with and
without the index gives the same Decision on generated bundles and requests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from authz import gradual
from authz.engine.model import Operation, PathMatch, Policy, Rule, StringMatch

# Below this many rules a scan costs less than the lookups.
MIN_RULES = 8

# (upper-cased method or None for any, principal or None for any) -> rule positions, ascending.
Bucket = Mapping[tuple[str | None, str | None], tuple[int, ...]]
_MutableBucket = defaultdict[tuple[str | None, str | None], list[int]]


@dataclass(frozen=True, slots=True)
class PolicyIndex:
    rules: tuple[Rule, ...]
    exact: Mapping[str, Bucket]
    prefixes: Mapping[str, Bucket]
    prefix_lengths: tuple[int, ...]
    suffixes: Mapping[str, Bucket]
    suffix_lengths: tuple[int, ...]
    any_path: Bucket

    def candidates(self, method: str, paths: Iterable[str], principal: str) -> list[Rule]:
        """The rules that may match, in policy order; ``paths``: every reading the engine compares."""
        m = method.upper()
        keys = ((m, principal), (m, None), (None, principal), (None, None))
        found: list[tuple[int, ...]] = []
        buckets: list[Bucket] = [self.any_path]
        for path in paths:
            b = self.exact.get(path)
            if b is not None:
                buckets.append(b)
            n = len(path)
            for length in self.prefix_lengths:
                if length > n:
                    break
                b = self.prefixes.get(path[:length])
                if b is not None:
                    buckets.append(b)
            for length in self.suffix_lengths:
                if length > n:
                    break
                b = self.suffixes.get(path[n - length:])
                if b is not None:
                    buckets.append(b)
        for b in buckets:
            for key in keys:
                hit = b.get(key)
                if hit is not None:
                    found.append(hit)
        if not found:
            return []
        if len(found) == 1:
            positions: Sequence[int] = found[0]
        else:
            positions = sorted({i for hit in found for i in hit})
        rules = self.rules
        return [rules[i] for i in positions]


def build(policies: Iterable[Policy], min_rules: int = MIN_RULES) -> dict[str, PolicyIndex]:
    """An index for each policy with at least ``min_rules`` rules, by policy name."""
    return {p.name: index_policy(p) for p in policies if len(p.rules) >= min_rules}


def index_policy(policy: Policy) -> PolicyIndex:
    exact: defaultdict[str, _MutableBucket] = defaultdict(_bucket)
    prefixes: defaultdict[str, _MutableBucket] = defaultdict(_bucket)
    suffixes: defaultdict[str, _MutableBucket] = defaultdict(_bucket)
    any_path: _MutableBucket = _bucket()
    # A policy's tenant is looked up (and an unknown one, or one the path's {tenant} capture
    # contradicts, denied) as soon as a rule's `to` matches, before its `from` is read: such
    # rules must not be narrowed by caller, or served checks would decide otherwise than
    # explained and tested ones.
    by_caller = policy.tenant is None
    for pos, rule in enumerate(policy.rules):
        callers = _callers(rule) if by_caller else (None,)
        for where, methods in _path_keys(rule):
            bucket = any_path if where is None else {"=": exact, "^": prefixes, "$": suffixes}[where[0]][where[1]]
            for m in methods:
                for c in callers:
                    entry = bucket[(m, c)]
                    if not entry or entry[-1] != pos:
                        entry.append(pos)
    index = PolicyIndex(
        rules=policy.rules,
        exact={k: _freeze(b) for k, b in exact.items()},
        prefixes={k: _freeze(b) for k, b in prefixes.items()},
        prefix_lengths=tuple(sorted({len(k) for k in prefixes})),
        suffixes={k: _freeze(b) for k, b in suffixes.items()},
        suffix_lengths=tuple(sorted({len(k) for k in suffixes})),
        any_path=_freeze(any_path),
    )
    gradual.release(exact, prefixes, suffixes, any_path)  # at 10k rules, a 45 ms pause freed at once
    return index


def _bucket() -> _MutableBucket:
    return defaultdict(list)


def _freeze(b: _MutableBucket) -> dict[tuple[str | None, str | None], tuple[int, ...]]:
    return {k: tuple(v) for k, v in b.items()}


def _path_keys(rule: Rule) -> list[tuple[tuple[str, str] | None, tuple[str | None, ...]]]:
    """(path key, method keys) for each way the rule's ``to`` can match; key None: any path."""
    if not rule.operations:
        return [(None, (None,))]
    out: list[tuple[tuple[str, str] | None, tuple[str | None, ...]]] = []
    for op in rule.operations:
        methods = _method_keys(op)
        for where in _op_path_keys(op):
            out.append((where, methods))
    return out


def _method_keys(op: Operation) -> tuple[str | None, ...]:
    sm = op.methods
    if sm is None or not _exact_only(sm) or not sm.exact:
        return (None,)
    return tuple(sorted({m.upper() for m in sm.exact}))


def _op_path_keys(op: Operation) -> list[tuple[str, str] | None]:
    """Keys for the operation's paths, and for their case-folded form (the case-folded
    reading of a path is looked up with those)."""
    if op.paths is None:
        return [None]
    keys = _path_match_keys(op.paths)
    if op.paths.folded is not None:
        keys += _path_match_keys(op.paths.folded)
    return keys


def _path_match_keys(pm: PathMatch) -> list[tuple[str, str] | None]:
    if pm.strings.present or pm.strings.fold_case:
        return [None]
    keys: list[tuple[str, str] | None] = [("=", p) for p in sorted(pm.strings.exact)]
    keys += [("^", p) if p else None for p in pm.strings.prefixes]
    keys += [("$", s) if s else None for s in pm.strings.suffixes]
    if pm.strings.suffix_readings:  # suffixes read as patterns: no literal key
        keys.append(None)
    for t in pm.templates:
        literal = template_literal_prefix(t.source)
        keys.append(("^", literal) if literal else None)
    return keys or [None]


def template_literal_prefix(source: str) -> str:
    """The text every path a template matches starts with: up to its first variable, and
    before any '%' (a policy path's escapes may be rewritten when it is compiled)."""
    cut = len(source)
    for ch in "{%":
        i = source.find(ch)
        if i != -1:
            cut = min(cut, i)
    return source[:cut]


def _callers(rule: Rule) -> tuple[str | None, ...]:
    if not rule.sources:
        return (None,)
    out: set[str] = set()
    for s in rule.sources:
        sm = s.principals
        if sm is None or not _exact_only(sm) or not sm.exact:
            return (None,)
        out |= sm.exact
    return tuple(sorted(out))


def _exact_only(sm: StringMatch) -> bool:
    return sm.exact_only
