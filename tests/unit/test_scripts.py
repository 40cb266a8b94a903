"""scripts/serve and scripts/test install only when the venv is missing or pyproject.toml
changed: run scripts/_venv.sh in a scratch directory whose .venv/bin/python records how it is
called (and forwards to this interpreter), so nothing is installed for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RECORDER = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls"
case "$*" in *"pip install"*) exit 0 ;; esac
exec "{python}" "$@"
"""


def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "_venv.sh", root / "scripts" / "_venv.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(RECORDER.format(python=sys.executable))
    python.chmod(0o755)
    return root


def ensure(root: Path, extra: str = "") -> tuple[str, list[str]]:
    calls = root / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": "/nonexistent/python3"}  # a new venv would fail loudly
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail; . scripts/_venv.sh; ensure_venv {extra}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr, calls.read_text().splitlines() if calls.exists() else []


def test_installs_once_then_starts_without_pip(tmp_path: Path) -> None:
    root = project(tmp_path)
    out, calls = ensure(root)
    assert "Installing authz into .venv" in out
    assert calls[-1].endswith("-m pip install -q --disable-pip-version-check -e .")
    out, calls = ensure(root)
    assert (out, calls) == ("", [])  # quiet, and pip never runs: works offline


def test_test_extras_then_serve_needs_nothing_more(tmp_path: Path) -> None:
    root = project(tmp_path)
    _, calls = ensure(root, "test")
    assert calls[-1].endswith("-e .[test]")
    assert ensure(root, "test") == ("", [])
    assert ensure(root) == ("", [])  # a [test] install holds what serve needs
    _, calls = ensure(tmp_path / "proj", "")
    assert calls == []


def test_a_changed_pyproject_reinstalls(tmp_path: Path) -> None:
    root = project(tmp_path)
    ensure(root, "test")
    with (root / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency would go here\n")
    out, calls = ensure(root, "test")
    assert "pyproject.toml changed" in out and any("pip install" in c for c in calls)
    assert ensure(root, "test") == ("", [])


def test_scripts_use_the_stamp() -> None:
    for name in ("serve", "test"):
        text = (REPO / "scripts" / name).read_text()
        assert ". scripts/_venv.sh" in text and "ensure_venv" in text
        assert "pip install" not in text
    assert "apt-get install" in (REPO / "scripts" / "test").read_text()
