"""docs/guide.md, run as written: its file blocks are written, its sh blocks run in order in one
temporary directory, and each text block must be exactly what the sh block before it printed
(stdout then stderr), line for line. In a block, '…' inside a line stands for any text within
that line, and a line that is only '…' for any number of lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "guide.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


@dataclass
class Block:
    lang: str
    attrs: dict[str, str]
    body: str


def blocks(text: str) -> list[Block]:
    out = []
    for m in FENCE.finditer(text):
        words = m.group(1).split()
        lang = words[0] if words else ""
        attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        out.append(Block(lang, attrs, m.group(2)))
    return out


def test_guide_has_the_steps_the_issue_asks_for() -> None:
    bs = blocks(GUIDE.read_text())
    commands = "\n".join(b.body for b in bs if b.lang == "sh")
    assert "authz test" in commands and "--explain" in commands and "authz lint" in commands
    assert any(b.attrs.get("file", "").startswith("tests/") for b in bs)
    assert any("tenant:" in b.body for b in bs if b.attrs.get("file", "").startswith("policies/"))


def test_guide_steps_work_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cwd = tmp_path
    last_output: str | None = None
    ran = compared = 0
    for b in blocks(GUIDE.read_text()):
        if "file" in b.attrs:
            path = cwd / b.attrs["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.body)
        elif b.lang == "sh":
            # Run the block; keep the directory it ends in for the next block (the guide cds once).
            want = int(b.attrs.get("exit", "0"))
            # A block that should succeed stops at its first failing command; the status of one that
            # should fail is its last command's.
            script = ("set -e\n" if want == 0 else "") + b.body + '\n__rc=$?\necho "__CWD__=$(pwd)"\nexit $__rc\n'
            proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, check=False,
                                  timeout=120)
            out = proc.stdout
            assert (proc.returncode == want), f"block:\n{b.body}\nexit {proc.returncode}, wanted {want}\n{out}{proc.stderr}"
            out, _, new_cwd = out.rpartition("__CWD__=")
            if want == 0:
                cwd = Path(new_cwd.strip())
            last_output = out + proc.stderr
            ran += 1
        elif b.lang == "text":
            assert last_output is not None, "an output block before any command"
            assert matches(b.body.splitlines(), last_output.splitlines()), (
                f"the guide shows:\n{b.body}\nthe tools print:\n{last_output}")
            compared += 1
    assert ran >= 5 and compared >= 5


def matches(shown: list[str], printed: list[str]) -> bool:
    """``printed`` line for line as ``shown``, with the '…' wildcards of the module docstring."""
    shown = [line.rstrip() for line in shown]
    printed = [line.rstrip() for line in printed]
    if not shown:
        return not printed
    head, rest = shown[0], shown[1:]
    if head == "…":
        return any(matches(rest, printed[i:]) for i in range(len(printed) + 1))
    if not printed:
        return False
    pattern = "^" + ".*".join(re.escape(part) for part in head.split("…")) + "$"
    return re.match(pattern, printed[0]) is not None and matches(rest, printed[1:])


def test_the_comparison_is_strict() -> None:
    assert matches(["a", "b …", "…", "z"], ["a", "b 12", "x", "y", "z"])
    assert not matches(["a", "b"], ["a", "b", "c"])  # a line the guide leaves out
    assert not matches(["a", "c"], ["a", "b", "c"])
    assert not matches(["b …"], ["a b 1"])
