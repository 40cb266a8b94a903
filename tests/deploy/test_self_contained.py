"""The repository needs nothing beside it: a copy of its files, with no shared folder next to it,
passes the deploy tests (the ones that once read Istio's CRDs from outside the repository)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
SIBLING = "shared"  # the folder of design notes and data that may lie beside a checkout


def repository_files() -> list[str]:
    """What a clone holds once the work tree is committed: tracked and new, not ignored, files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    return sorted({name for name in out.decode().split("\0") if name and (REPO / name).is_file()})


def test_deploy_tests_pass_in_a_copy_without_shared_beside_it(tmp_path: Path) -> None:
    clone = tmp_path / "authz"
    files = repository_files()
    assert "tests/deploy/test_manifests.py" in files
    for name in files:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    assert not (clone.parent / SIBLING).exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "AUTHZ_"))}
    env["PYTHONPATH"] = str(clone)  # the copy's own package, not the checkout's
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/deploy",
         "--ignore", f"tests/deploy/{THIS.name}"],  # this test would copy the copy again
        cwd=clone, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 5, summary
    assert not re.search(r"skipped|error|deselected", summary), summary
    assert str(REPO) not in output.replace(str(clone), "")  # nothing was read from the checkout


def test_no_test_reads_outside_the_repository() -> None:
    # a relative '../<sibling>', an absolute '/<dir>/<sibling>/', or Path(...).parents[n] / "<sibling>"
    outside = re.compile(r"\.\./" + SIBLING + r"|/\w+/" + SIBLING + r"/"
                         + r"|parents?(\[\d\])?\s*/\s*[\"']" + SIBLING + r"[\"']")
    checked = [name for name in repository_files()
               if name.startswith(("tests/", "benchmarks/", "scripts/", ".ci/")) and REPO / name != THIS]
    assert len(checked) > 20
    offenders = [name for name in checked
                 if outside.search((REPO / name).read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []
