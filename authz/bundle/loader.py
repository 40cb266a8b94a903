"""Read a bundle directory into validated documents; every problem carries file:line:column.

Layout (file names relative to the bundle root are what errors print):

    bundle.yaml            manifest: name, revision, trust domain and aliases, default action
    policies/**/*.yaml     policies, several per file allowed (YAML documents)
    tenants/*.yaml|json    tenant data: callers, plan, flags, attributes
    data/*.yaml|json       other data, visible to conditions as data.<file stem>
    tests/*.yaml           bundle tests (run by `authz test` and before a reload)

Hidden files and directories (a leading '.', as in a Kubernetes ConfigMap's ``..data``
bookkeeping) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authz import gradual
from authz.bundle import schema
from authz.bundle.schema import Problem
from authz.bundle.yamlpos import Budget, Document, Position, YamlError, load_documents

MANIFEST_FILE = "bundle.yaml"
MAX_FILE_BYTES = 64 * 1024 * 1024


class BundleError(Exception):
    """A bundle was rejected; ``problems`` says where and why."""

    def __init__(self, problems: list[Problem], revision: str = "") -> None:
        self.problems = problems
        self.revision = revision
        head = f"bundle{' revision ' + revision if revision else ''} rejected"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(slots=True)
class BundleFiles:
    root: Path
    manifest: Document
    policies: list[Document] = field(default_factory=list)
    tenants: list[Document] = field(default_factory=list)
    data: dict[str, Document] = field(default_factory=dict)
    tests: list[Document] = field(default_factory=list)

    @property
    def revision(self) -> str:
        value = self.manifest.value
        return str(value.get("revision", "")) if isinstance(value, dict) else ""


def read_bundle(root: Path, *, require_policies: bool = False) -> BundleFiles:
    """The bundle at ``root``, validated; BundleError lists every problem found.

    ``require_policies``: a bundle without a single policy is an error too (the serving
    gate and lint ask for this; authz serve --allow-empty-bundle turns it off).
    """
    files, problems = _read_bundle(Path(root), require_policies)
    if problems:
        revision = files.revision
        # Piece by piece, checks going on: raised with it, the documents would be dropped
        # whole with the traceback, a 30 ms pause of every check at 100k tenants.
        gradual.release(files)
        del files
        raise BundleError(problems, revision)
    return files


def _read_bundle(root: Path, require_policies: bool) -> tuple[BundleFiles, list[Problem]]:
    problems: list[Problem] = []
    if not root.is_dir():
        raise BundleError([Problem(Position(str(root), 1, 1), "bundle directory does not exist")])
    budget = Budget()  # the values of all its YAML files: per file, three files held three times as much
    manifest_docs = _read(root, root / MANIFEST_FILE, problems, budget)
    if not manifest_docs:
        if not problems:
            problems.append(Problem(Position(MANIFEST_FILE, 1, 1), "bundle has no manifest (bundle.yaml)"))
        raise BundleError(problems)
    manifest = manifest_docs[0]
    problems += schema.validate(manifest, schema.MANIFEST)
    files = BundleFiles(root, manifest)
    for path in _files(root / "policies", (".yaml", ".yml")):
        for doc in _read(root, path, problems, budget):
            problems += schema.validate(doc, schema.POLICY)
            files.policies.append(doc)
    for path in _files(root / "tenants", (".yaml", ".yml", ".json")):
        for doc in _read(root, path, problems, budget):
            problems += schema.validate(doc, schema.TENANTS)
            files.tenants.append(doc)
    data_files: dict[str, str] = {}
    for path in _files(root / "data", (".yaml", ".yml", ".json")):
        name = path.relative_to(root).as_posix()
        if path.stem in data_files:  # data/x.yaml and data/old/x.json: which one is data.x?
            problems.append(Problem(Position(name, 1, 1), f"data name {path.stem!r} is already given by "
                                    f"{data_files[path.stem]}"))
            continue
        data_files[path.stem] = name
        docs = _read(root, path, problems, budget)
        if docs:
            files.data[path.stem] = docs[0]
    for path in _files(root / "tests", (".yaml", ".yml")):
        for doc in _read(root, path, problems, budget):
            problems += schema.validate(doc, schema.BUNDLE_TEST)
            files.tests.append(doc)
    if require_policies and not problems:
        problems += missing_policies(files)
    return files, problems


def missing_policies(files: BundleFiles) -> list[Problem]:
    """An error when the bundle holds no policy at all: it would deny every request, and it
    is what a ConfigMap mounted without ``items:`` gives (only bundle.yaml; its policies/,
    tenants/ and tests/ subdirectories are not projected)."""
    if files.policies:
        return []
    found = "no policy in its policies/ files" if (files.root / "policies").is_dir() else "no policies/ directory"
    return [Problem(
        files.manifest.at(()),
        f"the bundle has no policies ({found}); it would deny every request. A ConfigMap needs "
        "items: projecting policies/*.yaml (deploy/kubernetes/). To serve it anyway: "
        "authz serve --allow-empty-bundle",
    )]


def _files(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in suffixes:
            out.append(path)
    return out


def _read(root: Path, path: Path, problems: list[Problem], budget: Budget) -> list[Document]:
    name = path.relative_to(root).as_posix()
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            problems.append(Problem(Position(name, 1, 1), f"file is larger than {MAX_FILE_BYTES} bytes"))
            return []
        text = gradual.read_text(path)
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(Position(name, 1, 1), f"cannot read file: {exc}"))
        return []
    if path.suffix == ".json":
        try:
            value: Any = gradual.loads(text)  # json.loads in steps: checks go on meanwhile
        except json.JSONDecodeError as exc:
            problems.append(Problem(Position(name, exc.lineno, exc.colno), f"invalid JSON: {exc.msg}"))
            return []
        except RecursionError:
            problems.append(Problem(Position(name, 1, 1), "invalid JSON: nested too deeply"))
            return []
        except ValueError as exc:  # a duplicate key, an integer of thousands of digits
            problems.append(Problem(Position(name, 1, 1), f"invalid JSON: {str(exc)[:200]}"))
            return []
        return [Document(name, value)]
    try:
        return load_documents(text, name, budget)
    except YamlError as exc:
        problems.append(Problem(exc.position, exc.message))
        return []
