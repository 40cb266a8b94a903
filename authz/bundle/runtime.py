"""What `authz serve` and `authz build` do with bundles, kept out of cli.py.

``open_source`` is the source a ``--bundle`` value names (sources.py, oci.py);
``open_bundles`` opens the ``--bundle`` source; ``first_load`` makes the first load (falling
back to the ``--persist`` copy when the source gives no good bundle within its timeout).
`authz serve` runs the first load in the reloader thread once its ports are open, so that
/healthz answers (and Kubernetes does not kill the pod) while a slow source is read.
``build`` packs a bundle directory into a verified, optionally signed archive, written to a
file or pushed to an OCI registry.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from authz.bundle import archive, oci, signing, sources
from authz.bundle.archive import DEFAULT_LIMITS, Limits
from authz.bundle.loader import BundleError
from authz.bundle.sources import PollPolicy, Source, SourceUnavailable, read_directory
from authz.bundle.store import BundleStore, check_candidate
from authz.bundle.watcher import Reloader
from authz.metrics import Metrics
from authz.credentials import TokenFile
from authz.options import positive_float, positive_int
from authz.tls import ClientTls, client_context

if TYPE_CHECKING:
    from authz.tracing import Tracing

log = logging.getLogger("authz")


def open_source(
    spec: str | Path,
    limits: Limits = DEFAULT_LIMITS,
    policy: PollPolicy = PollPolicy(),
    ssl_context: ssl.SSLContext | None = None,
    *,
    tls: ClientTls | None = None,
    token: TokenFile | None = None,
    allow_redirects: bool = False,
    registry_credentials: Path | None = None,
    insecure_registries: Sequence[str] = (),
) -> Source:
    """The source for a ``--bundle`` value: an oci:// reference, an http(s) URL, a .tar.gz
    file or a directory."""
    text = str(spec)
    if text.startswith("oci://"):
        return oci.OciSource(
            text, limits, policy, credentials=registry_credentials,
            insecure=insecure_registries, ssl_context=ssl_context, tls=tls,
        )
    if text.startswith(("http://", "https://")):
        return sources.HttpSource(text, limits, policy, ssl_context=ssl_context, tls=tls, token=token,
                                  allow_redirects=allow_redirects)
    path = Path(text)
    if path.is_dir():
        return sources.DirectorySource(path, limits)
    if text.endswith((".tar.gz", ".tgz")) or path.is_file():
        return sources.ArchiveSource(path, limits)
    return sources.DirectorySource(path, limits)  # does not exist yet: watched until it appears


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The bundle flags of `authz serve` (--bundle itself is declared by cli.py)."""
    g = parser.add_argument_group("bundles")
    g.add_argument(
        "--verification-key",
        type=Path,
        metavar="KEY",
        help="Ed25519 public key (PEM): serve only bundles signed with its private key",
    )
    g.add_argument(
        "--persist",
        type=Path,
        metavar="DIR",
        help="keep the last good bundle in DIR; serve it at start when the source gives none",
    )
    g.add_argument(
        "--watch-interval",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="how often a directory or archive is checked for changes (default 1)",
    )
    g.add_argument(
        "--poll-min",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="bundle server: shortest delay between polls (default 10)",
    )
    g.add_argument(
        "--poll-max",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="bundle server: longest delay between polls (default 30); "
        "each delay is drawn between min and max",
    )
    g.add_argument(
        "--poll-backoff-max",
        type=positive_float,
        default=120.0,
        metavar="SECONDS",
        help="bundle server: longest delay after repeated errors (default 120)",
    )
    g.add_argument(
        "--poll-timeout",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="bundle server: timeout of one download (default 10)",
    )
    g.add_argument(
        "--registry-credentials",
        type=Path,
        metavar="FILE",
        help="oci:// bundles: registry credentials in Docker config.json form (auths.HOST.auth)",
    )
    g.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="oci:// bundles: a registry that may be reached over plain http (loopback ones "
        "always may); repeatable",
    )
    g.add_argument(
        "--bundle-token-file",
        type=Path,
        metavar="FILE",
        help="bundle server: send the token in FILE as 'Authorization: Bearer' "
        "(re-read when it changes)",
    )
    g.add_argument(
        "--allow-redirects",
        action="store_true",
        help="bundle server: follow redirects (only to the same scheme, host and port)",
    )
    g.add_argument(
        "--allow-rollback",
        action="store_true",
        help="accept a signed bundle whose manifest serial is older than the serving or "
        "persisted one (refused by default)",
    )
    g.add_argument(
        "--bundle-max-bytes",
        type=positive_int,
        default=archive.DEFAULT_MAX_BYTES,
        metavar="N",
        help="largest bundle accepted, downloaded or unpacked (default 128 MiB)",
    )


def open_bundles(
    args: argparse.Namespace, metrics: Metrics, default: Path, tls: ClientTls | None = None,
    tracing: Tracing | None = None,
) -> tuple[BundleStore, Reloader]:
    """The empty store and the reloader, not started. SystemExit(2) on bad flags."""
    key = None
    if args.verification_key is not None:
        try:
            key = signing.load_verification_key(args.verification_key)
        except signing.KeyFileError as exc:
            print(f"authz serve: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    limits = Limits(max_bytes=args.bundle_max_bytes)
    try:
        policy = PollPolicy(
            min_delay=args.poll_min,
            max_delay=args.poll_max,
            backoff_max=args.poll_backoff_max,
            timeout=args.poll_timeout,
        )
        spec = str(args.bundle or default)
        token = None
        if args.bundle_token_file is not None:
            if not spec.startswith(("http://", "https://")):
                raise ValueError("--bundle-token-file is for a bundle server URL (--bundle http(s)://)")
            token = TokenFile(args.bundle_token_file, "--bundle-token-file")
        source = open_source(
            spec,
            limits,
            policy,
            tls=tls if tls is not None else ClientTls(args.ca_file),
            token=token,
            allow_redirects=args.allow_redirects,
            registry_credentials=args.registry_credentials,
            insecure_registries=args.insecure_registry,
        )
    except ValueError as exc:
        print(f"authz serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    store = BundleStore(
        metrics,
        verification_key=key,
        persist_dir=args.persist,
        limits=limits,
        source=source.description,
        allow_rollback=args.allow_rollback,
        allow_empty=args.allow_empty_bundle,
    )
    return store, Reloader(store, source, interval=args.watch_interval, tracing=tracing)


def first_load(store: BundleStore, reloader: Reloader, persist: Path | None) -> None:
    """Load from the source once; serve the --persist copy if that gave no good bundle."""
    source = reloader.source
    reloader.initial_load()
    if store.current is None and persist is not None:
        reason = store.status().last_error or "the source gave no bundle"
        store.restore_persisted(f"source {source.description} gave no good bundle: {reason}")
    if store.current is None:
        reason = store.status().last_error or "no bundle"
        # A log record, not a bare line, so that --log-format json keeps stderr all JSON.
        log.error(
            "no bundle to serve (%s); gRPC health is NOT_SERVING, /readyz fails and every "
            "check is denied until %s gives a good bundle",
            reason,
            source.description,
            extra={"source": source.description, "reason": reason},
        )


def default_serial() -> int:
    """The build time in Unix seconds (SOURCE_DATE_EPOCH when set, for reproducible builds)."""
    return int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())


def build(
    directory: Path,
    output: Path | None,
    signing_key: Path | None,
    serial: int | None = None,
    push: str | None = None,
    registry_credentials: Path | None = None,
    ca_file: Path | None = None,
    insecure_registries: Sequence[str] = (),
) -> int:
    """`authz build DIR [-o FILE.tar.gz] [--push oci://...] [--signing-key KEY] [--serial N]`.

    0 written (and pushed), 1 the registry refused or was unreachable, 2 bundle, key or flag
    error."""
    if output is None and push is None:
        print("authz build: give -o FILE.tar.gz, --push oci://REGISTRY/REPO:TAG or both",
              file=sys.stderr)
        return 2
    if push is not None:
        try:
            oci.parse_reference(push)
        except ValueError as exc:
            print(f"authz build: {exc}", file=sys.stderr)
            return 2
    key = None
    if signing_key is not None:
        try:
            key = signing.load_signing_key(signing_key)
        except signing.KeyFileError as exc:
            print(f"authz build: {exc}", file=sys.stderr)
            return 2
    try:
        snap = read_directory(directory, Limits())
        files = {k: v for k, v in snap.files.items() if k not in archive.META_FILES}
        policy_set = check_candidate(archive.Snapshot(files, str(directory)))
    except SourceUnavailable as exc:
        print(f"authz build: {exc}", file=sys.stderr)
        return 2
    except BundleError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    serial = default_serial() if serial is None else serial
    data = archive.build_archive(files, policy_set.name, policy_set.revision, key, serial)
    what = (
        f"bundle {policy_set.name} revision {policy_set.revision}, {len(files)} files, "
        f"{len(data)} bytes, serial {serial}, {'signed' if key is not None else 'unsigned'}"
    )
    if output is not None:
        try:
            archive.write_atomic(output, data)
        except OSError as exc:
            print(f"authz build: cannot write {output}: {exc}", file=sys.stderr)
            return 2
        print(f"{output}: {what}")
    if push is not None:
        try:
            digest = oci.push(
                push, data, policy_set.name, policy_set.revision,
                credentials=registry_credentials, insecure=insecure_registries,
                ssl_context=client_context(ca_file),
            )
        except (ValueError, SourceUnavailable) as exc:
            print(f"authz build: push to {push} failed: {exc}", file=sys.stderr)
            return 1
        print(f"{push}: {what}, manifest {digest}")
    return 0
