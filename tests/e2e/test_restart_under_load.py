"""Rolling restart under load through a real Envoy: two `authz serve` behind one cluster with
gRPC health checks, steady traffic, one instance restarted (SIGTERM, drain, start again on the
same port), then the other. Not one request may be denied or fail because of the restarts:
on SIGTERM an instance says NOT_SERVING at once and keeps answering for --drain-grace while
Envoy takes it out of the cluster, then finishes what it has in flight and exits 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .harness import ORDERS, AuthzProcess, EchoUpstream, EnvoyProcess, ListenerSpec
from support.pki import PKI
from .test_fleet import bundle_files, wait_for
from .test_reload_under_load import Traffic

HEALTH_INTERVAL = "0.25s"


class TwoAuthzEnvoy(EnvoyProcess):
    """The harness's Envoy, its authz cluster made of two endpoints with gRPC health checks."""

    def __init__(self, *args: Any, authz_ports: tuple[int, int], **kw: Any) -> None:
        super().__init__(*args, authz_grpc_port=authz_ports[0], **kw)
        self.authz_ports = authz_ports

    def bootstrap(self) -> dict[str, Any]:
        doc = super().bootstrap()
        cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "authz")
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in self.authz_ports
        ]
        # Two failed checks take an instance out (0.5 s, well inside its 2 s grace); one slow
        # answer on a loaded machine does not. Should both ever look unhealthy, Envoy's panic
        # mode sends to both, and a draining instance still answers during its grace.
        cluster["health_checks"] = [{
            "timeout": "2s",
            "interval": HEALTH_INTERVAL,
            "no_traffic_interval": HEALTH_INTERVAL,
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": "envoy.service.auth.v3.Authorization"},
        }]
        return doc


def test_restarting_each_instance_under_load_denies_nothing(
    tmp_path: Path, pki: PKI, upstream: EchoUpstream
) -> None:
    bundle = tmp_path / "bundle"
    for name, data in bundle_files("r1", allow_probe=True).items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data)
    flags = ["--drain-grace", "2", "--drain-timeout", "10"]
    instances = [AuthzProcess(bundle, tmp_path / f"authz-{i}", extra_args=flags) for i in range(2)]
    envoy: TwoAuthzEnvoy | None = None
    try:
        for a in instances:
            a.start()
        envoy = TwoAuthzEnvoy(tmp_path / "envoy", pki, [ListenerSpec(ORDERS, pki.servers["orders-api"])],
                              upstream_port=upstream.port,
                              authz_ports=(instances[0].grpc_port, instances[1].grpc_port))
        envoy.start()
        with Traffic(pki, envoy.port(ORDERS)) as traffic:
            assert wait_for(lambda: traffic.count() >= 40, 10)
            codes: list[int] = []
            for i in range(2):
                old = instances[i]
                assert old.proc is not None
                old.stop()  # SIGTERM; returns once it has exited
                codes.append(old.proc.returncode)
                new = AuthzProcess(bundle, tmp_path / f"authz-{i}-again", extra_args=flags)
                new.grpc_port = old.grpc_port  # the same endpoint comes back
                new.start()
                instances[i] = new
                started = traffic.count()
                assert wait_for(lambda: traffic.count() >= started + 80, 20)  # traffic flows on
        results = traffic.results
        stats = envoy_stats(envoy)
    finally:
        if envoy is not None:
            envoy.stop()
        for a in instances:
            a.stop()
    assert codes == [0, 0]
    assert len(results) >= 300
    bad = [r for r in results if r.error is not None or r.status != 200]
    assert not bad, f"{len(bad)} of {len(results)} requests failed or were denied, e.g. {bad[:3]}"
    assert stats.get("cluster.authz.health_check.failure", 0) >= 2  # Envoy saw each one go


def envoy_stats(envoy: EnvoyProcess) -> dict[str, int]:
    answer = envoy._admin_get("/stats")
    out: dict[str, int] = {}
    if answer is None:
        return out
    for line in answer[1].splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            out[name] = int(value)
    return out

