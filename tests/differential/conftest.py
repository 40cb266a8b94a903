"""Collects the agreement table of the differential test and prints it at the end of the run
(with ``-s`` as the run ends, and always in pytest's terminal summary)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import Row, format_table

ROWS: list[Row] = []


@pytest.fixture(scope="session")
def agreement_rows() -> Iterator[list[Row]]:
    yield ROWS
    if ROWS:
        print("\n\nDifferential test, authz vs Envoy RBAC (Istio), requests per pair:\n" + format_table(ROWS))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ROWS:
        terminalreporter.section("differential: authz vs Envoy RBAC (Istio)")
        terminalreporter.write_line(format_table(ROWS))
