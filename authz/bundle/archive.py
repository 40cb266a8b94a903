"""Bundle snapshots and archives: read safely, pack reproducibly, verify digests and signatures.

A *snapshot* is a bundle's files held in memory (relative POSIX path -> bytes). Every
source produces one (a directory is read once, an archive or HTTP download unpacked), so
the gate verifies and compiles exactly the bytes it was given, whatever happens on disk
meanwhile.

A bundle archive (``authz build``) is a gzip-compressed tar with the bundle's files and

    MANIFEST.json   {"apiVersion": "authz/v1", "kind": "BundleManifest", "name", "revision",
                     "serial": <int>, "files": {"<path>": {"sha256": "<hex>", "size": <bytes>}}}
    MANIFEST.sig    base64 Ed25519 signature of MANIFEST.json's exact bytes (when signed)

When a snapshot carries a manifest, every file must be listed with its digest and every
listed file must be present; with a verification key the signature must verify as well,
and a bundle without one is refused. ``serial`` (written by `authz build`, the build time in
Unix seconds unless ``--serial`` says otherwise) only ever grows: being inside the signed
manifest, it lets the server refuse an older signed bundle replayed to it (rollback). Hidden paths (a part starting with '.') are never
part of a snapshot, as the loader ignores them too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
import unicodedata
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from authz.bundle import signing
from authz.bundle.loader import BundleError
from authz.bundle.schema import Problem
from authz.bundle.yamlpos import Position

MANIFEST_JSON = "MANIFEST.json"
MANIFEST_SIG = "MANIFEST.sig"
META_FILES = (MANIFEST_JSON, MANIFEST_SIG)

DEFAULT_MAX_BYTES = 128 * 1024 * 1024
DEFAULT_MAX_FILES = 10_000


@dataclass(frozen=True, slots=True)
class Limits:
    """Applied to every candidate: the download or archive size, the unpacked size and files."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Snapshot:
    files: Mapping[str, bytes]
    origin: str  # where it came from, for logs and status
    archive: bytes | None = None  # the archive as received (kept as is when persisted)
    digest: str = field(default="")

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", content_digest(self.files))

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.files.values())


def content_digest(files: Mapping[str, bytes]) -> str:
    """One SHA-256 over the sorted (path, content digest) pairs: equal files, equal digest."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def reject(
    where: str, message: str, revision: str = "", line: int = 1, column: int = 1
) -> BundleError:
    return BundleError([Problem(Position(where, line, column), message)], revision)


def is_hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


MAX_NAME = 1024  # characters of a member's path; a part at most 255 (a file name on Linux)


def unshowable(name: str) -> bool:
    """A file name holding a control, format (bidi, zero-width) or line-separator character:
    quoted in a log line or an error, it could forge another line or hide its own text."""
    # ZWNJ and ZWJ (U+200C, U+200D) are format characters words need (Persian, emoji).
    return not name.isprintable() and any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
                                          and c not in "\u200c\u200d" for c in name)


def safe_name(name: str) -> str | None:
    """The normalised relative path of an archive member, or None when it is unsafe: one
    that climbs out, is absolute, is not UTF-8 (tarfile hands such bytes over as
    surrogates), holds characters no log may print, or could not be written out as a file here."""
    if not name or "\0" in name or "\\" in name or name.startswith("/") or len(name) > MAX_NAME:
        return None
    if unshowable(name):
        return None
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or len(p.encode()) > 255 for p in parts):
        return None
    return "/".join(parts)


# --- archives ------------------------------------------------------------------------


def unpack(data: bytes, origin: str, limits: Limits = DEFAULT_LIMITS) -> Snapshot:
    """A .tar.gz bundle -> Snapshot; raises BundleError for anything unsafe or broken."""
    where = posixpath.basename(origin.rstrip("/")) or origin
    if len(data) > limits.max_bytes:
        raise reject(
            where, f"bundle is {len(data)} bytes, over the size limit of {limits.max_bytes}"
        )
    d = zlib.decompressobj(wbits=31)  # gzip framing only
    try:
        raw = d.decompress(data, limits.max_bytes + 1)
    except zlib.error as exc:
        raise reject(where, f"not a gzip-compressed bundle archive: {exc}") from None
    if len(raw) > limits.max_bytes:
        raise reject(
            where, f"bundle unpacks to more than the size limit of {limits.max_bytes} bytes"
        )
    if not d.eof:
        raise reject(where, "archive is truncated: the gzip stream ends early")
    if d.unused_data.strip(b"\0"):
        raise reject(where, "archive has data after the end of its gzip stream")
    files: dict[str, bytes] = {}
    total = count = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            for member in tf:
                count += 1
                if count > limits.max_files:
                    raise reject(where, f"archive has more than {limits.max_files} entries")
                name = safe_name(member.name)
                if name is None:
                    raise reject(
                        where,
                        f"archive entry {ascii(member.name)} has an unsafe path "
                        "(absolute, '..', empty or with control characters)",
                    )
                if member.isdir():
                    continue
                if not member.isfile():
                    kind = (
                        "symlink"
                        if member.issym()
                        else "hard link"
                        if member.islnk()
                        else "special file"
                    )
                    raise reject(
                        where, f"archive entry {name!r} is a {kind}; only regular files are allowed"
                    )
                if is_hidden(name):
                    continue
                if name in files:
                    raise reject(where, f"archive entry {name!r} appears twice")
                total += member.size
                if total > limits.max_bytes:
                    raise reject(
                        where, f"bundle files exceed the size limit of {limits.max_bytes} bytes"
                    )
                fh = tf.extractfile(member)
                content = fh.read() if fh is not None else b""
                if len(content) != member.size:
                    raise reject(where, f"archive is truncated inside {name!r}")
                files[name] = content
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise reject(where, f"archive is corrupt or truncated: {exc}") from None
    if not files:
        raise reject(where, "archive holds no files")
    for name in files:  # `data` and `data/x.yaml`: a path cannot be a file and a directory
        parent = name.rpartition("/")[0]
        while parent:
            if parent in files:
                raise reject(where, f"archive entry {parent!r} is a file and a directory ({name!r})")
            parent = parent.rpartition("/")[0]
    return Snapshot(files, origin, archive=data)


def pack(files: Mapping[str, bytes]) -> bytes:
    """A reproducible .tar.gz of ``files``: sorted, mtime 0, owner 0, mode 0644."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=9) as tf:
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    out = buf.getvalue()
    # tarfile's gzip header carries the current time; zero it (bytes 4-7) for reproducibility.
    return out[:4] + b"\0\0\0\0" + out[8:]


# --- manifest ------------------------------------------------------------------------


def make_manifest(
    files: Mapping[str, bytes], name: str, revision: str, serial: int | None = None
) -> bytes:
    listed = {
        path: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for path, data in sorted(files.items())
        if path not in META_FILES
    }
    doc = {
        "apiVersion": "authz/v1",
        "kind": "BundleManifest",
        "name": name,
        "revision": revision,
        **({"serial": serial} if serial is not None else {}),
        "files": listed,
    }
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def build_archive(
    files: Mapping[str, bytes],
    name: str,
    revision: str,
    signing_key: Ed25519PrivateKey | None = None,
    serial: int | None = None,
) -> bytes:
    """The archive `authz build` writes: the files, MANIFEST.json and, with a key, MANIFEST.sig."""
    content = {k: v for k, v in files.items() if k not in META_FILES}
    manifest = make_manifest(content, name, revision, serial)
    content[MANIFEST_JSON] = manifest
    if signing_key is not None:
        content[MANIFEST_SIG] = signing.sign(manifest, signing_key)
    return pack(content)


def verify(snap: Snapshot, key: Ed25519PublicKey | None) -> dict[str, Any] | None:
    """Check the signature (when a key is given) and every digest; return the manifest.

    Raises BundleError naming the file at fault. Without a manifest and without a key
    there is nothing to verify and None is returned.
    """
    manifest_bytes = snap.files.get(MANIFEST_JSON)
    signature = snap.files.get(MANIFEST_SIG)
    if key is not None:
        if manifest_bytes is None:
            raise reject(
                MANIFEST_JSON,
                "bundle is not signed (no MANIFEST.json and MANIFEST.sig) "
                "and a verification key is required",
            )
        if signature is None:
            raise reject(
                MANIFEST_SIG,
                "bundle is not signed (no MANIFEST.sig) and a verification key is required",
            )
        reason = signing.verify(manifest_bytes, signature, key)
        if reason is not None:
            raise reject(MANIFEST_SIG, reason)
    if manifest_bytes is None:
        return None
    try:
        manifest = json.loads(manifest_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line, col = (exc.lineno, exc.colno) if isinstance(exc, json.JSONDecodeError) else (1, 1)
        raise reject(MANIFEST_JSON, f"invalid JSON: {exc}", line=line, column=col) from None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in listed.values()
    ):
        raise reject(MANIFEST_JSON, "manifest must have 'files': {path: {sha256, size}}")
    revision = str(manifest.get("revision", ""))
    problems: list[Problem] = []
    present = {k for k in snap.files if k not in META_FILES}
    for path in sorted(set(listed) - present):
        problems.append(
            Problem(
                Position(MANIFEST_JSON, 1, 1), f"'{path}' is listed in the manifest but missing"
            )
        )
    for path in sorted(present - set(listed)):
        problems.append(Problem(Position(path, 1, 1), "file is not listed in the manifest"))
    for path in sorted(present & set(listed)):
        want = listed[path]["sha256"].lower()
        got = hashlib.sha256(snap.files[path]).hexdigest()
        if got != want:
            problems.append(
                Problem(
                    Position(path, 1, 1),
                    f"digest mismatch: the manifest says sha256 {want}, the file has {got}",
                )
            )
    if problems:
        raise BundleError(problems, revision)
    return dict(manifest)


def manifest_serial(snap: Snapshot) -> int | None:
    """The manifest's ``serial``, None when there is none; BundleError when it is not a whole
    number. Trust it only once the signature verified (``verify``)."""
    data = snap.files.get(MANIFEST_JSON)
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # verify() reports it with its position
    serial = manifest.get("serial") if isinstance(manifest, dict) else None
    if serial is None:
        return None
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
        raise reject(MANIFEST_JSON, f"serial must be a whole number from 0, not {serial!r}")
    return serial


# --- on disk ---------------------------------------------------------------------------


@contextmanager
def materialize(snap: Snapshot) -> Iterator[Path]:
    """The snapshot written to a private temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="authz-bundle-") as tmp:
        root = Path(tmp)
        for name, data in snap.files.items():
            if safe_name(name) != name:
                raise reject(ascii(name), "unsafe file name in bundle")
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        yield root


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
