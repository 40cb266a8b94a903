"""The serving bundle is frozen out of the cyclic GC; the bundle a swap replaces still goes.

settle_heap never collects: it relies on compiled bundles holding no reference cycles, so
that reference counting alone frees a replaced bundle, frozen or not. These tests hold it to
that on a bundle that uses every part of the format.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import weakref
from pathlib import Path

import yaml
from bundle_factory import spiffe, write_bundle

from authz.bundle.store import LOAD_SWITCH_INTERVAL, BundleStore
from authz.metrics import Metrics
from authz.server import settle_heap

REPO = Path(__file__).resolve().parents[2]


class Marker:
    """Something weakly referable to put inside a bundle."""


def every_feature_bundle(root: Path) -> Path:
    """A bundle with every kind of policy, rule field, condition, header and data file."""
    write_bundle(
        root,
        [
            {"name": "orders", "target": {"principals": [spiffe("prod", "orders")], "hosts": ["orders.example.com"]},
             "action": "ALLOW", "tenant": {"pathCapture": "tenant"},
             "rules": [
                 {"name": "tenant-callers",
                  "from": [{"source": {"principals": [spiffe("prod", "checkout")], "namespaces": ["prod"],
                                       "notIpBlocks": ["10.0.0.0/8"], "remoteIpBlocks": ["0.0.0.0/0"]}}],
                  "to": [{"operation": {"methods": ["GET", "POST"], "paths": ["/v1/tenants/{tenant}/orders/{**}"],
                                        "notPaths": ["/v1/tenants/{tenant}/orders/secret"],
                                        "headers": {"x-version": ["v1", "v2*"]}, "ports": ["8080"]}}],
                  "when": ["source.principal in tenant.callers", "request.method != 'DELETE' || tenant.flags.admin",
                           "!(request.path in data.blocked)"],
                  "upstreamHeaders": {"x-tenant-plan": "tenant.plan",
                                      "x-region": "string(tenant.attributes.region)"},
                  "removeHeaders": ["x-internal-debug"]},
                 {"name": "any-get", "to": [{"operation": {"methods": ["GET"], "paths": ["/health", "/api/*"]}}]},
             ]},
            {"name": "hide-admin", "action": "DENY", "denyResponse": {"status": 404, "message": "no such page"},
             "rules": [{"to": [{"operation": {"paths": ["/admin*"], "notMethods": ["OPTIONS"]}}]},
                       {"from": [{"source": {"notPrincipals": ["*"], "notNamespaces": ["kube-system"],
                                             "serviceAccounts": ["prod/batch"], "trustDomains": ["other.td"]}}]}]},
            {"name": "watch", "action": "AUDIT", "dryRun": True,
             "rules": [{"to": [{"operation": {"hosts": ["*.example.com"], "sni": ["orders.example.com"],
                                              "destinationIpBlocks": ["127.0.0.1/32"]}}]}]},
        ],
        tenants={"acme": {"plan": "enterprise", "callers": [spiffe("prod", "checkout")],
                          "flags": {"admin": True}, "attributes": {"region": "eu"}}},
        data={"blocked": ["/v1/tenants/acme/orders/blocked"]},
        denyResponse={"status": 401, "message": "present an identity"},
    )
    (root / "tenants" / "more.json").write_text(json.dumps(
        {"tenants": {f"t{i}": {"plan": "standard", "callers": [spiffe("prod", f"svc{i}")]} for i in range(50)}}))
    return root


def bump(root: Path, revision: str) -> None:
    manifest = yaml.safe_load((root / "bundle.yaml").read_text())
    manifest["revision"] = revision
    (root / "bundle.yaml").write_text(yaml.safe_dump(manifest))


def test_loading_and_replacing_bundles_leaves_no_cyclic_garbage(tmp_path: Path) -> None:
    """With the collector off, loads, swaps and a rejection leave nothing only it could free:
    what settle_heap freezes is never garbage, and what a swap drops goes at once."""
    bundles = [every_feature_bundle(tmp_path / "every"), REPO / "policies" / "example"]
    store = BundleStore(Metrics())
    gc.collect()
    gc.disable()
    try:
        for root in bundles:
            assert store.load(root)
        bump(bundles[0], "r2")
        assert store.load(bundles[0])  # replaces the example bundle
        (bundles[0] / "policies" / "broken.yaml").write_text("kind: Policy\nname: [\n")
        bump(bundles[0], "r3")
        assert not store.load(bundles[0])
        assert store.current is not None and store.current.revision == "r2"
        assert gc.collect() == 0, "loading or replacing a bundle left reference cycles behind"
    finally:
        gc.enable()


def test_settle_heap_freezes_the_serving_bundle_and_reference_counting_frees_a_replaced_one(
    tmp_path: Path,
) -> None:
    root = every_feature_bundle(tmp_path / "b")
    store = BundleStore(Metrics())
    assert store.load(root)
    marker = Marker()
    store.current = dataclasses.replace(store.current, data={"marker": [marker]})
    gone = weakref.ref(marker)
    del marker
    gc.unfreeze()
    unsubscribe = settle_heap(store)
    try:
        assert gc.get_freeze_count() > 0
        frozen = []
        for revision in ("r2", "r3", "r4", "r5"):
            bump(root, revision)
            assert store.load(root)  # the swap notifies settle_heap
            assert store.current is not None and store.current.revision == revision
            assert gone() is None, "the replaced bundle is still held"
            assert not gc.isenabled() or gc.get_count()[0] < 100, "the new bundle was left to the collector"
            frozen.append(gc.get_freeze_count())
        # Replaced bundles leave the frozen set: it does not grow with each reload.
        assert frozen[-1] - frozen[0] < 0.1 * frozen[0], frozen
    finally:
        unsubscribe()
        gc.unfreeze()


def test_listeners_run_before_the_collector_and_the_switch_interval_are_restored(tmp_path: Path) -> None:
    """While a candidate loads (and while listeners such as settle_heap run) the collector is
    off and the GIL is handed over every 0.5 ms; both are as before once the load returns."""
    root = write_bundle(tmp_path / "b", [{"name": "p", "action": "ALLOW", "rules": [{"name": "r"}]}])
    store = BundleStore(Metrics())
    seen: list[tuple[bool, float]] = []
    store.subscribe(lambda _status: seen.append((gc.isenabled(), sys.getswitchinterval())))
    before = sys.getswitchinterval()
    assert gc.isenabled() and before > LOAD_SWITCH_INTERVAL
    assert store.load(root)
    assert seen and seen[-1] == (False, LOAD_SWITCH_INTERVAL)
    assert gc.isenabled() and sys.getswitchinterval() == before
