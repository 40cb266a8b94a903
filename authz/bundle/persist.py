"""The last good bundle on disk (``authz serve --persist DIR``).

After every successful load the store writes the bundle to ``DIR/bundle.tar.gz`` (the
archive exactly as received, so a signature still verifies; a directory's files packed
into one) and ``DIR/bundle.json`` (name, revision, source, when). Both are replaced
atomically. At start, when the source cannot give a good bundle, the store loads the
persisted one through the same gate, verification included.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz.bundle.archive import DEFAULT_LIMITS, Limits, Snapshot, pack, unpack, write_atomic

log = logging.getLogger("authz.bundle")

ARCHIVE = "bundle.tar.gz"
META = "bundle.json"


@dataclass(frozen=True, slots=True)
class Persisted:
    snapshot: Snapshot
    meta: dict[str, Any]


def save(directory: Path, snap: Snapshot, name: str, revision: str) -> None:
    data = snap.archive if snap.archive is not None else pack(snap.files)
    meta = {
        "name": name,
        "revision": revision,
        "source": snap.origin,
        "digest": snap.digest,
        "saved_at": time.time(),
    }
    write_atomic(directory / ARCHIVE, data)
    write_atomic(directory / META, (json.dumps(meta, indent=2) + "\n").encode())


def load(directory: Path, limits: Limits = DEFAULT_LIMITS) -> Persisted | None:
    """The persisted bundle, or None when there is none. Raises BundleError when it is broken."""
    path = directory / ARCHIVE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read persisted bundle %s: %s", path, exc)
        return None
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            meta = {}
    except (OSError, ValueError):
        meta = {}
    return Persisted(unpack(data, str(path), limits), meta)
