"""Bundle archives: reproducible packing, safe unpacking, manifest digests, Ed25519 signatures."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from bundle_factory import spiffe, write_bundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from authz.bundle import archive, signing
from authz.bundle.archive import Limits, Snapshot
from authz.bundle.loader import BundleError
from authz.bundle.sources import read_directory
from authz.bundle.store import check_candidate

POLICY = {
    "name": "probe",
    "action": "ALLOW",
    "rules": [
        {
            "name": "probe",
            "from": [{"source": {"principals": [spiffe("prod", "client")]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/probe"]}}],
        }
    ],
}


def bundle_files(tmp_path: Path, revision: str = "r1") -> dict[str, bytes]:
    root = write_bundle(tmp_path / f"b-{revision}", [POLICY], revision=revision)
    return dict(read_directory(root).files)


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def messages(exc: BundleError) -> str:
    return "\n".join(str(p) for p in exc.problems)


def test_build_is_reproducible_and_round_trips(tmp_path: Path) -> None:
    files = bundle_files(tmp_path)
    one = archive.build_archive(files, "t", "r1")
    two = archive.build_archive(dict(reversed(list(files.items()))), "t", "r1")
    assert one == two
    snap = archive.unpack(one, "b.tar.gz")
    assert {k: v for k, v in snap.files.items() if k != archive.MANIFEST_JSON} == files
    manifest = json.loads(snap.files[archive.MANIFEST_JSON])
    assert manifest["revision"] == "r1" and set(manifest["files"]) == set(files)
    assert archive.verify(snap, None) == manifest
    assert check_candidate(snap).revision == "r1"
    assert snap.archive == one


def test_signed_archive_verifies_only_with_the_right_key(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    data = archive.build_archive(bundle_files(tmp_path), "t", "r1", key)
    snap = archive.unpack(data, "b.tar.gz")
    assert check_candidate(snap, key.public_key()).revision == "r1"
    with pytest.raises(BundleError) as err:
        check_candidate(snap, Ed25519PrivateKey.generate().public_key())
    assert "MANIFEST.sig:1:1" in messages(err.value) and "does not verify" in messages(err.value)


def test_unsigned_bundle_is_refused_when_a_key_is_required(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    snap = archive.unpack(archive.build_archive(bundle_files(tmp_path), "t", "r1"), "b.tar.gz")
    with pytest.raises(BundleError) as err:
        check_candidate(snap, key)
    assert "not signed" in messages(err.value)
    plain = Snapshot(bundle_files(tmp_path), "dir")  # no manifest at all
    with pytest.raises(BundleError, match="not signed"):
        check_candidate(plain, key)


def test_a_file_whose_digest_does_not_match_is_rejected_even_when_signed(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    snap = archive.unpack(archive.build_archive(bundle_files(tmp_path), "t", "r1", key), "b.tar.gz")
    files = dict(snap.files)
    files["policies/p.yaml"] = files["policies/p.yaml"].replace(b"/probe", b"/other")
    tampered = archive.unpack(archive.pack(files), "b.tar.gz")
    with pytest.raises(BundleError) as err:
        check_candidate(tampered, key.public_key())
    assert "policies/p.yaml:1:1: error: digest mismatch" in messages(err.value)


def test_unlisted_and_missing_files_are_rejected(tmp_path: Path) -> None:
    snap = archive.unpack(archive.build_archive(bundle_files(tmp_path), "t", "r1"), "b.tar.gz")
    extra = dict(snap.files)
    extra["data/extra.yaml"] = b"x: 1\n"
    with pytest.raises(BundleError, match="data/extra.yaml:1:1: error: file is not listed"):
        archive.verify(Snapshot(extra, "b"), None)
    missing = dict(snap.files)
    del missing["policies/p.yaml"]
    with pytest.raises(
        BundleError, match="'policies/p.yaml' is listed in the manifest but missing"
    ):
        archive.verify(Snapshot(missing, "b"), None)


def test_manifest_revision_must_match_bundle_yaml(tmp_path: Path) -> None:
    data = archive.build_archive(bundle_files(tmp_path), "t", "r-other")
    with pytest.raises(BundleError, match="revision 'r1' differs from 'r-other'"):
        check_candidate(archive.unpack(data, "b.tar.gz"))


def test_truncated_archive_is_rejected(tmp_path: Path) -> None:
    data = archive.build_archive(bundle_files(tmp_path), "t", "r1")
    for cut in (len(data) // 2, len(data) - 8, 20):
        with pytest.raises(BundleError) as err:
            archive.unpack(data[:cut], "b.tar.gz")
        assert "truncated" in messages(err.value) or "corrupt" in messages(err.value)
    with pytest.raises(BundleError, match="not a gzip"):
        archive.unpack(b"definitely not gzip", "b.tar.gz")


@pytest.mark.parametrize(
    "info, why",
    [
        (member("/etc/passwd"), "unsafe path"),
        (member("../escape.yaml"), "unsafe path"),
        (member("policies/../../escape.yaml"), "unsafe path"),
        (member("policies/link.yaml", tarfile.SYMTYPE, "/etc/passwd"), "is a symlink"),
        (member("policies/hard.yaml", tarfile.LNKTYPE, "bundle.yaml"), "is a hard link"),
        (member("dev", tarfile.CHRTYPE), "is a special file"),
        (member("fifo", tarfile.FIFOTYPE), "is a special file"),
        # a name that is not UTF-8 stopped the reloader (its digest could not be taken)
        (member("data/caf\udce9.yaml"), "unsafe path"),
        (member("data/" + "x" * 300 + ".yaml"), "unsafe path"),  # no such file name here
        # quoted in a log line, a name could forge another line or hide its text
        (member("policies/a\n2026-12-01 INFO serving.yaml"), "unsafe path"),
        (member("policies/a\x1b[31m.yaml"), "unsafe path"),
        (member("policies/\u202eevil.yaml"), "unsafe path"),
    ],
)
def test_unsafe_members_are_rejected(info: tarfile.TarInfo, why: str) -> None:
    data = tar_gz(
        [
            (member("bundle.yaml"), b"x: 1\n"),
            (info, b"bad\n" if info.type == tarfile.REGTYPE else None),
        ]
    )
    with pytest.raises(BundleError, match=why):
        archive.unpack(data, "b.tar.gz")


def test_hidden_members_are_ignored_and_dot_slash_prefixes_stripped() -> None:
    data = tar_gz(
        [
            (member("./bundle.yaml"), b"a: 1\n"),
            (member("./.git/config"), b"x"),
            (member("./policies/._p.yaml"), b"junk"),
        ]
    )
    assert set(archive.unpack(data, "b.tar.gz").files) == {"bundle.yaml"}


def test_limits_on_size_and_members() -> None:
    bomb = tar_gz([(member("bundle.yaml"), b"\0" * 2_000_000)])
    assert len(bomb) < 10_000
    with pytest.raises(BundleError, match="size limit"):
        archive.unpack(bomb, "b.tar.gz", Limits(max_bytes=1_000_000))
    with pytest.raises(BundleError, match="size limit"):
        archive.unpack(bomb, "b.tar.gz", Limits(max_bytes=5_000))  # the download itself
    many = tar_gz([(member(f"data/f{i}.yaml"), b"x: 1\n") for i in range(30)])
    with pytest.raises(BundleError, match="more than 20 entries"):
        archive.unpack(many, "b.tar.gz", Limits(max_files=20))
    assert len(archive.unpack(many, "b.tar.gz", Limits(max_files=30)).files) == 30


def test_trailing_garbage_after_gzip_is_rejected(tmp_path: Path) -> None:
    data = archive.build_archive(bundle_files(tmp_path), "t", "r1") + gzip.compress(b"more")
    with pytest.raises(BundleError, match="after the end"):
        archive.unpack(data, "b.tar.gz")


def test_content_digest_ignores_order_but_not_content() -> None:
    a = Snapshot({"a": b"1", "b": b"2"}, "x")
    b = Snapshot({"b": b"2", "a": b"1"}, "y")
    c = Snapshot({"a": b"1", "b": b"3"}, "x")
    assert a.digest == b.digest != c.digest


def test_cli_build_signs_and_refuses_broken_bundles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from authz.cli import main

    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(signing.private_pem(key))
    root = write_bundle(tmp_path / "bundle", [POLICY], revision="r7")
    (root / ".hidden").write_text("ignored")
    out = tmp_path / "out" / "bundle.tar.gz"
    assert main(["build", str(root), "-o", str(out), "--signing-key", str(key_file)]) == 0
    assert "revision r7" in capsys.readouterr().out
    snap = archive.unpack(out.read_bytes(), str(out))
    assert set(snap.files) == {"MANIFEST.json", "MANIFEST.sig", "bundle.yaml", "policies/p.yaml"}
    assert check_candidate(snap, key.public_key()).revision == "r7"
    # A broken bundle is not packed: the error names file:line:column.
    (root / "policies" / "p.yaml").write_text("apiVersion: authz/v1\nkind: Policy\nname: [\n")
    bad = tmp_path / "bad.tar.gz"
    assert main(["build", str(root), "-o", str(bad)]) == 2
    assert "policies/p.yaml:" in capsys.readouterr().err and not bad.exists()
    assert (
        main(["build", str(root), "-o", str(bad), "--signing-key", str(tmp_path / "nope.pem")]) == 2
    )


def test_a_path_that_is_a_file_and_a_directory_is_rejected() -> None:
    data = tar_gz([(member("bundle.yaml"), b"x: 1\n"), (member("data"), b"a: 1\n"), (member("data/x.yaml"), b"b: 2\n")])
    with pytest.raises(BundleError, match="'data' is a file and a directory"):
        archive.unpack(data, "b.tar.gz")


def test_names_words_need_are_safe() -> None:
    """ZWNJ and ZWJ are format characters Persian words and emoji sequences need; bidi and
    line controls are not."""
    assert archive.safe_name("data/\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.yaml") is not None
    assert archive.safe_name("data/\U0001F469\u200d\U0001F4BB.yaml") is not None
    assert archive.safe_name("data/caf\u00e9.yaml") is not None
    assert archive.safe_name("data/\u202eevil.yaml") is None
