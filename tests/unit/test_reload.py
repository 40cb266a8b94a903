"""The reload gate: each bad candidate is rejected while checks keep passing on the last good one.

A "hammer" thread runs checks through the Checker for the whole time a candidate is being
judged; not one of them may fail or see anything but the good revision.
"""

from __future__ import annotations

import gc
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from bundle_factory import check_request, spiffe, write_bundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from authz.bundle import archive, persist
from authz.bundle.archive import Limits, Snapshot
from authz.bundle.sources import (
    ArchiveSource,
    DirectorySource,
    Source,
    SourceUnavailable,
    read_directory,
)
from authz.bundle.store import ERROR, LOADED, REJECTED, UNCHANGED, BundleStore, Status
from authz.check import Checker
from authz.engine.decide import PolicySet
from authz.metrics import Metrics

CLIENT = spiffe("prod", "client")
DEST = spiffe("prod", "probe-api")
PROBE = {
    "name": "probe",
    "target": {"principals": [DEST]},
    "action": "ALLOW",
    "rules": [
        {
            "name": "client-probes",
            "from": [{"source": {"principals": [CLIENT]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/probe"]}}],
        }
    ],
}
PASSING_TEST = {
    "apiVersion": "authz/v1",
    "kind": "BundleTest",
    "name": "probe",
    "cases": [
        {
            "name": "client-may-probe",
            "request": {
                "principal": CLIENT,
                "destination": DEST,
                "method": "GET",
                "path": "/probe",
            },
            "expect": {"allowed": True, "policy": "probe", "rule": "client-probes"},
        }
    ],
}


def files_of(root: Path) -> dict[str, bytes]:
    return dict(read_directory(root).files)


def good_bundle(tmp_path: Path, revision: str = "good", **kw: Any) -> Path:
    root = write_bundle(tmp_path / f"bundle-{revision}", [PROBE], revision=revision, **kw)
    (root / "tests").mkdir(exist_ok=True)
    (root / "tests" / "probe.yaml").write_text(yaml.safe_dump(PASSING_TEST, sort_keys=False))
    return root


def signed_archive(
    files: dict[str, bytes], key: Ed25519PrivateKey | None, revision: str = "bad"
) -> bytes:
    return archive.build_archive(files, "t", revision, key)


def sign_directory(root: Path, key: Ed25519PrivateKey, revision: str = "bad") -> Path:
    """Write MANIFEST.json/.sig next to the files, as unpacking a built archive would."""
    snap = archive.unpack(signed_archive(files_of(root), key, revision), "x.tar.gz")
    for name in archive.META_FILES:
        (root / name).write_bytes(snap.files[name])
    return root


class Hammer:
    """Checks the probe request in a loop on another thread; records (allowed, revision)."""

    def __init__(self, store: BundleStore) -> None:
        self.checker = Checker(store, store.metrics)
        self.request = check_request(
            principal=CLIENT, destination=DEST, method="GET", path="/probe"
        )
        self.results: list[tuple[bool, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = self.checker.run(self.request)
            self.results.append((out.decision.allowed, out.revision, out.decision.reason))

    def wait_for(self, n: int) -> None:
        while len(self.results) < n:
            self._stop.wait(0.001)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# --- the bad candidates -------------------------------------------------------------------
# Each returns (source, a fragment the rejection must contain, whether it names file:line).

Case = Callable[[Path, Ed25519PrivateKey], tuple[Source, str]]


def _dir_case(mutate: Callable[[Path], None]) -> Case:
    def make(tmp_path: Path, key: Ed25519PrivateKey) -> tuple[Source, str]:
        root = good_bundle(tmp_path, "bad")
        mutate(root)
        return DirectorySource(sign_directory(root, key), Limits(max_bytes=200_000)), ""

    return make


def _policy(**changes: Any) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        doc = {"apiVersion": "authz/v1", "kind": "Policy", **PROBE, **changes}
        (root / "policies" / "p.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    return mutate


def invalid_yaml(root: Path) -> None:
    (root / "policies" / "p.yaml").write_text(
        "apiVersion: authz/v1\nkind: Policy\nname: probe\nrules: [\n"
    )


def failing_test(root: Path) -> None:
    bad = dict(PASSING_TEST)
    bad["cases"] = [{**PASSING_TEST["cases"][0], "expect": {"allowed": False}}]  # type: ignore[index]
    (root / "tests" / "probe.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))


def over_size_limit(root: Path) -> None:
    tenants = {f"tenant-{i}": {"plan": "x" * 40} for i in range(5000)}
    (root / "tenants").mkdir(exist_ok=True)
    (root / "tenants" / "big.yaml").write_text(yaml.safe_dump({"tenants": tenants}))


def _archive_case(make_bytes: Callable[[Path, Ed25519PrivateKey], bytes], expect: str) -> Case:
    def make(tmp_path: Path, key: Ed25519PrivateKey) -> tuple[Source, str]:
        path = tmp_path / "candidate.tar.gz"
        path.write_bytes(make_bytes(tmp_path, key))
        return ArchiveSource(path, Limits(max_bytes=200_000)), expect

    return make


def truncated(tmp_path: Path, key: Ed25519PrivateKey) -> bytes:
    data = signed_archive(files_of(good_bundle(tmp_path, "bad")), key)
    return data[: len(data) * 2 // 3]


def digest_mismatch(tmp_path: Path, key: Ed25519PrivateKey) -> bytes:
    snap = archive.unpack(signed_archive(files_of(good_bundle(tmp_path, "bad")), key), "x")
    files = dict(snap.files)
    files["policies/p.yaml"] = files["policies/p.yaml"].replace(b"GET", b"PUT")
    return archive.pack(files)


def unsigned(tmp_path: Path, key: Ed25519PrivateKey) -> bytes:
    return signed_archive(files_of(good_bundle(tmp_path, "bad")), None)


def wrong_key(tmp_path: Path, key: Ed25519PrivateKey) -> bytes:
    return signed_archive(files_of(good_bundle(tmp_path, "bad")), Ed25519PrivateKey.generate())


CASES: dict[str, tuple[Case, str]] = {
    "invalid-yaml": (_dir_case(invalid_yaml), r"policies/p\.yaml:\d+:\d+: error: .*"),
    "cel-compile-error": (
        _dir_case(_policy(rules=[{**PROBE["rules"][0], "when": ["request.path =="]}])),  # type: ignore[index,dict-item]
        r"policies/p\.yaml:\d+:\d+: error: .*",
    ),
    "tenant-without-tenant-data": (
        _dir_case(_policy(tenant={"header": "x-tenant"})),
        r"policies/p\.yaml:\d+:\d+: error: policy reads a tenant but the bundle has no tenant data",
    ),
    "unknown-data": (
        _dir_case(_policy(rules=[{**PROBE["rules"][0], "when": ["'x' in data.missing"]}])),  # type: ignore[index,dict-item]
        r"policies/p\.yaml:\d+:\d+: error: condition reads data\.missing",
    ),
    "failing-bundle-test": (
        _dir_case(failing_test),
        r"tests/probe\.yaml:\d+:\d+: error: bundle test 'probe/client-may-probe' failed",
    ),
    "over-size-limit-directory": (_dir_case(over_size_limit), r"size limit of 200000"),
    "truncated-archive": (
        _archive_case(truncated, ""),
        r"candidate\.tar\.gz:1:1: error: archive is truncated",
    ),
    "digest-mismatch": (
        _archive_case(digest_mismatch, ""),
        r"policies/p\.yaml:1:1: error: digest mismatch",
    ),
    "unsigned-archive": (
        _archive_case(unsigned, ""),
        r"MANIFEST\.sig:1:1: error: bundle is not signed",
    ),
    "wrong-signing-key": (
        _archive_case(wrong_key, ""),
        r"MANIFEST\.sig:1:1: error: signature does not verify",
    ),
    "over-size-limit-archive": (
        _archive_case(lambda t, k: b"\x1f\x8b" + bytes(300_000), ""),
        r"over the size limit of 200000",
    ),
}


def signed_store(tmp_path: Path, **kw: Any) -> tuple[BundleStore, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    store = BundleStore(Metrics(), verification_key=key.public_key(), **kw)
    good = tmp_path / "good.tar.gz"
    good.write_bytes(signed_archive(files_of(good_bundle(tmp_path)), key, "good"))
    assert store.fetch_and_load(ArchiveSource(good)) == LOADED
    return store, key


def count(store: BundleStore, result: str) -> float:
    return store.metrics.bundle_loads.labels(result)._value.get()


@pytest.mark.parametrize("name", list(CASES))
def test_rejected_without_a_single_failed_check(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    store, key = signed_store(tmp_path)
    make, pattern = CASES[name]
    source, _ = make(tmp_path, key)
    serving = store.current
    with Hammer(store) as hammer:
        hammer.wait_for(20)
        result = store.fetch_and_load(source)
        hammer.wait_for(len(hammer.results) + 20)
    assert result == REJECTED
    assert store.current is serving and serving is not None and serving.revision == "good"
    failed = [r for r in hammer.results if r != (True, "good", r[2])]
    assert not failed, failed[:3]
    st = store.status()
    assert st.ready and st.revision == "good" and st.last_result == REJECTED
    assert re.search(pattern, st.last_error or ""), st.last_error
    assert count(store, REJECTED) == 1 and count(store, LOADED) == 1
    # Logged with the candidate's revision (when it got that far) and its reasons.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert re.search(pattern, logged) and "still serving revision good" in logged
    if source.__class__ is DirectorySource and "size" not in name:
        assert "bundle revision bad rejected" in logged


def test_a_good_candidate_swaps_in_and_status_says_so(tmp_path: Path) -> None:
    store, key = signed_store(tmp_path)
    seen: list[Status] = []
    store.subscribe(seen.append)
    old = store.current
    path = tmp_path / "next.tar.gz"
    path.write_bytes(signed_archive(files_of(good_bundle(tmp_path, "next")), key, "next"))
    with Hammer(store) as hammer:
        assert store.fetch_and_load(ArchiveSource(path)) == LOADED
    assert (
        store.current is not old and store.current is not None and store.current.revision == "next"
    )
    revisions = [rev for _, rev, _ in hammer.results]
    assert set(revisions) <= {"good", "next"} and all(ok for ok, _, _ in hammer.results)
    # Never back: once a check saw the new revision, no later check saw the old one.
    if "next" in revisions:
        assert "good" not in revisions[revisions.index("next") :]
    st = store.status()
    assert (st.revision, st.name, st.last_result, st.served_from) == (
        "next",
        "t",
        LOADED,
        str(path),
    )
    assert (
        st.loaded_at is not None
        and st.last_attempt_at is not None
        and st.last_attempt_at <= st.loaded_at
    )
    assert seen and seen[-1].revision == "next"
    text = store.metrics.exposition().decode()
    assert 'authz_bundle_info{name="t",revision="next"} 1.0' in text
    assert 'revision="good"' not in text
    assert 'authz_bundle_loads_total{result="loaded"} 2.0' in text
    # The same bytes again: unchanged, nothing swapped.
    current = store.current
    assert store.fetch_and_load(ArchiveSource(path)) == UNCHANGED
    assert store.current is current and count(store, UNCHANGED) == 1


def test_bundle_tests_run_before_the_swap(tmp_path: Path) -> None:
    store = BundleStore(Metrics())
    root = good_bundle(tmp_path)
    assert store.load(root) is True
    failing_test(root)
    assert store.load(root) is False
    assert re.search(
        r"tests/probe\.yaml:\d+:\d+: error: bundle test 'probe/client-may-probe' failed",
        store.status().last_error or "",
    )
    skip = BundleStore(Metrics(), run_tests=False)
    assert skip.load(root) is True


def test_no_bundle_at_all_is_not_ready_with_a_reason(tmp_path: Path) -> None:
    store = BundleStore(Metrics())
    notified: list[Status] = []
    store.subscribe(notified.append)
    assert store.load(tmp_path / "missing") is False
    st = store.status()
    assert not st.ready and st.revision is None and st.last_result == ERROR
    assert "does not exist" in (st.last_error or "")
    assert notified and not notified[-1].ready


def test_the_store_keeps_no_old_policy_sets(tmp_path: Path) -> None:
    gc.unfreeze()  # a load freezes what is alive out of collections (and of gc.get_objects)
    gc.collect()
    # PolicySets other tests keep (module-level fixtures) are not this store's doing.
    before = {id(o) for o in gc.get_objects() if isinstance(o, PolicySet)}
    store = BundleStore(Metrics())
    roots = [good_bundle(tmp_path, f"r{i}") for i in range(2)]
    for i in range(12):
        assert store.load(roots[i % 2]) is True
    gc.unfreeze()  # no collection: what reference counting did not free is still there
    alive = [o for o in gc.get_objects() if isinstance(o, PolicySet) and id(o) not in before]
    assert [ps.revision for ps in alive] == ["r1"]
    assert alive[0] is store.current


# --- persistence -------------------------------------------------------------------------


class Down:
    """A source that cannot be reached."""

    description = "http://127.0.0.1:9/bundle.tar.gz"
    polled = True

    def fetch(self, force: bool = False) -> Snapshot | None:
        raise SourceUnavailable("bundle server unreachable: connection refused")

    def fingerprint(self) -> None:
        return None

    def next_delay(self, ok: bool) -> float:
        return 1.0


def test_persisted_bundle_serves_when_the_source_is_down_and_says_so(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    state = tmp_path / "state"
    path = tmp_path / "b.tar.gz"
    data = signed_archive(files_of(good_bundle(tmp_path, "p1")), key, "p1")
    path.write_bytes(data)
    first = BundleStore(Metrics(), verification_key=key.public_key(), persist_dir=state)
    assert first.fetch_and_load(ArchiveSource(path)) == LOADED
    assert (
        state / persist.ARCHIVE
    ).read_bytes() == data  # as received: the signature still verifies
    # A restart while the source is down.
    second = BundleStore(Metrics(), verification_key=key.public_key(), persist_dir=state)
    assert second.fetch_and_load(Down()) == ERROR and second.current is None
    assert second.restore_persisted("source down: connection refused") is True
    st = second.status()
    assert st.ready and st.revision == "p1" and st.serving_persisted
    assert "connection refused" in (st.persisted_reason or "")
    assert st.served_from == str(state / persist.ARCHIVE)
    # Still down: still persisted, with the newest reason.
    assert second.fetch_and_load(Down()) == ERROR and second.status().serving_persisted
    # The source is back with the same bundle: unchanged, and no longer a persisted copy.
    assert second.fetch_and_load(ArchiveSource(path)) == UNCHANGED
    st = second.status()
    assert st.revision == "p1" and not st.serving_persisted and st.served_from == str(path)


def test_persisted_bundle_is_verified_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    writer = BundleStore(Metrics(), persist_dir=state)
    assert writer.load(good_bundle(tmp_path, "d1")) is True  # a directory: packed, unsigned
    assert persist.load(state) is not None
    reader = BundleStore(Metrics(), persist_dir=state)
    assert reader.restore_persisted("test") and reader.status().revision == "d1"
    strict = BundleStore(
        Metrics(), persist_dir=state, verification_key=Ed25519PrivateKey.generate().public_key()
    )
    assert strict.restore_persisted("test") is False and strict.current is None
    assert "not signed" in (strict.status().last_error or "")
    assert BundleStore(Metrics(), persist_dir=tmp_path / "empty").restore_persisted("x") is False


def test_a_rejected_candidate_is_not_persisted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = BundleStore(Metrics(), persist_dir=state)
    root = good_bundle(tmp_path, "keep")
    assert store.load(root)
    invalid_yaml(root)
    assert not store.load(root)
    saved = persist.load(state)
    assert saved is not None and saved.meta["revision"] == "keep"
    assert b"revision: keep" in saved.snapshot.files["bundle.yaml"]


class Scripted:
    """A polled source that gives the snapshots (or None for 'not modified') it is told to."""

    description = "scripted"
    polled = True

    def __init__(self, *answers: Snapshot | None) -> None:
        self.answers = list(answers)

    def fetch(self, force: bool = False) -> Snapshot | None:
        return self.answers.pop(0)

    def fingerprint(self) -> None:
        return None

    def next_delay(self, ok: bool) -> float:
        return 1.0


def test_not_modified_after_a_rejected_candidate_keeps_the_persisted_flag(tmp_path: Path) -> None:
    state = tmp_path / "state"
    good = read_directory(good_bundle(tmp_path, "p1"))
    assert BundleStore(Metrics(), persist_dir=state).load_snapshot(good) == LOADED
    broken_root = good_bundle(tmp_path, "p2")
    invalid_yaml(broken_root)
    broken = read_directory(broken_root)
    store = BundleStore(Metrics(), persist_dir=state)
    source = Scripted(broken, None, good, None)
    assert store.fetch_and_load(source) == REJECTED  # the start: the source's bundle is bad
    assert store.restore_persisted("source bundle rejected")
    assert store.fetch_and_load(source) == UNCHANGED  # 304 for the rejected bytes
    assert store.status().serving_persisted  # still not what the source has
    assert store.fetch_and_load(source) == UNCHANGED  # the source now has the serving bundle
    assert not store.status().serving_persisted
    assert store.fetch_and_load(source) == UNCHANGED
    assert not store.status().serving_persisted and store.status().revision == "p1"
