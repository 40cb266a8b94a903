"""The serving bundle is frozen out of the cyclic GC, and a replaced one is still freed."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from pathlib import Path

from bundle_factory import write_bundle

from authz.bundle.store import BundleStore
from authz.metrics import Metrics
from authz.server import settle_heap


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settle_heap_freezes_the_serving_bundle_and_frees_a_replaced_one(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", [{"name": "p", "action": "ALLOW", "rules": [{"name": "r"}]}])
    store = BundleStore(Metrics())
    assert store.load(root)
    # Garbage only the cyclic collector can free, reachable from the serving bundle.
    cycle = Cycle()
    store.current = dataclasses.replace(store.current, data={"cycle": cycle})
    gone = weakref.ref(cycle)
    del cycle
    gc.unfreeze()
    unsubscribe = settle_heap(store)
    try:
        assert gc.get_freeze_count() > 0
        (root / "bundle.yaml").write_text((root / "bundle.yaml").read_text().replace("revision: r1", "revision: r2"))
        assert store.load(root)  # the swap notifies settle_heap
        assert store.current is not None and store.current.revision == "r2"
        assert gone() is None, "the replaced bundle's cycle stayed frozen"
        assert gc.get_freeze_count() > 0
    finally:
        unsubscribe()
        gc.unfreeze()


def test_listeners_run_before_the_collector_and_the_switch_interval_are_restored(tmp_path: Path) -> None:
    """While a candidate loads (and while listeners such as settle_heap run) the collector is
    off and the GIL is handed over every 0.5 ms; both are as before once the load returns."""
    import sys

    from authz.bundle.store import LOAD_SWITCH_INTERVAL

    root = write_bundle(tmp_path / "b", [{"name": "p", "action": "ALLOW", "rules": [{"name": "r"}]}])
    store = BundleStore(Metrics())
    seen: list[tuple[bool, float]] = []
    store.subscribe(lambda _status: seen.append((gc.isenabled(), sys.getswitchinterval())))
    before = sys.getswitchinterval()
    assert gc.isenabled() and before > LOAD_SWITCH_INTERVAL
    assert store.load(root)
    assert seen and seen[-1] == (False, LOAD_SWITCH_INTERVAL)
    assert gc.isenabled() and sys.getswitchinterval() == before
