"""Where the example bundle lives, and the exit code of usage errors.

A leaf module: cli.py, lint.py and testing.py all need these, and none of them may import
cli.py (it imports them).
"""

from __future__ import annotations

from pathlib import Path

EXIT_USAGE = 2


def example_bundle() -> Path:
    """The example bundle: inside the installed package, or policies/example in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "example_bundle", here.parent / "policies" / "example"):
        if (candidate / "bundle.yaml").is_file():
            return candidate
    raise FileNotFoundError("the example bundle is not installed with this package")
