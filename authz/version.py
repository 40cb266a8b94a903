"""The version of authz: the installed distribution's, as `authz --version`, /v1/status and the
authz_build_info metric report it."""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("authz")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


VERSION = _version()
