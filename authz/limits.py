"""Bounds on what one caller can make the service hold or do, and their `authz serve` flags.

Request limits are checked by check.py before a request is parsed further, normalised or
matched: a request over any of them is denied with a fixed reason (one metric label value
per limit) and a decision id, at the cost of a few length reads. Their defaults are above
Envoy's own defaults (60 KiB of request headers, 100 headers), so a request Envoy lets
through with its defaults is never refused here for its size.

Serving limits bound the gRPC listener (docs/operations.md): concurrent checks, streams per
connection, keepalive and idle connections, and the drain at SIGTERM.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from envoy.service.auth.v3 import external_auth_pb2

from authz import options


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_request_bytes: int = 1024 * 1024  # the whole serialized CheckRequest
    max_path_bytes: int = 64 * 1024  # above Envoy's 60 KiB of headers: whatever it passes
    max_headers: int = 200
    max_header_bytes: int = 96 * 1024  # names and values added up

    @property
    def too_large(self) -> str:
        return f"request too large: over {self.max_request_bytes} bytes"

    def violation(self, check: external_auth_pb2.CheckRequest, message_bytes: int | None = None) -> str | None:
        """The deny reason of the first limit ``check`` breaks, or None. ``message_bytes``, the
        size on the wire when known, spares adding up the headers of a small request."""
        http = check.attributes.request.http
        if len(http.path) > self.max_path_bytes:
            return f"request too large: path over {self.max_path_bytes} bytes"
        count = len(http.headers) or len(http.header_map.headers)
        if count > self.max_headers:
            return f"request too large: over {self.max_headers} headers"
        if message_bytes is not None and message_bytes <= self.max_header_bytes:
            return None
        if http.headers:
            size = sum(len(k) + len(v) for k, v in http.headers.items())
        else:
            size = sum(len(h.key) + len(h.value) + len(h.raw_value) for h in http.header_map.headers)
        if size > self.max_header_bytes:
            return f"request too large: headers over {self.max_header_bytes} bytes"
        return None


@dataclass(frozen=True, slots=True)
class ServeLimits:
    """How the gRPC listener behaves under load and at shutdown (docs/operations.md)."""

    drain_grace: float = 5.0  # after SIGTERM: NOT_SERVING but still answering
    drain_timeout: float = 15.0  # then: new streams refused, in-flight checks finish within this
    max_concurrent_checks: int = 256
    grpc_threads: int = 8  # serving threads (docs/performance.md, "Serving stack")
    max_streams_per_connection: int = 1000
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC's own cap; RequestLimits denies below it
    keepalive_seconds: float = 30.0  # ping a connection this often...
    keepalive_timeout_seconds: float = 10.0  # ...and close it when the ping is not answered
    max_connection_idle_seconds: float = 300.0  # close a connection with no call for this long
    # Cancel a call whose message has not come after this (a half-open stream): it holds a
    # serving thread meanwhile. Envoy and gRPC clients send the message with the headers.
    stall_seconds: float = 5.0
    cpu_affinity: str = "gil"  # or "auto", "none" (authz/affinity.py)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("limits (docs/operations.md)")
    g.add_argument("--drain-grace", type=options.non_negative_float, default=5.0, metavar="SECONDS",
                   help="after SIGTERM, keep answering checks this long while health says "
                        "NOT_SERVING (default 5)")
    g.add_argument("--drain-timeout", type=options.non_negative_float, default=15.0, metavar="SECONDS",
                   help="then refuse new streams and let in-flight checks finish within this (default 15)")
    g.add_argument("--max-concurrent-checks", type=options.positive_int, default=256, metavar="N",
                   help="gRPC calls in the server at once, queued or being decided; more are refused "
                        "with RESOURCE_EXHAUSTED (default 256)")
    g.add_argument("--grpc-threads", type=options.positive_int, default=8, metavar="N",
                   help="threads serving gRPC calls, each one call at a time from its first byte "
                        "to its answer (default 8)")
    g.add_argument("--cpu-affinity", choices=["gil", "auto", "none"], default="gil",
                   help="gil: the threads of a serving process that run Python share one CPU, re-chosen "
                        "every second as the rest of the machine leaves one idler; gRPC's I/O threads "
                        "run on any (default; docs/performance.md, \"CPU affinity\"). auto: every thread "
                        "on one CPU for good, worker i on the i-th from the last (dedicated CPUs). none: "
                        "the kernel places every thread")
    g.add_argument("--max-streams-per-connection", type=options.positive_int, default=1000, metavar="N",
                   help="concurrent HTTP/2 streams one client connection may open (default 1000)")
    g.add_argument("--max-request-bytes", type=options.positive_int, default=1024 * 1024, metavar="N",
                   help="largest CheckRequest decided; larger ones are denied (default 1 MiB)")
    g.add_argument("--max-path-bytes", type=options.positive_int, default=64 * 1024, metavar="N",
                   help="longest request path decided; longer ones are denied (default 64 KiB)")
    g.add_argument("--max-headers", type=options.positive_int, default=200, metavar="N",
                   help="most request headers decided; more are denied (default 200)")
    g.add_argument("--max-header-bytes", type=options.positive_int, default=96 * 1024, metavar="N",
                   help="request header names and values added up; more are denied (default 96 KiB)")


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(max_request_bytes=args.max_request_bytes, max_path_bytes=args.max_path_bytes,
                         max_headers=args.max_headers, max_header_bytes=args.max_header_bytes)


def serve_limits(args: argparse.Namespace) -> ServeLimits:
    return ServeLimits(
        drain_grace=args.drain_grace, drain_timeout=args.drain_timeout,
        max_concurrent_checks=args.max_concurrent_checks,
        grpc_threads=args.grpc_threads,
        cpu_affinity=args.cpu_affinity,
        max_streams_per_connection=args.max_streams_per_connection,
        # gRPC refuses (without a decision) only far above what we deny with a reason.
        max_message_bytes=max(4 * 1024 * 1024, 2 * args.max_request_bytes),
    )


# --- open files ------------------------------------------------------------------------------

def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one, as Go's runtime does, and return
    the soft limit now. Containers are often started with a soft limit of 1024: the probe
    port's connections alone could then take every descriptor, and Envoy's next gRPC
    connection, a bundle reload and the kubelet's probe would all fail."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # not allowed here: live with the soft limit
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (1 << 20) if soft == resource.RLIM_INFINITY else soft


def connection_budget(open_files: int, wanted: int = 1024) -> int:
    """Connections one HTTP listener may hold: ``wanted``, but at most a quarter of the open
    files, so that the probe port and HTTP ext_authz together leave half of them to gRPC,
    bundle files and the audit sinks."""
    return max(16, min(wanted, open_files // 4))
