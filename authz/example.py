"""Where the example bundle is: inside the installed package, or policies/example in a checkout."""

from __future__ import annotations

from pathlib import Path


def example_bundle() -> Path:
    """The example bundle: inside the installed package, or policies/example in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "example_bundle", here.parent / "policies" / "example"):
        if (candidate / "bundle.yaml").is_file():
            return candidate
    raise FileNotFoundError("the example bundle is not installed with this package")
