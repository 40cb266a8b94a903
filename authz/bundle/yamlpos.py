"""YAML documents with the file position of every value.

Errors in a bundle must point at ``file:line:column``. PyYAML's composer keeps a mark on
every node; this module turns a node tree into plain Python values plus a map from the
value's path (``("rules", 0, "when", 1)``) to its position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from authz import gradual

Path = tuple[str | int, ...]

try:  # the C composer is ~10x faster on large tenant files when libyaml is present
    _Loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader


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
    constructor: Any = field(default_factory=yaml.constructor.SafeConstructor, repr=False)

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


def load_documents(text: str, file: str) -> list[Document]:
    """Parse every document of a YAML stream; raises YamlError with the position."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
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
        doc = Document(file, None)
        doc.value = _convert(node, (), doc)
        docs.append(doc)
    if nodes:
        del node  # the loop's last reference: release() takes apart only what nobody else holds
    gradual.release(nodes)  # the node tree, piece by piece: checks go on meanwhile
    return docs


def _convert(node: yaml.Node, path: Path, doc: Document) -> Any:
    doc.positions[path] = Position(doc.file, node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            # A key is a name (a tenant id, a header): kept as written. Resolved, `00042`
            # would be the int 34 (octal), `1.10` the float 1.1 and `yes` True, each naming
            # something else.
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(_scalar(key_node, doc))
            child = (*path, key)
            if key in out:
                pos = Position(doc.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                raise YamlError(pos, f"duplicate key '{key}'")
            doc.key_positions[child] = Position(
                doc.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1
            )
            out[key] = _convert(value_node, child, doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.ScalarNode) and node.style in ("'", '"'):
        doc.quoted.add(path)
    return _scalar(node, doc)


def _scalar(node: yaml.Node, doc: Document) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value = doc.constructor.construct_object(node)
        doc.constructor.constructed_objects.clear()
        return value
    pos = Position(doc.file, node.start_mark.line + 1, node.start_mark.column + 1)
    raise YamlError(pos, "a mapping key must be a plain value")
