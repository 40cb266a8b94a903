"""YAML documents with the file position of every value.

Errors in a bundle must point at ``file:line:column``. PyYAML's composer keeps a mark on
every node; this module turns a node tree into plain Python values plus a map from the
value's path (``("rules", 0, "when", 1)``) to its position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from authz import gradual

Path = tuple[str | int, ...]

try:  # the C composer is ~10x faster on large tenant files when libyaml is present
    _Loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader


class _Core12Loader(_Loader):  # type: ignore[valid-type,misc]
    """YAML 1.2's core schema for plain scalars, as JSON reads values: only true/false are
    booleans and digits are decimal. PyYAML's 1.1 rules read the country code `NO` and
    `off` as false and `0755` as 493, so a DENY on a list of codes missed Norway."""


_RESOLVED = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
             "tag:yaml.org,2002:timestamp")  # a date is text to JSON and YAML 1.2's core schema
_Core12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _RESOLVED]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_Core12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Core12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Core12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


class _Core12Constructor(yaml.constructor.SafeConstructor):
    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = str(self.construct_scalar(node))  # type: ignore[arg-type]
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)  # `0042` is 42: a leading zero makes no octal number


_Core12Constructor.add_constructor("tag:yaml.org,2002:int", _Core12Constructor.construct_yaml_int)  # type: ignore[type-var]


@dataclass(frozen=True, slots=True)
class Position:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(slots=True)
class Document:
    """One YAML document: its value and where each part of it sits."""

    file: str
    value: Any
    positions: dict[Path, Position] = field(default_factory=dict)
    key_positions: dict[Path, Position] = field(default_factory=dict)
    # Scalars written in quotes start one column after the node mark.
    quoted: set[Path] = field(default_factory=set)
    # Literal block scalars (`|`): their text starts on the line after the node mark, line
    # for line (a condition's error can name its own line).
    literal_blocks: set[Path] = field(default_factory=set)
    constructor: Any = field(default_factory=yaml.constructor.SafeConstructor, repr=False)
    yaml11: bool = False  # read by YAML 1.1's rules (Kubernetes resources, as kubectl)

    def at(self, path: Path, *, key: bool = False) -> Position:
        """Position of the value at ``path`` (of its key when ``key``), else its nearest parent."""
        table = self.key_positions if key else self.positions
        p = path
        while True:
            if p in table:
                return table[p]
            if p in self.positions:
                return self.positions[p]
            if not p:
                return Position(self.file, 1, 1)
            p = p[:-1]


class YamlError(ValueError):
    def __init__(self, position: Position, message: str) -> None:
        super().__init__(f"{position}: {message}")
        self.position = position
        self.message = message


def load_documents(text: str, file: str, budget: Budget | None = None, *, yaml11: bool = False) -> list[Document]:
    """Parse every document of a YAML stream; raises YamlError with the position.
    ``budget``: what the files read before this one took of MAX_NODES (one bundle's).
    Plain scalars are read by YAML 1.2's core schema, or with ``yaml11`` by YAML 1.1's (as
    kubectl reads Kubernetes resources: `yes` is true)."""
    budget = budget or Budget()
    loader = _Loader if yaml11 else _Core12Loader
    try:
        if len(text) > COUNT_ABOVE_CHARS:
            _count_nodes(text, file, MAX_NODES - budget.nodes)
        nodes = list(yaml.compose_all(text, Loader=loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
        raise YamlError(pos, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlError(Position(file, 1, 1), f"invalid YAML: {exc}") from None
    docs = []
    for node in nodes:
        if node is None:
            continue
        doc = Document(file, None, constructor=yaml.constructor.SafeConstructor() if yaml11 else _Core12Constructor(),
                       yaml11=yaml11)
        try:
            doc.value = _convert(node, (), doc, budget)
        except RecursionError:
            raise YamlError(_at(doc, node), "invalid YAML: nested too deeply") from None
        docs.append(doc)
    if nodes:
        del node  # the loop's last reference: release() takes apart only what nobody else holds
    gradual.release(nodes)  # the node tree, piece by piece: checks go on meanwhile
    return docs


MAX_NODES = 1_000_000  # values of one file: a 100k-tenant file holds under a million
MAX_ALIASED_NODES = 100_000  # values reached through aliases, each copied where it is used
# A composed node costs ~500 bytes, and a value can take 2 characters (`1,`): 4 MB of YAML
# composed to 1 GB before the count in _convert saw it. Past this size a file's values are
# counted on the parser's events first, one at a time, in bounded memory.
COUNT_ABOVE_CHARS = 256 * 1024


def _count_nodes(text: str, file: str, most: int) -> None:
    nodes = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            nodes += 1
            if nodes > most:
                mark = event.start_mark
                at = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
                raise YamlError(at, f"the bundle's YAML files hold more than {MAX_NODES} values")


class Budget:
    """What converting one file may produce. Nine aliases of nine aliases of ... take a few
    hundred bytes of YAML and expand to billions of values ("billion laughs")."""

    def __init__(self) -> None:
        self.nodes = 0
        self.aliased = 0


_PLAIN_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _at(doc: Document, node: yaml.Node) -> Position:
    return Position(doc.file, node.start_mark.line + 1, node.start_mark.column + 1)


def _convert(node: yaml.Node, path: Path, doc: Document, budget: Budget, aliased: bool = False) -> Any:
    budget.nodes += 1
    if budget.nodes > MAX_NODES:
        raise YamlError(_at(doc, node), f"the bundle's YAML files hold more than {MAX_NODES} values")
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        # An alias is the anchored node itself, met again. Converted nodes are marked by
        # dropping their end mark (never read here): a set of ids would cost ~20 MB at 100k
        # tenants, at the peak of a reload.
        if node.end_mark is None:
            aliased = True
        node.end_mark = None
    if aliased:
        budget.aliased += 1
        if budget.aliased > MAX_ALIASED_NODES:
            raise YamlError(_at(doc, node), f"aliases expand to more than {MAX_ALIASED_NODES} values")
    doc.positions[path] = _at(doc, node)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        # `!!python/object/apply:...`, `!!set`, `!!omap` on a collection: read as a plain one
        # it would mean something else than its author wrote.
        raise YamlError(_at(doc, node), f"invalid value: tag {node.tag!r} is not allowed")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            # A key is a name (a tenant id, a header): kept as written. Resolved, `00042`
            # would be the int 34 (octal), `1.10` the float 1.1 and `yes` True, each naming
            # something else.
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(_scalar(key_node, doc))
            if key == "<<" and key_node.tag == _MERGE_TAG:
                raise YamlError(_at(doc, key_node), "merge keys ('<<') are not supported: write the keys out")
            child = (*path, key)
            if key in out:
                pos = Position(doc.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                raise YamlError(pos, f"duplicate key '{key}'")
            doc.key_positions[child] = Position(
                doc.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1
            )
            out[key] = _convert(value_node, child, doc, budget, aliased)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc, budget, aliased) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.ScalarNode) and not node.style and not doc.yaml11:  # plain: None or ''
        _unambiguous(node, doc)
    if isinstance(node, yaml.ScalarNode) and node.style in ("'", '"'):
        doc.quoted.add(path)
    elif isinstance(node, yaml.ScalarNode) and node.style == "|":
        doc.literal_blocks.add(path)
    return _scalar(node, doc)


_RESOLVER_11 = yaml.resolver.Resolver()
_RESOLVER_12 = yaml.resolver.Resolver()
_RESOLVER_12.yaml_implicit_resolvers = _Core12Loader.yaml_implicit_resolvers
_LEADING_ZERO = re.compile(r"[-+]?0+[1-9][0-9]*$")
# First characters of the plain scalars YAML 1.1 may read as a boolean, number or null.
_RESOLVED_11_FIRST = frozenset("yYnNtTfFoO0123456789+-.~")


def _unambiguous(node: yaml.ScalarNode, doc: Document) -> None:
    """A plain scalar YAML 1.1 and 1.2 read as different types is an error: a file written
    for one (`NO`, `off`, `0755`, `4e81234`, `1_000` under YAML 1.1) would silently mean
    something else, and a DENY's data would change under its author."""
    value = node.value
    if not value or value[0] not in _RESOLVED_11_FIRST:
        return
    if _RESOLVER_12.resolve(yaml.ScalarNode, value, (True, False)) != node.tag:  # type: ignore[no-untyped-call]
        return  # an explicit tag (`!!int x`): not resolved, read as written
    old = _RESOLVER_11.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    if old == node.tag == "tag:yaml.org,2002:int" and _LEADING_ZERO.match(value):
        raise YamlError(_at(doc, node), f"{value[:40]!r} is decimal in YAML 1.2 and octal in YAML 1.1: quote it, "
                        "or write it without the leading zero")
    if old != node.tag:
        kinds = {"tag:yaml.org,2002:str": "text", "tag:yaml.org,2002:bool": "a boolean",
                 "tag:yaml.org,2002:int": "an integer", "tag:yaml.org,2002:float": "a number",
                 "tag:yaml.org,2002:null": "null", "tag:yaml.org,2002:timestamp": "a date"}
        raise YamlError(_at(doc, node), f"{value[:40]!r} is {kinds.get(node.tag, node.tag)} in YAML 1.2 and "
                        f"{kinds.get(old, old)} in YAML 1.1: quote it (or write true/false, a plain decimal)")


def _scalar(node: yaml.Node, doc: Document) -> Any:
    if isinstance(node, yaml.ScalarNode):
        try:
            value = doc.constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:  # `!!python/name:...`, `!!int x`, 5,000 digits
            problem = getattr(exc, "problem", None) or str(exc)
            raise YamlError(_at(doc, node), f"invalid value: {str(problem)[:200]}") from None
        finally:
            doc.constructor.constructed_objects.clear()
        return value
    pos = Position(doc.file, node.start_mark.line + 1, node.start_mark.column + 1)
    raise YamlError(pos, "a mapping key must be a plain value")
