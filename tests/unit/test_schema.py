"""`authz schema`, the committed schema file, and the example bundle's editor modelines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from authz.bundle import schema
from authz.bundle.yamlpos import load_documents
from authz.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "policies" / "example"
COMMITTED = REPO / "schema" / "bundle.schema.json"
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLE.rglob("*.yaml"))


def test_committed_schema_is_authz_schema_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert COMMITTED.read_text() == printed, "regenerate with: authz schema > schema/bundle.schema.json"
    assert json.loads(printed) == schema.BUNDLE_SCHEMA


def test_schema_is_one_resource() -> None:
    doc = json.loads(COMMITTED.read_text())
    assert doc["$schema"].startswith("https://json-schema.org/")
    titles = [s["title"] for s in doc["oneOf"]]
    assert titles == [schema.MANIFEST["title"], schema.POLICY["title"], schema.TENANTS["title"],
                      schema.BUNDLE_TEST["title"]]
    assert all("$schema" not in s for s in doc["oneOf"])


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(EXAMPLE)))
def test_example_files_carry_a_modeline_to_the_committed_schema(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    m = MODELINE.match(first)
    assert m, f"{path} lacks the yaml-language-server modeline"
    target = (path.parent / m.group(1)).resolve()
    assert target == COMMITTED.resolve()


def _matches(value: Any, sub: dict[str, Any]) -> bool:
    doc = load_documents(json.dumps(value), "x.json")[0]
    return not schema.validate(doc, sub)


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(EXAMPLE)))
def test_each_example_document_matches_exactly_one_schema(path: Path) -> None:
    subs = json.loads(COMMITTED.read_text())["oneOf"]
    for doc in load_documents(path.read_text(), path.name):
        assert sum(_matches(doc.value, s) for s in subs) == 1


def test_schema_rejects_what_the_loader_rejects() -> None:
    subs = json.loads(COMMITTED.read_text())["oneOf"]
    typo = {"apiVersion": "authz/v1", "kind": "Policy", "name": "p", "action": "ALLOW", "rulez": []}
    assert sum(_matches(typo, s) for s in subs) == 0
    test_doc = {"apiVersion": "authz/v1", "kind": "BundleTest", "name": "t",
                "cases": [{"name": "c", "request": {"path": "/"}, "expect": {"tenant": None, "headers": {"x": None}}}]}
    assert sum(_matches(test_doc, s) for s in subs) == 1
    test_doc["cases"][0]["expect"]["tenant"] = 3
    assert sum(_matches(test_doc, s) for s in subs) == 0
