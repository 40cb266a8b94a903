"""Large bundle structures parsed and dropped in small steps, so that loading one never pauses checks.

Checks run on other threads of the same interpreter. The interpreter hands the GIL to a
waiting thread only between bytecodes, so one long call into C holds every check until it
returns: ``json.loads`` of a 15 MB tenant file (~150 ms measured), or dropping the last
reference to a parsed document of millions of objects (a cascade of deallocations, 40-50 ms).
Both are cut here into steps of one tenant or one entry each, with bytecode in between; so is
decoding the file's text.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A key given twice would be settled silently by the last one (a tenant's callers,
    # say); YAML files are refused for it, so are JSON files.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique)
_SPACE = re.compile(r"[ \t\n\r]*")
_SPLIT_DEPTH = 2  # {"tenants": {"<id>": <decoded in one call>, ...}}


_DECODE_CHUNK = 1 << 20  # bytes: ~0.5 ms of UTF-8 decoding with the GIL held


def read_text(path: Path) -> str:
    """``path.read_text(encoding="utf-8")``, decoded a MiB at a time (15 MB at once: 8 ms)."""
    data = path.read_bytes()  # the read itself lets go of the GIL
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        parts = [decoder.decode(data[i:i + _DECODE_CHUNK]) for i in range(0, len(data), _DECODE_CHUNK)]
        parts.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError:
        return data.decode("utf-8")  # raises again, with the position in the whole file
    return "".join(parts)


def loads(text: str) -> Any:
    """``json.loads(text)``, decoding objects and arrays of the top ``_SPLIT_DEPTH`` levels
    entry by entry (the values below in one call each). The same value, the same
    ``json.JSONDecodeError`` (positions in ``text``) for a bad document; a key given twice
    is a ``ValueError`` where json.loads would keep the last (at the top levels a
    ``json.JSONDecodeError`` naming where the second one starts)."""
    value, end = _value(text, _SPACE.match(text, 0).end(), 0, {})  # type: ignore[union-attr]
    end = _SPACE.match(text, end).end()  # type: ignore[union-attr]
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _value(text: str, i: int, depth: int, strings: dict[str, str]) -> tuple[Any, int]:
    opening = text[i:i + 1]
    if depth >= _SPLIT_DEPTH or opening not in ("{", "["):
        value, end = _DECODER.raw_decode(text, i)
        return _shared_strings(value, strings), end
    closing = "}" if opening == "{" else "]"
    out: Any = {} if opening == "{" else []
    # A key given twice is reported where the object closes, as json.loads with _unique
    # reports it, so that a syntax error earlier in the text is the one named.
    duplicate: tuple[str, int] | None = None
    i = _SPACE.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i:i + 1] == closing:
        return out, i + 1
    while True:
        if opening == "{":
            if text[i:i + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
            at = i
            key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
            if key in out and duplicate is None:
                duplicate = (key, at)
            i = _SPACE.match(text, i).end()  # type: ignore[union-attr]
            if text[i:i + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            i = _SPACE.match(text, i + 1).end()  # type: ignore[union-attr]
            out[strings.setdefault(key, key)], i = _value(text, i, depth + 1, strings)
        else:
            item, i = _value(text, i, depth + 1, strings)
            out.append(item)
        i = _SPACE.match(text, i).end()  # type: ignore[union-attr]
        sep = text[i:i + 1]
        if sep == closing:
            if duplicate is not None:
                raise json.JSONDecodeError(f"duplicate key {duplicate[0]!r}", text, duplicate[1])
            return out, i + 1
        if sep != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
        i = _SPACE.match(text, i + 1).end()  # type: ignore[union-attr]


_SHARED_VALUE_CHARS = 256  # longer strings are rarely repeated; the memo would only grow


def _shared_strings(value: Any, strings: dict[str, str]) -> Any:
    """``value`` with one string object per distinct key, as one json.loads call would share
    them: decoded a tenant at a time, every tenant would otherwise hold its own "callers",
    "plan" (measured: +26 MB at 100k tenants). Short string values are shared the same way:
    tenants repeat their plan, region and callers, and json.loads gives each its own copy
    (measured: 17 MB of a reload's peak at 100k tenants; the compiled bundle holds its own)."""
    if isinstance(value, dict):
        return {strings.setdefault(k, k): _shared_strings(v, strings) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared_strings(v, strings) for v in value]
    if isinstance(value, str) and len(value) <= _SHARED_VALUE_CHARS:
        return strings.setdefault(value, value)
    return value


def release(*objects: Any) -> None:
    """Drop the caller's references to ``objects`` one entry at a time.

    Only what nobody else holds is taken apart (a container shared with the compiled
    bundle keeps every entry): each container popped from its parent is drained only when
    the reference just popped is the last one (a tuple's items, which stay in it, when the
    tuple holds the only one). Knows dicts, lists, sets, tuples, YAML nodes and dataclasses
    with ``__slots__``, frozen ones too (a replaced bundle's policies and rules)."""
    stack = list(objects)
    del objects
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            while obj:
                _, value = obj.popitem()
                _push(stack, value)
                del value
        elif isinstance(obj, list):
            while obj:
                value = obj.pop()
                _push(stack, value)
                del value
        elif isinstance(obj, set):
            obj.clear()  # positions paths: small tuples of str and int
        elif isinstance(obj, yaml.Node):
            value = obj.value
            obj.value = None
            _push(stack, value)
            del value
        elif isinstance(obj, tuple):
            # 3 references: the tuple's, the loop's and getrefcount's own.
            stack.extend(v for v in obj if _takes_apart(v) and sys.getrefcount(v) <= 3)
        elif _takes_apart(obj):  # a dataclass with slots
            # A mutable one's containers are emptied (its caller may still read it). A frozen
            # one's fields are unset the way its own __init__ sets them, as nobody else holds
            # it: a field another part of the structure shares too (a policy's rules, which
            # its index holds) is then taken apart when the last of them lets go.
            frozen = type(obj).__dataclass_params__.frozen
            for name in getattr(type(obj), "__slots__", ()):
                value = getattr(obj, name, None)
                if frozen and _takes_apart(value):
                    object.__setattr__(obj, name, None)
                    _push(stack, value)
                elif not frozen and isinstance(value, (dict, list, set)) and value:
                    setattr(obj, name, type(value)())
                    _push(stack, value)
                del value
        del obj


_CONTAINERS = (dict, list, set, tuple, yaml.Node)


def _takes_apart(value: Any) -> bool:
    """A non-empty container, or a dataclass with slots (a parsed Document, a compiled Rule)."""
    if isinstance(value, _CONTAINERS):
        return bool(value)
    return hasattr(type(value), "__dataclass_params__") and hasattr(type(value), "__slots__")


def _push(stack: list[Any], value: Any) -> None:
    # 3 references: the caller's local, this argument and getrefcount's own.
    if _takes_apart(value) and sys.getrefcount(value) <= 3:
        stack.append(value)
