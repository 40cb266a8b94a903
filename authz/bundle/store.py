"""The served bundle: one reference to an immutable PolicySet, swapped in one assignment.

A check reads ``store.current`` once and uses that PolicySet throughout, so old and new
never mix inside one check. Loading (parse, validate, compile) happens before the swap;
a candidate that fails leaves the current one serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from authz.bundle.loader import BundleError
from authz.engine.compile import load_policy_set
from authz.engine.decide import PolicySet
from authz.metrics import Metrics

log = logging.getLogger("authz.bundle")


@dataclass(frozen=True, slots=True)
class Status:
    revision: str | None
    loaded_at: float | None
    last_attempt_at: float | None
    last_error: str | None


class BundleStore:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.current: PolicySet | None = None
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self._lock = threading.Lock()  # serialises loads, never taken by a check

    def load(self, root: Path) -> bool:
        """Compile the bundle at ``root`` and swap it in; False (and logged) when rejected."""
        with self._lock:
            self._last_attempt = time.time()
            try:
                candidate = load_policy_set(root)
            except BundleError as exc:
                self._last_error = str(exc)
                self.metrics.bundle_loads.labels("rejected").inc()
                log.error("%s", exc)
                return False
            self.current = candidate
            self._loaded_at = time.time()
            self._last_error = None
            self.metrics.bundle_loaded(candidate.name, candidate.revision, self._loaded_at)
            log.info("serving bundle %s revision %s (%d policies, %d tenants)",
                     candidate.name, candidate.revision, len(candidate.policies), len(candidate.tenants))
            return True

    def status(self) -> Status:
        cur = self.current
        return Status(cur.revision if cur else None, self._loaded_at, self._last_attempt, self._last_error)
