"""Makes tests/support importable from every test directory (pytest puts this folder on sys.path)."""

import os

# Fixtures shared by test directories: ``registry`` (a real OCI registry).
pytest_plugins = ["support.registry"]

# After SIGTERM `authz serve` keeps answering for --drain-grace (default 5 s) so that Envoy and
# Kubernetes can take it out of rotation first. The many tests that start and stop a server
# have nothing to take it out of; the drain tests pass their own --drain-grace, and a flag wins
# over the environment (docs/configuration.md).
os.environ.setdefault("AUTHZ_DRAIN_GRACE", "0")
