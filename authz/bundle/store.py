"""The served bundle and the gate every candidate passes before it serves.

One reference, ``store.current``, points at an immutable PolicySet; a check reads it once
and uses that PolicySet throughout, so old and new never mix inside one check.

The gate, in one place (``BundleStore.load_snapshot``), for every source alike:

    snapshot (bytes in memory) -> verify signature and digests -> parse and validate
      -> compile (policies, CEL, tenant sets) -> run the bundle's tests -> swap

A candidate that fails any step is logged with its revision and file:line reasons,
counted as ``authz_bundle_loads_total{result="rejected"}``, and the current bundle keeps
serving. With a verification key, a signed bundle whose manifest ``serial`` is lower than the
serving one's, or the persisted one's, is refused as a rollback unless ``allow_rollback``.
Loads are serialised by a lock (never taken by a check), so at most the serving
bundle and one candidate exist at any time; the store keeps no reference to a replaced
PolicySet.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from authz import gradual
from authz.bundle import archive, persist
from authz.bundle.archive import DEFAULT_LIMITS, Limits, Snapshot
from authz.bundle.cases import run_cases
from authz.bundle.loader import BundleError, BundleFiles, read_bundle
from authz.bundle.schema import Problem
from authz.bundle.sources import Source, SourceUnavailable, read_directory
from authz.bundle.yamlpos import Position
from authz.engine.compile import attach_tenants, compile_bundle, detach_tenants
from authz.engine.decide import PolicySet
from authz.metrics import Metrics

log = logging.getLogger("authz.bundle")

LOADED = "loaded"
REJECTED = "rejected"
UNCHANGED = "unchanged"
ERROR = "error"  # the source could not be read: no candidate to judge


@dataclass(frozen=True, slots=True)
class Status:
    revision: str | None
    loaded_at: float | None
    last_attempt_at: float | None
    last_error: str | None
    name: str | None = None
    source: str | None = None  # the configured source
    served_from: str | None = None  # where the serving bundle came from
    last_result: str | None = None  # loaded, rejected, unchanged or error
    last_error_at: float | None = None
    serving_persisted: bool = False
    persisted_reason: str | None = None  # why the persisted bundle serves instead of the source

    @property
    def ready(self) -> bool:
        return self.revision is not None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ready"] = self.ready
        return d


def check_candidate(
    snap: Snapshot,
    key: Ed25519PublicKey | None = None,
    run_tests: bool = True,
    allow_empty: bool = False,
) -> PolicySet:
    """The gate without the swap: verify, read, compile and test ``snap``; raises BundleError.

    A bundle without policies is refused unless ``allow_empty`` (--allow-empty-bundle).
    """
    manifest = archive.verify(snap, key)
    with archive.materialize(snap) as root:
        files = read_bundle(root, require_policies=not allow_empty)
    if manifest is not None:
        for field in ("revision", "name"):
            want = str(manifest.get(field, ""))
            have = str(files.manifest.value.get(field, ""))
            if want and want != have:
                raise BundleError(
                    [
                        Problem(
                            files.manifest.at((field,)),
                            f"{field} {have!r} differs from {want!r} in MANIFEST.json",
                        )
                    ],
                    files.revision,
                )
    try:
        policy_set = compile_bundle(files)
        if run_tests and files.tests:
            run_bundle_tests(policy_set, files)
    finally:
        # The parsed documents, piece by piece (checks go on meanwhile), also when the
        # candidate is refused: dropped whole, 100k parsed tenants pause checks 20 ms.
        gradual.release(files)
        del files
    policy_set, table = detach_tenants(policy_set)
    return attach_tenants(policy_set, table)


def run_bundle_tests(policy_set: PolicySet, files: BundleFiles) -> None:
    """Run the bundle's tests/*.yaml against the compiled candidate; raise if any case fails."""
    report = run_cases(policy_set, files.tests)
    if report.failed:
        raise BundleError(
            [
                Problem(_position(r.location), f"bundle test '{r.name}' failed: {r.message}")
                for r in report.failed
            ],
            files.revision,
        )


def _trim() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return lambda: trim(0)


_MALLOC_TRIM = _trim()


LOAD_SWITCH_INTERVAL = 0.0005  # seconds


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a candidate is parsed and compiled.

    A load allocates millions of short-lived objects; each of them counts towards the
    collector's thresholds, and every full collection it triggers walks the whole heap with
    the GIL held: 0.1 s to 2.4 s pauses of every check while a 100k-tenant or 10k-rule
    candidate loads. Loads create no reference cycles, and neither do compiled bundles
    (tests/unit/test_heap.py), so reference counting frees all a load discards and the bundle
    a swap replaces. What is already garbage is collected first: the collector is off for the
    whole load, and server.settle_heap freezes whatever survives it.
    """
    was_enabled = gc.isenabled()
    if was_enabled:
        # Walks only what is not frozen: in `authz serve`, what checks allocated since the
        # last swap (milliseconds), never the bundle.
        gc.collect()
    gc.disable()
    # The load is one CPU-bound thread among the serving ones: hand the GIL over every
    # LOAD_SWITCH_INTERVAL instead of every 5 ms, so that a check, which needs it several
    # times (taken by gRPC's poller, handed to a serving thread, back for the answer), does
    # not wait 5 ms each time.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, LOAD_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if was_enabled:
            gc.enable()


def _return_freed_memory() -> None:
    """Hand the parse and compile garbage of a reload back to the OS.

    Freed memory otherwise stays in the allocator's arenas and resident memory ratchets up
    to the peak of the largest load. ctypes releases the GIL for the call, so checks go on.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM()


def _position(location: str) -> Position:
    parts = str(location).rsplit(":", 2)
    nums: list[int] = []
    while len(parts) > 1 and parts[-1].isascii() and parts[-1].isdigit():
        nums.insert(0, int(parts.pop()))
    line, column = (nums + [1, 1])[:2]
    return Position(parts[0] if len(parts) == 1 else ":".join(parts), line, column)


class BundleStore:
    def __init__(
        self,
        metrics: Metrics,
        *,
        verification_key: Ed25519PublicKey | None = None,
        persist_dir: Path | None = None,
        limits: Limits = DEFAULT_LIMITS,
        run_tests: bool = True,
        source: str | None = None,
        allow_rollback: bool = False,
        allow_empty: bool = False,
    ) -> None:
        self.metrics = metrics
        self.verification_key = verification_key
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None
        self.limits = limits
        self.run_tests = run_tests
        self.allow_empty = allow_empty
        self.current: PolicySet | None = None
        self._source = source
        self._digest: str | None = None  # content digest of the serving bundle
        self._last_candidate: str | None = (
            None  # content digest of the last candidate from the source
        )
        self._served_from: str | None = None
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._last_result: str | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._persisted_reason: str | None = None
        self._listeners: list[Callable[[Status], object]] = []
        self._lock = threading.RLock()  # serialises loads, never taken by a check
        self.allow_rollback = allow_rollback
        self._serial: int | None = None  # manifest serial of the serving signed bundle
        self._floor_name: str | None = None  # the persisted bundle's name, set by _persisted_serial
        self._floor = self._persisted_serial()  # (serial, what it belongs to) not to go below

    # --- rollback --------------------------------------------------------------------

    def _persisted_serial(self) -> tuple[int, str] | None:
        if self.verification_key is None or self.persist_dir is None:
            return None
        try:
            saved = persist.load(self.persist_dir, self.limits)
            if saved is None:
                return None
            archive.verify(saved.snapshot, self.verification_key)
            serial = archive.manifest_serial(saved.snapshot)
            manifest = json.loads(saved.snapshot.files[archive.MANIFEST_JSON])
            self._floor_name = str(manifest.get("name")) if isinstance(manifest, dict) and manifest.get("name") else None
        except BundleError as exc:
            log.warning("persisted bundle gives no rollback floor: %s", exc)
            return None
        if serial is None:
            return None
        return serial, f"the persisted bundle (revision {saved.meta.get('revision', '?')})"

    def _rollback(self, snap: Snapshot, persisted: bool = False) -> BundleError | None:
        """The refusal of a signed candidate older than what serves or was persisted (no newer,
        unless it is that very bundle: the one serving, or ``persisted``, the saved copy)."""
        if self.verification_key is None:
            return None
        serial = archive.manifest_serial(snap)  # BundleError for a malformed serial
        floors = [f for f in (self._floor,) if f is not None]
        cur = self.current
        if self._serial is not None and cur is not None:
            floors.append((self._serial, f"the serving bundle (revision {cur.revision})"))
        if not floors:
            return None
        floor, what = max(floors)
        # Equal is not newer: two builds that share a serial (a reused --serial, a commit time
        # as SOURCE_DATE_EPOCH) would replace each other back and forth.
        if serial is not None and (serial > floor or (serial == floor and (persisted or snap.digest == self._digest))):
            return None
        got = "carries no serial" if serial is None else f"has serial {serial}"
        if self.allow_rollback:
            log.warning("bundle from %s %s, older than %s with serial %d: accepted as a rollback "
                        "(--allow-rollback)", snap.origin, got, what, floor)
            return None
        older = "older than" if serial is None or serial < floor else "no newer than"
        return archive.reject(
            archive.MANIFEST_JSON,
            f"rollback refused: the signed manifest {got}, {older} {what} with serial "
            f"{floor}; authz serve --allow-rollback accepts older bundles",
        )

    def _renamed(self, candidate: PolicySet) -> BundleError | None:
        """The refusal of a signed bundle of another name than the one serving: every bundle
        CI signs with the key (staging's, another team's) verifies, and one built later
        would otherwise replace production's."""
        cur = self.current
        # After a restart, the persisted bundle's name stands for the serving one's.
        serving = cur.name if cur is not None else self._floor_name
        if self.verification_key is None or serving is None or candidate.name == serving:
            return None
        if self.allow_rollback:
            log.warning("bundle %s replaces bundle %s (--allow-rollback)", candidate.name, serving)
            return None
        what = "serving" if cur is not None else "persisted"
        return archive.reject(
            "bundle.yaml", f"bundle {candidate.name!r} is not the {what} bundle {serving!r}: a signed bundle "
            "replaces only one of its own name; authz serve --allow-rollback accepts another")

    # --- loading -----------------------------------------------------------------------

    def load(self, root: Path) -> bool:
        """Gate the bundle directory at ``root``; True when it serves (loaded or unchanged)."""
        with self._lock:
            try:
                snap = read_directory(Path(root), self.limits)
            except SourceUnavailable as exc:
                self._unavailable(str(root), str(exc))
                return False
            except BundleError as exc:
                self._reject(str(root), exc)
                return False
            return self.load_snapshot(snap) in (LOADED, UNCHANGED)

    def fetch_and_load(self, source: Source, force: bool = False) -> str:
        """Fetch from ``source`` and gate what it gives; returns the result."""
        with self._lock:
            if self._source is None:
                self._source = source.description
            try:
                snap = source.fetch(force)
            except SourceUnavailable as exc:
                return self._unavailable(source.description, str(exc))
            except BundleError as exc:
                return self._reject(source.description, exc)
            except Exception as exc:  # noqa: BLE001 - a bug in a source must not stop the reloader
                log.exception("bundle from %s: unexpected error while fetching", source.description)
                return self._reject(source.description, _internal(source.description, exc))
            if snap is None:  # e.g. HTTP 304: the same bytes as the last candidate it gave
                same = self._last_candidate is not None and self._last_candidate == self._digest
                return self._unchanged(source.description, keep_persisted=not same)
            return self.load_snapshot(snap, force=force)

    def load_snapshot(
        self, snap: Snapshot, *, force: bool = False, persisted_reason: str | None = None
    ) -> str:
        """The gate: verify, compile, test, swap. Returns loaded, rejected or unchanged."""
        with self._lock:
            self._last_attempt = time.time()
            if persisted_reason is None:
                self._last_candidate = snap.digest
            if self.current is not None and snap.digest == self._digest and not force:
                return self._unchanged(snap.origin, keep_persisted=persisted_reason is not None)
            with _collector_paused():
                result = self._gate_and_swap(snap, persisted_reason)
                if result == LOADED:
                    del snap
                    # Listeners (server.settle_heap freezes the new bundle) run before the
                    # collector is back on: re-enabled first, its thresholds, counted over
                    # the whole load, would start a collection that walks the new bundle
                    # at the next allocation, a pause of every check.
                    self._notify()
            if result != LOADED:
                del snap
                _return_freed_memory()  # a rejected candidate leaves nothing resident either
                return result
        _return_freed_memory()
        return LOADED

    def _gate_and_swap(self, snap: Snapshot, persisted_reason: str | None) -> str:
        """Verify, compile and test ``snap``; swap it in if it passes (under self._lock)."""
        try:
            refusal = self._rollback(snap, persisted=persisted_reason is not None)
            if refusal is not None:
                raise refusal
            serial = archive.manifest_serial(snap)
            candidate = check_candidate(
                snap, self.verification_key, self.run_tests, self.allow_empty
            )
            renamed = self._renamed(candidate)
            if renamed is not None:
                raise renamed
        except BundleError as exc:
            return self._reject(snap.origin, exc)
        except Exception as exc:  # noqa: BLE001 - a bug in a step must not take the server down
            log.exception("bundle from %s: unexpected error in the gate", snap.origin)
            return self._reject(snap.origin, _internal(snap.origin, exc))
        replaced = self.current
        self.current = candidate  # the swap: one assignment (server.settle_heap then freezes it
        # out of later collections)
        now = time.time()
        self._digest = snap.digest
        self._serial = serial if self.verification_key is not None else None
        self._served_from = snap.origin
        self._loaded_at = now
        self._last_result = LOADED
        self._persisted_reason = persisted_reason
        self.metrics.bundle_loaded(candidate.name, candidate.revision, now)
        log.info(
            "serving bundle %s revision %s from %s (%d policies, %d tenants)%s",
            candidate.name,
            candidate.revision,
            snap.origin,
            len(candidate.policies),
            len(candidate.tenants),
            f" [persisted copy: {persisted_reason}]" if persisted_reason else "",
            extra={"bundle": candidate.name, "revision": candidate.revision, "source": snap.origin},
        )
        if self.persist_dir is not None and persisted_reason is None:
            try:
                persist.save(self.persist_dir, snap, candidate.name, candidate.revision)
            except OSError as exc:
                log.error(
                    "cannot persist bundle revision %s to %s: %s",
                    candidate.revision,
                    self.persist_dir,
                    exc,
                )
        # 2 references, this local and getrefcount's: no check in flight still decides with
        # the replaced bundle, so it is taken apart piece by piece. Dropped whole, 10k rules
        # are a 23 ms pause of every check. Otherwise the last check to use it frees it.
        if sys.getrefcount(replaced) == 2:
            gradual.release(replaced)
        del replaced
        return LOADED

    def restore_persisted(self, reason: str) -> bool:
        """Serve the ``--persist`` copy as the source gave no good bundle; True if it serves."""
        if self.persist_dir is None:
            return False
        with self._lock:
            try:
                saved = persist.load(self.persist_dir, self.limits)
            except BundleError as exc:
                self._reject(str(self.persist_dir / persist.ARCHIVE), exc)
                return False
            if saved is None:
                return False
            log.warning(
                "serving the persisted bundle (revision %s, saved from %s): %s",
                saved.meta.get("revision", "?"),
                saved.meta.get("source", "?"),
                reason,
            )
            result = self.load_snapshot(saved.snapshot, force=True, persisted_reason=reason)
            return result == LOADED

    # --- outcomes ----------------------------------------------------------------------

    def _reject(self, origin: str, exc: BundleError) -> str:
        now = time.time()
        self._last_attempt = now
        self._last_result = REJECTED
        self._last_error = f"{origin}: {exc}"
        self._last_error_at = now
        self.metrics.bundle_loads.labels(REJECTED).inc()
        cur = self.current
        log.error(
            "%s: %s%s",
            origin,
            exc,
            f"\n  still serving revision {cur.revision}" if cur is not None else "",
            extra={
                "source": origin,
                "rejected_revision": exc.revision or None,
                "revision": cur.revision if cur is not None else None,
                "reason": [str(p) for p in exc.problems],
            },
        )
        self._notify()
        return REJECTED

    def _unavailable(self, origin: str, reason: str) -> str:
        now = time.time()
        self._last_attempt = now
        self._last_result = ERROR
        self._last_error = reason
        self._last_error_at = now
        if self._persisted_reason is not None:
            self._persisted_reason = reason
        self.metrics.bundle_loads.labels(ERROR).inc()
        cur = self.current
        log.warning(
            "%s%s",
            reason,
            f"; still serving revision {cur.revision}" if cur is not None else "",
            extra={"source": origin, "reason": reason, "revision": cur.revision if cur else None},
        )
        self._notify()
        return ERROR

    def _unchanged(self, origin: str, keep_persisted: bool = False) -> str:
        self._last_attempt = time.time()
        self._last_result = UNCHANGED
        if not keep_persisted and self.current is not None and self._persisted_reason is not None:
            # The source is back and holds the bundle we serve from the persisted copy.
            log.info(
                "source %s is back with the serving revision %s", origin, self.current.revision
            )
            self._persisted_reason = None
            self._served_from = origin
        self.metrics.bundle_loads.labels(UNCHANGED).inc()
        return UNCHANGED

    # --- observers ---------------------------------------------------------------------

    def subscribe(self, listener: Callable[[Status], object]) -> Callable[[], None]:
        """Call ``listener(status)`` after every load attempt that changed something."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            try:
                self._listeners.remove(listener)
            except ValueError:
                pass

        return unsubscribe

    def _notify(self) -> None:
        st = self.status()
        for listener in list(self._listeners):
            try:
                listener(st)
            except Exception:  # noqa: BLE001 - an observer must not break loading
                log.exception("bundle status listener failed")

    def status(self) -> Status:
        cur = self.current
        return Status(
            revision=cur.revision if cur else None,
            loaded_at=self._loaded_at,
            last_attempt_at=self._last_attempt,
            last_error=self._last_error,
            name=cur.name if cur else None,
            source=self._source,
            served_from=self._served_from,
            last_result=self._last_result,
            last_error_at=self._last_error_at,
            serving_persisted=cur is not None and self._persisted_reason is not None,
            persisted_reason=self._persisted_reason if cur is not None else None,
        )


def _internal(origin: str, exc: Exception) -> BundleError:
    """A rejection for an error no step expected (its traceback is logged beside)."""
    return BundleError([Problem(Position(origin, 1, 1), f"internal error while loading: {exc!r}"[:500])])
