"""`authz serve --workers N`: N worker processes behind one gRPC and one HTTP port.

A decision is pure Python, so one process uses about one core whatever its threads do; more
throughput takes more processes. The supervisor forks N workers, each running `authz serve`
on the same ports with SO_REUSEPORT (the kernel spreads connections over them), each
loading and watching the bundle itself. Metrics go to files in PROMETHEUS_MULTIPROC_DIR so
/metrics, whichever worker answers, adds up all of them. The supervisor forwards SIGHUP,
restarts a worker that dies, and on SIGTERM drains every worker and exits 0.

Workers are forked, not started afresh: the supervisor imports what a worker runs (gRPC,
protobuf and the Envoy messages, the engine: ~30 MB of Python heap) and freezes it out of
the collector before the first fork, so the workers share those pages until one writes to
them, instead of each holding its own copy. It never creates a gRPC channel or server and
starts no thread, so the fork copies nothing half-initialised; each worker starts its own.
Once all are forked, the supervisor replaces its image (exec, same pid, still their parent)
with a fresh ``python -m authz.supervisor --resume`` that imports none of it: every worker
writes to part of that heap as it runs (reference counts, the interpreter's own caches), and
the template's pages it copied would otherwise stay resident in the supervisor alone, about
15 MB that nothing uses (docs/performance.md, "Memory"). A worker that dies is replaced by a
fork of that lean supervisor, which imports what it runs itself. The bundle is not shared:
each worker loads and reloads its own.

A worker killed outright (SIGKILL, a crash) loses the audit records it still held. Every
worker publishes how many it holds (authz_audit_queued_records, once a second); before the
dead worker's metric files go, the supervisor reads that last figure and counts it in
authz_audit_dropped_total{reason="worker_killed"}, a counter file of its own beside the
workers' (so /metrics adds it up like theirs). Records queued after the last report are
not in it: the count is what the worker held up to a second before it died.

Only the workers of one supervisor may share the ports: before starting any, the supervisor
binds each port once without SO_REUSEPORT, which fails when anything (another `authz serve
--workers`, whose workers would otherwise silently split the traffic with ours) listens
there. Workers start with SIGHUP ignored until each can reload (so a HUP forwarded to a
starting worker cannot kill it, and restart it, and so on).

`authz serve --workers N` checks its flags, then replaces itself (exec, same pid) with
``python -m authz.supervisor``, with PROMETHEUS_MULTIPROC_DIR already in its environment:
prometheus-client picks its multi-process mode when it is imported, which the command had
done before it knew it would supervise.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from types import FrameType

from authz import logging_setup
from authz.ports import bind_error

# Only the standard library and the two modules above are imported here: they are all the
# supervisor holds once it has dropped the template heap. What it needs when a worker dies
# (prometheus-client's files, authz.metrics' names) is imported then.

log = logging.getLogger("authz.supervisor")

# A worker that fails this soon after starting did not come up (a port in use, a bad flag):
# restarting it would only spin, so the whole service stops with its exit code. A worker
# killed by a signal is restarted whenever it happens.
START_GRACE_SECONDS = 3.0
STOP_TIMEOUT_SECONDS = 30.0


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _become_worker(supervisor_pid: int) -> None:
    """In a freshly forked worker: the signal dispositions a new `authz serve` has, except
    SIGHUP, ignored until the worker can reload (a HUP forwarded to a starting worker must
    not kill it); and die with the supervisor (Linux)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os._exit(1)


def preload_worker_modules() -> None:
    """Import what a worker runs and freeze it out of the collector, so that forked workers
    share these pages (a collection would write to every object's header and copy them)."""
    import authz.cli  # noqa: F401 - for its side effect: the modules `authz serve` runs
    import authz.server  # noqa: F401
    import grpc._server  # noqa: F401 - imported by the first grpc.server() call

    gc.collect()
    gc.freeze()


def audit_records_held(metrics_dir: str, pid: int) -> int:
    """The audit records worker ``pid`` last reported holding, over all its sinks."""
    path = os.path.join(metrics_dir, f"gauge_livesum_{pid}.db")
    if not os.path.exists(path):
        return 0
    from prometheus_client.mmap_dict import MmapedDict

    from authz.metrics import AUDIT_QUEUED_RECORDS
    held = 0.0
    try:
        for entry in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
            if json.loads(entry[0])[1] == AUDIT_QUEUED_RECORDS[0]:
                held += entry[1]
    except (OSError, ValueError, RuntimeError, IndexError) as exc:  # a torn file: say so, count nothing
        log.warning("cannot read the metrics of dead worker pid %d: %s", pid, exc)
        return 0
    return int(held)


class PortInUse(Exception):
    pass


def check_ports_free(addrs: list[str]) -> None:
    """Raise PortInUse when anything listens on one of ``addrs`` (host:port)."""
    for addr in addrs:
        exc = bind_error(addr)
        if exc is None:
            continue
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"{addr} is already in use (another `authz serve`?); only the workers "
                "of one `authz serve --workers` share their ports") from None
        raise exc


# What the supervisor handles itself. Held back (blocked) while it replaces its image, so that
# one arriving then waits for the new image's handlers, instead of meeting the default action
# (exit) in between; the signal mask and pending signals carry over exec.
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class Supervisor:
    def __init__(self, serve_argv: list[str], workers: int, own_metrics_dir: bool = False, *,
                 argv: list[str] | None = None, children: dict[int, tuple[int, float]] | None = None,
                 ) -> None:
        """``own_metrics_dir``: PROMETHEUS_MULTIPROC_DIR was made for this supervisor
        (metrics.new_multiprocess_dir), which removes it when it stops. ``argv``: its own
        arguments (main's), which it resumes with once it has forked the workers; without
        them it keeps the template heap. ``children``: the workers of a resumed supervisor."""
        self.serve_argv = serve_argv  # ["serve", ...] without --workers
        self.workers = workers
        self.argv = argv
        self.resumed = children is not None
        self.children: dict[int, tuple[int, float]] = dict(children or {})  # index -> (pid, started)
        self.stopping = False
        self.exit_code = 0
        self.metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        self.own_metrics_dir = own_metrics_dir
        self.audit_lost = 0.0  # records lost with killed workers, all told

    def start(self, index: int) -> None:
        argv = [*self.serve_argv, "--worker-index", str(index)]
        supervisor_pid = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's loop
            code = 1
            try:
                _become_worker(supervisor_pid)
                from authz import cli

                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - report it and exit like a crashed process
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[index] = (pid, time.monotonic())
        log.info("worker %d started (pid %d)", index, pid)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # resumed: what came meanwhile
        try:
            if not self.resumed:
                preload_worker_modules()
                for i in range(self.workers):
                    self.start(i)
                self._drop_template()  # returns only when it could not
            while not self.stopping:
                time.sleep(0.2)
                self._reap()
        finally:
            self._stop_all()
            if self.own_metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return self.exit_code

    def _drop_template(self) -> None:
        """Become a fresh ``python -m authz.supervisor`` (same pid, so still the workers'
        parent) that has imported none of what they run."""
        if self.argv is None:
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        # A signal that came before the mask has had its handler run by now (the interpreter
        # runs pending handlers when a call returns): a SIGTERM then stops from this image.
        if self.stopping:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            return
        children = json.dumps({i: [pid, started] for i, (pid, started) in self.children.items()})
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, [sys.executable, "-m", "authz.supervisor", "--resume", children,
                                      *self.argv])
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            log.warning("cannot start a lean supervisor (%s); this one keeps the workers' template "
                        "heap, ~15 MB more", exc)

    def _reap(self) -> None:
        for index, (pid, started) in list(self.children.items()):
            if self.stopping:
                return
            code = _exit_code(pid, block=False)
            if code is None:
                continue
            del self.children[index]
            if code < 0:  # killed by a signal; a worker that exits closes its audit and counts itself
                self._count_lost_audit(index, pid)
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if code > 0 and time.monotonic() - started < START_GRACE_SECONDS:
                log.error("worker %d exited with code %d while starting; stopping", index, code)
                self.exit_code = code
                self.stopping = True
                return
            log.error("worker %d (pid %d) exited with code %d; restarting it", index, pid, code)
            self.start(index)

    def _count_lost_audit(self, index: int, pid: int) -> None:
        lost = audit_records_held(self.metrics_dir, pid)
        if not lost:
            return
        from prometheus_client.mmap_dict import MmapedDict, mmap_key

        from authz.metrics import AUDIT_DROPPED, DROP_WORKER_KILLED

        self.audit_lost += lost
        path = os.path.join(self.metrics_dir, f"counter_{os.getpid()}.db")
        counter = MmapedDict(path)  # type: ignore[no-untyped-call]
        try:
            counter.write_value(  # type: ignore[no-untyped-call]
                mmap_key(AUDIT_DROPPED[0], f"{AUDIT_DROPPED[0]}_total", ["reason"], [DROP_WORKER_KILLED],
                         AUDIT_DROPPED[1]), self.audit_lost, time.time())
        finally:
            counter.close()  # type: ignore[no-untyped-call]
        log.error("worker %d (pid %d) died holding %d audit records; they are lost "
                  "(authz_audit_dropped_total{reason=\"%s\"})", index, pid, lost, DROP_WORKER_KILLED)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        for pid, _ in self.children.values():
            _signal(pid, signum)

    def _stop_all(self) -> None:
        for pid, _ in self.children.values():
            _signal(pid, signal.SIGTERM)  # the worker drains in-flight checks and exits 0
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for index, (pid, _) in self.children.items():
            code = _exit_code(pid, block=False)
            while code is None and time.monotonic() < deadline:
                time.sleep(0.05)
                code = _exit_code(pid, block=False)
            if code is None:
                _signal(pid, signal.SIGKILL)
                code = _exit_code(pid, block=True)
            if code not in (0, -signal.SIGTERM) and self.exit_code == 0:
                log.error("worker %d exited with code %s", index, code)
        self.children.clear()


def _exit_code(pid: int, block: bool) -> int | None:
    """A child's exit code (negative: the signal that killed it), or None while it runs."""
    try:
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # already reaped
        return 0
    return os.waitstatus_to_exitcode(status) if done else None


def _signal(pid: int, signum: int) -> None:
    # Only children not yet reaped are in Supervisor.children, so the pid is still ours.
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def run(serve_argv: list[str], workers: int, addrs: list[str], own_metrics_dir: bool = False,
        argv: list[str] | None = None) -> int:
    """``argv``: main's, for the lean supervisor to start with (Supervisor._drop_template)."""
    try:
        check_ports_free(addrs)
    except (PortInUse, OSError) as exc:
        print(f"authz serve: {exc}", file=sys.stderr)
        return 2  # as for any listener that cannot bind (cli.EXIT_USAGE)
    return Supervisor(serve_argv, workers, own_metrics_dir, argv=argv).run()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz.supervisor",
                                     description="run by `authz serve --workers N`; not meant to be run by hand")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--addr", action="append", default=[])
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--own-metrics-dir", action="store_true")
    parser.add_argument("--resume", metavar="JSON",
                        help="the workers ({index: [pid, started]}) this supervisor forked before it "
                             "replaced its image")
    parser.add_argument("serve_argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    serve_argv = args.serve_argv[1:] if args.serve_argv[:1] == ["--"] else args.serve_argv
    logging_setup.configure(args.log_level, args.log_format)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        parser.error("PROMETHEUS_MULTIPROC_DIR must be set before this process starts")
    if args.resume is not None:
        children = {int(i): (pid, started) for i, (pid, started) in json.loads(args.resume).items()}
        return Supervisor(serve_argv, args.workers, args.own_metrics_dir, children=children).run()
    return run(serve_argv, args.workers, args.addr, args.own_metrics_dir, argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
