"""The committed stubs in authz/v1/ are what ./scripts/gen-proto makes from proto/ today.

When this fails: run ./scripts/gen-proto and commit authz/v1/ (with the grpcio-tools pinned
in pyproject.toml's test extra; another version writes different code).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("decision_pb2.py", "decision_pb2.pyi", "decision_pb2_grpc.py")


def generate(out: Path, src: Path = REPO / "proto") -> dict[str, bytes]:
    subprocess.run([str(REPO / "scripts" / "gen-proto"), str(out), str(src)], check=True,
                   capture_output=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    produced = sorted(p.name for p in (out / "authz" / "v1").iterdir())
    assert produced == sorted(GENERATED), produced
    return {name: (out / "authz" / "v1" / name).read_bytes() for name in GENERATED}


def stale(generated: dict[str, bytes]) -> list[str]:
    return [name for name, data in generated.items() if (REPO / "authz" / "v1" / name).read_bytes() != data]


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    assert stale(generate(tmp_path)) == [], "stale stubs in authz/v1: run ./scripts/gen-proto and commit"


def test_a_changed_proto_makes_the_stubs_stale(tmp_path: Path) -> None:
    # The check above can fail: one more field in the proto and every generated file differs.
    src = tmp_path / "proto"
    shutil.copytree(REPO / "proto", src)
    proto = src / "authz" / "v1" / "decision.proto"
    text = proto.read_text()
    proto.write_text(text.replace("message ExplainStep {", "message ExplainStep {\n  string extra = 9;", 1))
    assert "decision_pb2.py" in stale(generate(tmp_path / "out", src))
