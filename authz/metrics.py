"""Prometheus metrics: the one module that knows prometheus-client.

Each server owns its registry (tests run several in one process). Label values come from
the bundle (policy names) or small fixed sets, never from the request, so cardinality is
bounded by what operators wrote. The tenant label of authz_checks_total is opt-in
(``authz serve --metrics-tenant-label``) and only ever carries a tenant the bundle
defines; any other check has tenant="".

With ``authz serve --workers N`` each worker process writes its values to files under
PROMETHEUS_MULTIPROC_DIR and /metrics, answered by any worker, adds up every worker's files.
The variable is set before the supervisor starts: prometheus-client reads it on import, and
the workers are forked from the supervisor's imports.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from authz.version import VERSION

# prometheus-client picks file-backed values at import when this is set; so do we.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# The supervisor of --workers reads the second from a killed worker's metric files and counts
# it in the first (authz.supervisor); named once here, a module it can import without the rest.
AUDIT_DROPPED = ("authz_audit_dropped", "Audit records dropped, by reason.")
AUDIT_QUEUED_RECORDS = ("authz_audit_queued_records", "Audit records waiting for a sink (updated every second).")
DROP_WORKER_KILLED = "worker_killed"  # a reason of AUDIT_DROPPED

MULTIPROCESS_DIR_PREFIX = "authz-metrics-"


def new_multiprocess_dir() -> str:
    """A PROMETHEUS_MULTIPROC_DIR for `authz serve --workers N`, named after this process
    (exec keeps the pid: the supervisor's). Those of supervisors that were killed (SIGKILL
    leaves no chance to clean up) are removed first: their pid is gone."""
    tmp = tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        names = []
    for name in names:
        if not name.startswith(MULTIPROCESS_DIR_PREFIX):
            continue
        pid_text = name[len(MULTIPROCESS_DIR_PREFIX):].split("-", 1)[0]
        if not (pid_text.isascii() and pid_text.isdigit()):
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's, alive
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{MULTIPROCESS_DIR_PREFIX}{os.getpid()}-")


# From 10 µs: a decision is microseconds, a check through gRPC a few hundred.
DURATION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Reasons of authz_checks_rejected_total (authz/admission.py says when each applies).
REJECT_OVERLOADED = "overloaded"
REJECT_DEADLINE = "deadline_exceeded"
REJECT_CANCELLED = "cancelled"
REJECT_STALLED = "stalled"
REJECT_REASONS = (REJECT_OVERLOADED, REJECT_DEADLINE, REJECT_CANCELLED, REJECT_STALLED)


class Metrics:
    def __init__(self, tenant_label: bool = False) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.tenant_label = tenant_label
        check_labels = ["decision", "reason", "policy", "caller"] + (["tenant"] if tenant_label else [])
        self.checks = Counter(
            "authz_checks", "Authorization checks answered, by decision, reason, deciding policy and caller kind "
            "(envoy_grpc, envoy_http, api).",
            check_labels, registry=r,
        )
        self.check_duration = Histogram(
            "authz_check_duration_seconds", "Time to answer one check, from request to response.",
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.condition_errors = Counter(
            "authz_condition_errors", "CEL conditions that failed to evaluate (each denied its check).",
            registry=r,
        )
        self.audit_records = Counter(
            "authz_audit_records", "Audit records written, by sink.", ["sink"], registry=r,
        )
        self.audit_dropped = Counter(*AUDIT_DROPPED, ["reason"], registry=r)
        self.audit_sampled_out = Counter(
            "authz_audit_sampled_out",
            "Allow decisions left out of the audit log by --audit-allow-sample-rate (not drops).",
            registry=r,
        )
        self.bundle_info = Gauge(
            "authz_bundle_info", "The bundle revision being served (value 1).", ["name", "revision"],
            registry=r, multiprocess_mode="livemax",
        )
        self.bundle_loads = Counter(
            "authz_bundle_loads", "Bundle load attempts, by result (loaded, rejected, unchanged, error).",
            ["result"], registry=r,
        )
        self.bundle_last_success = Gauge(
            "authz_bundle_last_success_timestamp_seconds", "When a bundle was last loaded successfully.",
            registry=r, multiprocess_mode="livemax",
        )
        self.dry_run = Counter(
            "authz_dry_run", "Decisions of dry-run policies, by what they would have done.", ["would"],
            registry=r,
        )
        self.checks_rejected = Counter(
            "authz_checks_rejected",
            "Check calls refused or dropped before any work, by reason (admission control).",
            ["reason"], registry=r,
        )
        self.checks_in_flight = Gauge(
            "authz_checks_in_flight", "Check calls in the server (received, queued or being decided).",
            registry=r, multiprocess_mode="livesum",
        )
        self.audit_oldest_queued = Gauge(
            "authz_audit_oldest_queued_seconds",
            "Age of the oldest record waiting for a sink (0 when none waits): a stuck sink shows here "
            "before its queue overflows.",
            ["sink"], registry=r, multiprocess_mode="livemax",
        )
        self.audit_queued_bytes = Gauge(
            "authz_audit_queued_bytes", "Bytes of audit records waiting for a sink.", ["sink"],
            registry=r, multiprocess_mode="livesum",
        )
        self.audit_queued_records = Gauge(*AUDIT_QUEUED_RECORDS, ["sink"], registry=r, multiprocess_mode="livesum")
        self.build_info = Gauge(
            "authz_build_info", "The version of authz answering (value 1).", ["version"],
            registry=r, multiprocess_mode="livemax",
        )
        self.build_info.labels(VERSION).set(1)
        self.trace_spans_exported = Counter(
            "authz_trace_spans_exported", "Spans accepted by the OTLP receiver (--otlp-endpoint).",
            registry=r,
        )
        self.trace_spans_dropped = Counter(
            "authz_trace_spans_dropped",
            "Spans dropped, by reason (queue_full, export_failed, rejected by the receiver).",
            ["reason"], registry=r,
        )
        # TLS (authz/certs.py): label use = grpc, http (our listeners) or client (outbound).
        self.tls_cert_expiry = Gauge(
            "authz_tls_cert_expiry_timestamp_seconds",
            "When the certificate in use expires (Unix seconds), by use.",
            ["use"], registry=r, multiprocess_mode="livemin",
        )
        self.tls_ca_expiry = Gauge(
            "authz_tls_ca_expiry_timestamp_seconds",
            "When the first certificate of the CA bundle in use expires (Unix seconds), by use.",
            ["use"], registry=r, multiprocess_mode="livemin",
        )
        self.tls_rotations = Counter(
            "authz_tls_rotations", "Certificates rotated from changed files, by use.", ["use"],
            registry=r,
        )
        self.tls_rotation_failures = Counter(
            "authz_tls_rotation_failures",
            "Changed certificate files that could not serve (the old ones kept serving), by use.",
            ["use"], registry=r,
        )
        self.tls_rotation_failing = Gauge(
            "authz_tls_rotation_failing",
            "1 while the certificate files on disk cannot serve and older ones do, by use.",
            ["use"], registry=r, multiprocess_mode="livemax",
        )
        self.callers_refused = Counter(
            "authz_callers_refused",
            "gRPC calls refused before any decision (PERMISSION_DENIED), by reason.",
            ["reason"], registry=r,
        )
        # Series that alerts and dashboards use exist from the start, at 0.
        for reason in ("queue_full", "export_failed", "rejected"):
            self.trace_spans_dropped.labels(reason)
        for result in ("loaded", "rejected", "unchanged", "error"):
            self.bundle_loads.labels(result)
        for would in ("allow", "deny", "error"):  # error: its condition failed; never enforced
            self.dry_run.labels(would)
        for reason in REJECT_REASONS:
            self.checks_rejected.labels(reason)
        # Children seen on every check are cached so the hot path skips label lookups.
        self._check_children: dict[tuple[bool, str, str, str, str], Counter] = {}
        self._serving: tuple[str, str] | None = None

    def count_check(self, allowed: bool, reason: str, policy: str, seconds: float,
                    tenant: str | None = None, caller: str = "envoy_grpc") -> None:
        """Count one check. ``tenant`` must be a tenant of the serving bundle, or None;
        ``caller`` one of the fixed caller kinds of authz.check.CALLERS."""
        key = (allowed, reason, policy, (tenant or "") if self.tenant_label else "", caller)
        child = self._check_children.get(key)
        if child is None:
            labels = ["allow" if allowed else "deny", reason, policy, caller]
            if self.tenant_label:
                labels.append(key[3])
            child = self.checks.labels(*labels)
            self._check_children[key] = child
        child.inc()
        self.check_duration.observe(seconds)

    def bundle_loaded(self, name: str, revision: str, when: float) -> None:
        if MULTIPROCESS:
            # Files keep every series a worker ever wrote: zero the old one instead.
            if self._serving is not None and self._serving != (name, revision):
                self.bundle_info.labels(*self._serving).set(0)
        else:
            self.bundle_info.clear()
        self._serving = (name, revision)
        self.bundle_info.labels(name, revision).set(1)
        self.bundle_loads.labels("loaded").inc()
        self.bundle_last_success.set(when)

    def exposition(self) -> bytes:
        if MULTIPROCESS:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
