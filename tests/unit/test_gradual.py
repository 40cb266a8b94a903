"""authz.gradual: large tenant files parsed, and parsed documents dropped, in small steps.

What it must keep: the same value and the same error (message, line, column) as json.loads,
and never take apart anything that someone else still holds (the compiled bundle shares
values with the parsed documents). How long the GIL is held is a benchmark's business
(benchmarks/bench_reload_pause.py), not a test's."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from authz import gradual

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([None, 0, 2]), st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
def test_the_same_value_as_json_loads(value: object, indent: int | None, separators: tuple[str, str]) -> None:
    text = json.dumps(value, indent=indent, separators=separators)
    assert gradual.loads(text) == json.loads(text)
    assert gradual.loads(f" \n\t{text}\r\n ") == json.loads(f" \n\t{text}\r\n ")


def _outcome(parse, text: str) -> object:  # noqa: ANN001
    try:
        return ("ok", parse(text))
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("duplicate key"):  # json.loads's hook names no position
            return ("error", exc.msg)
        return ("error", exc.msg, exc.lineno, exc.colno)
    except ValueError as exc:
        return ("error", str(exc))


def _json_loads(text: str) -> object:
    """json.loads as the bundle reads JSON: a key given twice is an error, not the last kept."""
    return json.loads(text, object_pairs_hook=gradual._unique)


@settings(max_examples=300, deadline=None)
@given(json_values.filter(lambda v: isinstance(v, (dict, list))), st.data())
def test_a_broken_document_fails_as_json_loads_fails(value: object, data: st.DataObject) -> None:
    text = json.dumps(value, indent=data.draw(st.sampled_from([None, 1])))
    cut = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.sampled_from(["", ",", "}", "]", ":", "x", '"', " 1"]))
    broken = text[:cut] + junk + text[cut:]
    assert _outcome(gradual.loads, broken) == _outcome(_json_loads, broken)


@pytest.mark.parametrize("text", ["", "{", '{"a" 1}', '{"a": 1,}', "[1 2]", '{"a": 1} x', "[1,]", "{'a': 1}",
                                  '{"tenants": {"t": {"callers": [}}}', '{"a', '{"a": {"b": 1}'])
def test_errors_name_the_same_line_and_column(text: str) -> None:
    assert _outcome(gradual.loads, text) == _outcome(_json_loads, text)
    assert _outcome(gradual.loads, text)[0] == "error"


@pytest.mark.parametrize("text", [
    '{"tenants": {"t": {"plan": "a"}, "t": {"plan": "b"}}}',  # a level decoded entry by entry
    '{"tenants": {"t": {"plan": "a", "plan": "b"}}}',  # a level decoded in one call
])
def test_a_key_given_twice_is_an_error(text: str) -> None:
    """json.loads keeps the last: a tenant given twice would lose its first callers silently,
    where YAML refuses the same file."""
    with pytest.raises(ValueError, match="duplicate key 't'|duplicate key 'plan'"):
        gradual.loads(text)


@pytest.mark.parametrize("text", [
    '{"": null, "": null "0": null}',  # found by hypothesis in CI: the syntax error comes first
    '{"tenants": {"t": 1, "t": 2 "u": 3}}',
    '{"tenants": {"t": {"a": 1, "a": 2}, "u" 3}}',  # an inner object closes before the error
])
def test_a_key_given_twice_and_a_syntax_error_fail_as_json_loads_fails(text: str) -> None:
    assert _outcome(gradual.loads, text) == _outcome(_json_loads, text)


@dataclass(slots=True)
class Doc:
    value: object
    positions: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Frozen:
    items: list


class Spy(dict):  # type: ignore[type-arg]
    """Counts the entries taken out of it (a test holding it would keep it whole)."""

    popped = 0

    def popitem(self):  # type: ignore[no-untyped-def]
        Spy.popped += 1
        return super().popitem()


def test_release_takes_apart_only_what_nobody_else_holds() -> None:
    shared = {"callers": ["a", "b"]}  # e.g. a value the compiled bundle kept
    frozen = Frozen(["x"])
    held = Doc(Spy(k="v"))  # a document someone else still holds
    Spy.popped = 0
    docs = [Doc(Spy(tenants=Spy(t1=shared, t2=Spy(plan="p")), lst=[[1, 2], Spy(k="v")], f=frozen),
                Spy({("tenants",): (1, 1)})), held]
    gradual.release(docs)
    assert docs == []
    # the unshared document: its value (3 entries), tenants (2), t2 (1), the spy in the list
    # (1) and its positions (1)
    assert Spy.popped == 8
    assert shared == {"callers": ["a", "b"]}  # held by this test: whole
    assert frozen.items == ["x"]  # held by this test: whole
    assert held.value == {"k": "v"}


@dataclass(frozen=True, slots=True)
class Compiled:
    rules: tuple  # type: ignore[type-arg]
    index: object = None


def test_release_takes_apart_a_replaced_bundle_even_where_its_parts_share_a_field() -> None:
    """A compiled bundle: frozen dataclasses, and a rules tuple that both a policy and its
    index hold. Nothing else holds them, so every rule is taken apart, but not a rule the
    test still holds."""
    kept = Spy(k="v")
    rules = (Spy(a=1), Spy(b=2), kept, Spy(c=3))
    bundle = Compiled(rules=(Compiled(rules=rules, index=Compiled(rules=rules)),))
    del rules
    Spy.popped = 0
    gradual.release(bundle)
    assert Spy.popped == 3
    assert kept == {"k": "v"}
    assert bundle.rules is None  # the root, which the caller hands over


def test_release_leaves_a_frozen_dataclass_someone_else_holds_whole() -> None:
    rule = Spy(a=1)
    policy = Compiled(rules=(rule,))
    held_elsewhere = [policy]
    del rule
    Spy.popped = 0
    gradual.release([held_elsewhere[0]])
    assert Spy.popped == 0 and policy.rules[0] == {"a": 1}


@pytest.mark.parametrize("text", ["plain ascii " * 5, "é€😀 mixed ñ" * 7, "", "x😀"])
def test_read_text_decodes_in_chunks_as_read_text_does(tmp_path, monkeypatch, text: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gradual, "_DECODE_CHUNK", 3)  # chunk ends fall inside characters
    path = tmp_path / "f.json"
    path.write_text(text, encoding="utf-8")
    assert gradual.read_text(path) == path.read_text(encoding="utf-8") == text


def test_read_text_fails_as_read_text_does_with_the_position_in_the_file(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gradual, "_DECODE_CHUNK", 4)
    path = tmp_path / "f.json"
    path.write_bytes("abcdéfgh".encode() + b"\xff tail")
    with pytest.raises(UnicodeDecodeError) as ours:
        gradual.read_text(path)
    with pytest.raises(UnicodeDecodeError) as theirs:
        path.read_text(encoding="utf-8")
    assert str(ours.value) == str(theirs.value) and ours.value.start == 9


def test_release_takes_apart_a_yaml_node_tree_it_alone_holds() -> None:
    nodes = list(yaml.compose_all("a: [1, {b: c}]\n---\nd: e\n", Loader=yaml.SafeLoader))
    first = nodes[0]
    kept = first.value[0][1]  # the sequence node under "a", still held here
    gradual.release(nodes)
    assert nodes == [] and first.value is not None  # first is held by this test: left whole
    assert [n.value for n in kept.value][0] == "1"


def test_keys_repeated_across_tenants_are_one_string_as_with_json_loads() -> None:
    """Decoded a tenant at a time, each tenant would hold its own copy of "callers", "plan"...
    (+26 MB at 100k tenants); one json.loads call shares them, and so must loads()."""
    text = json.dumps({"tenants": {f"t{i}": {"callers": [f"c{i}"], "flags": {"beta": True}} for i in range(3)}})
    tenants = gradual.loads(text)["tenants"]
    first, second = (list(tenants[t]) for t in ("t0", "t1"))
    assert first[0] is second[0] and first[1] is second[1]
    assert next(iter(tenants["t0"]["flags"])) is next(iter(tenants["t2"]["flags"]))


def test_short_string_values_repeated_across_tenants_are_one_string() -> None:
    """Tenants repeat their plan and callers; json.loads would give each its own copy (17 MB
    of a reload's peak at 100k tenants). Long values are left alone: rarely repeated, they
    would only grow the memo."""
    long = "x" * 300
    text = json.dumps({"tenants": {f"t{i}": {"plan": "standard", "callers": ["spiffe://td/ns/a/sa/b"],
                                             "note": long} for i in range(3)}})
    tenants = gradual.loads(text)["tenants"]
    assert tenants == json.loads(text)["tenants"]
    assert tenants["t0"]["plan"] is tenants["t2"]["plan"]
    assert tenants["t0"]["callers"][0] is tenants["t1"]["callers"][0]
    assert tenants["t0"]["note"] is not tenants["t1"]["note"]
