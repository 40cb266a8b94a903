"""Bundle sources: directories (ConfigMap mounts too), archives, bundle servers, the watcher."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from bundle_factory import write_bundle
from support.bundle_sources import BundleServer, ConfigMapDir

from authz.bundle import archive
from authz.bundle.archive import Limits
from authz.bundle.loader import BundleError
from authz.bundle.runtime import open_source
from authz.bundle.sources import (
    ArchiveSource,
    DirectorySource,
    HttpSource,
    PollPolicy,
    SourceUnavailable,
    read_directory,
)
from authz.bundle.store import LOADED, UNCHANGED, BundleStore
from authz.bundle.watcher import Reloader
from authz.metrics import Metrics

POLICY = {
    "name": "probe",
    "action": "ALLOW",
    "rules": [{"name": "probe", "to": [{"operation": {"methods": ["GET"], "paths": ["/probe"]}}]}],
}


def bundle_bytes(tmp_path: Path, revision: str) -> dict[str, bytes]:
    root = write_bundle(tmp_path / f"src-{revision}", [POLICY], revision=revision)
    return dict(read_directory(root).files)


# --- a ConfigMap mount, the way the kubelet writes one --------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_directory_snapshot_skips_hidden_files(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", [POLICY])
    (root / ".editor.swp").write_text("x")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "policies" / ".p.yaml.tmp").write_text("half written")
    snap = read_directory(root)
    assert set(snap.files) == {"bundle.yaml", "policies/p.yaml"}
    with pytest.raises(SourceUnavailable):
        read_directory(tmp_path / "missing")
    with pytest.raises(BundleError, match="size limit"):
        read_directory(root, Limits(max_bytes=10))


def test_configmap_mount_is_read_through_its_data_symlink(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "cm")
    cm.publish(bundle_bytes(tmp_path, "r1"))
    snap = read_directory(cm.root)
    assert set(snap.files) == {"bundle.yaml", "policies/p.yaml"}
    assert b"revision: r1" in snap.files["bundle.yaml"]
    cm.publish(bundle_bytes(tmp_path, "r2"))
    assert b"revision: r2" in read_directory(cm.root).files["bundle.yaml"]


def store_and_reloader(source: Any, **kw: Any) -> tuple[BundleStore, Reloader]:
    store = BundleStore(Metrics())
    reloader = Reloader(store, source, **kw)
    assert reloader.initial_load() == LOADED
    return store, reloader


def loads(store: BundleStore, result: str) -> float:
    return store.metrics.bundle_loads.labels(result)._value.get()


def test_configmap_symlink_swap_is_picked_up_exactly_once(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "cm")
    cm.publish(bundle_bytes(tmp_path, "r1"))
    store, reloader = store_and_reloader(DirectorySource(cm.root), interval=0.05)
    reloader.start()
    try:
        time.sleep(0.3)
        assert reloader.loads == 1  # nothing changed: no load
        cm.publish(bundle_bytes(tmp_path, "r2"))
        assert wait_for(lambda: store.current is not None and store.current.revision == "r2")
        time.sleep(0.5)  # ten more polls: none may load again
        assert reloader.loads == 2
        assert loads(store, LOADED) == 2 and loads(store, UNCHANGED) == 0
    finally:
        reloader.stop()


def test_edits_are_debounced_and_hidden_files_ignored(tmp_path: Path) -> None:
    # The watcher's clock is driven by the test and each look is made by hand, so the
    # outcome does not depend on how fast a loaded machine runs the thread.
    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    now = [1000.0]
    store, reloader = store_and_reloader(DirectorySource(root), settle=0.3, clock=lambda: now[0])

    def look_at(t: float) -> None:
        now[0] = t
        reloader.watch_once()

    mtime = [(root / "bundle.yaml").stat().st_mtime_ns]

    def edit(path: Path, text: str) -> None:
        # Explicit, distinct mtimes: two writes inside one kernel clock tick would otherwise
        # look the same to a size+mtime fingerprint.
        path.write_text(text)
        mtime[0] += 1_000_000_000
        os.utime(path, ns=(mtime[0], mtime[0]))

    edit(root / ".swap", "editor junk")
    for t in (1000.1, 1000.5, 1001.0):
        look_at(t)
    assert reloader.loads == 1  # a hidden file is no change
    # A burst of edits, each under the settle time after the one before, loads once, after it.
    t = 1001.0
    for i in range(5):
        edit(root / "bundle.yaml", yaml.safe_dump({"apiVersion": "authz/v1", "kind": "Bundle", "name": "t",
                                                   "revision": f"r2-{i}", "trustDomain": "cluster.local"}))
        t += 0.1
        look_at(t)
        t += 0.1
        look_at(t)
        assert reloader.loads == 1, f"loaded during the burst, after edit {i}"
    look_at(t + 0.1)  # settled for 0.2 s, under the 0.3 s settle time
    assert reloader.loads == 1
    look_at(t + 0.35)
    assert reloader.loads == 2
    assert store.current is not None and store.current.revision == "r2-4"
    for dt in (1.0, 2.0, 3.0):
        look_at(t + dt)
    assert reloader.loads == 2  # nothing changed since: no more loads


def test_watcher_thread_picks_up_an_edit(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    store, reloader = store_and_reloader(DirectorySource(root), interval=0.05, settle=0.1)
    reloader.start()
    try:
        write_bundle(root, [POLICY], revision="r2")
        assert wait_for(lambda: store.current is not None and store.current.revision == "r2", 30)
    finally:
        reloader.stop()


def test_trigger_reloads_at_once(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    store, reloader = store_and_reloader(DirectorySource(root), interval=60)
    reloader.start()
    try:
        write_bundle(root, [POLICY], revision="r2")
        reloader.trigger()
        # the watch interval is 60 s: seeing r2 within a few seconds proves the trigger
        assert wait_for(lambda: store.current is not None and store.current.revision == "r2", 10)
    finally:
        reloader.stop()


def test_archive_file_source_is_watched(tmp_path: Path) -> None:
    path = tmp_path / "bundle.tar.gz"
    archive.write_atomic(path, archive.build_archive(bundle_bytes(tmp_path, "r1"), "t", "r1"))
    source = open_source(path)
    assert isinstance(source, ArchiveSource)
    store, reloader = store_and_reloader(source, interval=0.05)
    reloader.start()
    try:
        archive.write_atomic(path, archive.build_archive(bundle_bytes(tmp_path, "r2"), "t", "r2"))
        assert wait_for(lambda: store.current is not None and store.current.revision == "r2")
        path.write_bytes(b"\x1f\x8b broken")
        assert wait_for(lambda: loads(store, "rejected") == 1)
        assert store.current is not None and store.current.revision == "r2"
    finally:
        reloader.stop()


# --- HTTP bundle server -----------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[BundleServer]:
    s = BundleServer()
    try:
        yield s
    finally:
        s.close()


def test_http_source_uses_etags(tmp_path: Path, server: BundleServer) -> None:
    server.publish(archive.build_archive(bundle_bytes(tmp_path, "r1"), "t", "r1"), '"r1"')
    source = HttpSource(server.url, policy=PollPolicy(timeout=5))
    snap = source.fetch()
    assert snap is not None and b"revision: r1" in snap.files["bundle.yaml"]
    assert "if-none-match" not in server.requests[0]
    assert source.fetch() is None  # 304
    assert server.requests[1]["if-none-match"] == '"r1"'
    forced = source.fetch(force=True)  # SIGHUP: fetch in full
    assert forced is not None and "if-none-match" not in server.requests[2]
    server.publish(archive.build_archive(bundle_bytes(tmp_path, "r2"), "t", "r2"), '"r2"')
    snap = source.fetch()
    assert snap is not None and b"revision: r2" in snap.files["bundle.yaml"]


def test_a_body_cut_in_transit_does_not_keep_its_etag(tmp_path: Path, server: BundleServer) -> None:
    """A close-delimited answer cut halfway does not unpack; had its ETag been kept, every
    later poll was a 304 and the old revision served on, `unchanged`, for good."""
    whole = archive.build_archive(bundle_bytes(tmp_path, "r2"), "t", "r2")
    server.send_length = False  # close-delimited: a cut reads as the end of the body
    server.publish(whole[: len(whole) // 2], '"r2"')
    source = HttpSource(server.url, policy=PollPolicy(timeout=5))
    with pytest.raises(BundleError):
        source.fetch()
    server.publish(whole, '"r2"')
    snap = source.fetch()
    assert "if-none-match" not in server.requests[-1]
    assert snap is not None and b"revision: r2" in snap.files["bundle.yaml"]


def test_http_source_size_limit(tmp_path: Path, server: BundleServer) -> None:
    body = archive.build_archive(bundle_bytes(tmp_path, "r1"), "t", "r1")
    server.publish(body, '"r1"')
    with pytest.raises(BundleError, match="size limit"):
        HttpSource(server.url, Limits(max_bytes=len(body) - 1)).fetch()
    server.send_length = False  # no Content-Length: counted while reading
    with pytest.raises(BundleError, match="size limit"):
        HttpSource(server.url, Limits(max_bytes=len(body) - 1)).fetch()
    assert HttpSource(server.url, Limits(max_bytes=100_000)).fetch() is not None


def test_http_source_errors_and_timeout(tmp_path: Path, server: BundleServer) -> None:
    server.status = 503
    with pytest.raises(SourceUnavailable, match="HTTP 503"):
        HttpSource(server.url).fetch()
    server.status = 200
    server.publish(b"x", '"x"')
    server.delay = 5.0
    started = time.monotonic()
    with pytest.raises(SourceUnavailable):
        HttpSource(server.url, policy=PollPolicy(timeout=0.3)).fetch()
    assert time.monotonic() - started < 4.0  # the timeout cut it short of the 5 s answer
    server.delay = 0.0
    url = server.url
    server.close()
    with pytest.raises(SourceUnavailable, match="unreachable"):
        HttpSource(url, policy=PollPolicy(timeout=1)).fetch()


@pytest.mark.parametrize("part", ["body", "headers"])
def test_a_dripping_server_fails_at_the_poll_timeout(tmp_path: Path, server: BundleServer, part: str) -> None:
    """One byte every 0.2 s: each read succeeds long before a socket timeout, but the whole
    download is cut at --poll-timeout (it would take minutes otherwise)."""
    body = archive.build_archive(bundle_bytes(tmp_path, "r1"), "t", "r1")
    server.publish(body, '"r1"')
    server.drip = 0.2
    server.drip_from = 120 if part == "body" else 0  # past the status line and headers, or not
    source = HttpSource(server.url, policy=PollPolicy(timeout=2.0))
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"took longer than 2.0s \(--poll-timeout\)"):
        source.fetch()
    elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 10.0, elapsed
    assert len(body) * 0.2 > 60  # not a download that merely finished early
    server.drip = 0.0
    assert source.fetch() is not None  # the next poll, at normal speed, works


def test_a_symlink_loop_in_a_bundle_directory_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "b"
    write_bundle(root, [])
    (root / "policies" / "self").symlink_to(".")
    with pytest.raises(BundleError) as err:
        DirectorySource(root).fetch()
    assert "policies/self" in str(err.value) and "symbolic link" in str(err.value)
    # also through a link to an ancestor higher up
    (root / "policies" / "self").unlink()
    (root / "policies" / "up").symlink_to("..")
    with pytest.raises(BundleError, match="policies/up"):
        DirectorySource(root).fetch()
    (root / "policies" / "up").unlink()
    assert DirectorySource(root).fetch().files  # without the loop it reads fine


def test_nothing_outside_the_bundle_directory_is_read(tmp_path: Path) -> None:
    """A link out of the bundle would put a host file (a service account token) into the
    bundle, where an upstream header could send it on."""
    secret = tmp_path / "token"
    secret.write_text("SUPERSECRET")
    root = write_bundle(tmp_path / "b", [POLICY])
    (root / "data").mkdir()
    (root / "data" / "leak.yaml").symlink_to(secret)
    with pytest.raises(BundleError, match="data/leak.yaml.*leads out of the bundle directory"):
        DirectorySource(root).fetch()
    (root / "data" / "leak.yaml").unlink()
    (root / "data" / "etc").symlink_to(tmp_path)  # a directory link out
    with pytest.raises(BundleError, match="data/etc.*leads out of the bundle directory"):
        DirectorySource(root).fetch()
    (root / "data" / "etc").unlink()
    (root / "data" / "inside.yaml").symlink_to(root / "bundle.yaml")  # within: fine
    assert "data/inside.yaml" in DirectorySource(root).fetch().files


@pytest.mark.parametrize("kind", ["dangling link", "fifo", "not utf-8", "control characters"])
def test_an_entry_that_is_not_a_readable_file_rejects_the_bundle(tmp_path: Path, kind: str) -> None:
    """Skipped, it could have been the file holding a DENY policy: the bundle would be
    served without it. A FIFO must not block the reloader either."""
    root = write_bundle(tmp_path / "b", [POLICY])
    if kind == "dangling link":
        (root / "policies" / "deny.yaml").symlink_to(tmp_path / "nowhere.yaml")
        where = "policies/deny.yaml"
    elif kind == "fifo":
        os.mkfifo(root / "policies" / "deny.yaml")
        where = "policies/deny.yaml"
    elif kind == "not utf-8":
        (root / os.fsdecode(b"notes-\xe9.txt")).write_text("x")
        where = "notes-"
    else:  # quoted in a log line, the name forged another ("...\n<time> INFO serving bundle ...")
        (root / "policies" / "a\x1b[31m\n2026-12-01 INFO authz.bundle: serving.yaml").write_text("{{{")
        where = "policies/a\\x1b[31m\\n2026"
    started = time.monotonic()
    with pytest.raises(BundleError) as err:
        DirectorySource(root).fetch()
    assert where in str(err.value), err.value
    assert time.monotonic() - started < 5


def test_an_unexpected_error_in_a_source_is_a_rejection_and_the_reloader_goes_on(tmp_path: Path) -> None:
    """A source that raised something unforeseen stopped the reloader for good: every later
    revision was ignored while /readyz still said ready."""
    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    source = DirectorySource(root)
    store, reloader = store_and_reloader(source, settle=0.0, clock=lambda: 0.0)
    assert store.current is not None and store.current.revision == "r1"

    class Broken:
        description = "broken"
        polled = False

        def fetch(self, force: bool = False) -> Any:
            raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")

    assert store.fetch_and_load(Broken()) == "rejected"  # type: ignore[arg-type]
    assert store.status().last_error is not None and "internal error" in store.status().last_error
    assert store.current.revision == "r1"


def test_a_link_loop_added_later_is_rejected_loudly_not_waited_on(tmp_path: Path) -> None:
    """The fingerprint of an unreadable directory was new at every look, so the watcher
    never saw it settle: no load, no rejection, no log, and the next good revision waited."""
    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    now = [0.0]
    store, reloader = store_and_reloader(DirectorySource(root), settle=0.3, clock=lambda: now[0])
    (root / "policies" / "loop").symlink_to("..")
    for t in (1.0, 2.0, 3.0):
        now[0] = t
        reloader.watch_once()
    assert reloader.loads == 2  # the first load, then the broken candidate, once
    assert store.status().last_error is not None and "policies/loop" in store.status().last_error
    assert store.current is not None and store.current.revision == "r1"


def test_poll_delays_jitter_and_back_off() -> None:
    source = HttpSource(
        "http://127.0.0.1:9/b.tar.gz",
        rng=random.Random(7),
        policy=PollPolicy(min_delay=2, max_delay=5, backoff_max=30),
    )
    delays = [source.next_delay(True) for _ in range(200)]
    assert all(2 <= d <= 5 for d in delays) and max(delays) - min(delays) > 2
    ceilings = []
    for failures in range(1, 10):
        source.failures = failures
        ds = [source.next_delay(False) for _ in range(50)]
        ceilings.append(max(ds))
        assert all(d <= 30 for d in ds)
    assert ceilings[0] <= 4 and ceilings[3] > 16 and ceilings[-1] > 15  # grows, then capped
    with pytest.raises(ValueError):
        HttpSource("http://x/", policy=PollPolicy(min_delay=5, max_delay=1))


def test_http_reloader_polls_and_keeps_serving_when_the_server_goes_down(
    tmp_path: Path, server: BundleServer
) -> None:
    server.publish(archive.build_archive(bundle_bytes(tmp_path, "r1"), "t", "r1"), '"r1"')
    source = HttpSource(server.url, policy=PollPolicy(min_delay=0.05, max_delay=0.1, timeout=1))
    store, reloader = store_and_reloader(source)
    reloader.start()
    try:
        assert wait_for(lambda: loads(store, UNCHANGED) >= 2)  # 304s
        server.publish(archive.build_archive(bundle_bytes(tmp_path, "r2"), "t", "r2"), '"r2"')
        assert wait_for(lambda: store.current is not None and store.current.revision == "r2")
        server.close()
        assert wait_for(lambda: loads(store, "error") >= 2)
        st = store.status()
        assert st.revision == "r2" and st.ready and "unreachable" in (st.last_error or "")
        assert st.last_result == "error"
    finally:
        reloader.stop()


def test_open_source_picks_by_form(tmp_path: Path) -> None:
    assert isinstance(open_source("https://bundles.example/b.tar.gz"), HttpSource)
    assert isinstance(open_source(tmp_path), DirectorySource)
    assert isinstance(open_source(tmp_path / "b.tar.gz"), ArchiveSource)


def test_a_directory_written_while_read_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain directory rewritten file by file was read half old, half new (647 of 1,040
    reads mixed two states); what was read must be what is there when the read ends."""
    from authz.bundle import sources

    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    real_read = sources._read_file
    written = []

    def read_then_write(path: Path, rel: str, most: int, follow: bool = False) -> bytes:
        data = real_read(path, rel, most, follow)
        if not written:  # the writer goes on while the reader reads its first file
            written.append(rel)
            text = (root / "bundle.yaml").read_text().replace("revision: r1", "revision: r2-longer")
            (root / "bundle.yaml").write_text(text)
        return data

    monkeypatch.setattr(sources, "_read_file", read_then_write)
    snap = read_directory(root)
    assert b"revision: r2-longer" in snap.files["bundle.yaml"]
