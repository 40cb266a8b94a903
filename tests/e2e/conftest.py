"""Fixtures: one PKI, echo upstream, real authz server and real Envoy shared by the module.

The authz server serves the example bundle from this checkout (``policies/example``). Each
fixture stops its process in ``finally`` so nothing is left running when a test fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import AuthzProcess, EchoUpstream, EnvoyProcess, Mesh, listener_specs
from support.pki import PKI, generate_pki

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_BUNDLE = REPO_ROOT / "policies" / "example"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return generate_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def upstream() -> Iterator[EchoUpstream]:
    server = EchoUpstream().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def authz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzProcess]:
    proc = AuthzProcess(EXAMPLE_BUNDLE, tmp_path_factory.mktemp("authz"))
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def envoy(
    tmp_path_factory: pytest.TempPathFactory,
    pki: PKI,
    upstream: EchoUpstream,
    authz_server: AuthzProcess,
) -> Iterator[EnvoyProcess]:
    proc = EnvoyProcess(
        tmp_path_factory.mktemp("envoy"),
        pki,
        listener_specs(pki),
        authz_grpc_port=authz_server.grpc_port,
        upstream_port=upstream.port,
    )
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def mesh(
    pki: PKI, upstream: EchoUpstream, authz_server: AuthzProcess, envoy: EnvoyProcess
) -> Mesh:
    return Mesh(pki, upstream, authz_server, envoy)


@pytest.fixture
def private_mesh(tmp_path: Path, pki: PKI, upstream: EchoUpstream) -> Iterator[Mesh]:
    """A separate authz + Envoy pair for tests that stop or break the authz server."""
    authz = AuthzProcess(EXAMPLE_BUNDLE, tmp_path / "authz")
    envoy: EnvoyProcess | None = None
    try:
        authz.start()
        envoy = EnvoyProcess(
            tmp_path / "envoy",
            pki,
            listener_specs(pki),
            authz_grpc_port=authz.grpc_port,
            upstream_port=upstream.port,
        )
        envoy.start()
        yield Mesh(pki, upstream, authz, envoy)
    finally:
        if envoy is not None:
            envoy.stop()
        authz.stop()
