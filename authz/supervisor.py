"""`authz serve --workers N`: N worker processes behind one gRPC and one HTTP port.

A decision is pure Python, so one process uses about one core whatever its threads do; more
throughput takes more processes. The supervisor starts N copies of `authz serve`, each
binding the same ports with SO_REUSEPORT (the kernel spreads connections over them), each
loading and watching the bundle itself. Metrics go to files in PROMETHEUS_MULTIPROC_DIR so
/metrics, whichever worker answers, adds up all of them. The supervisor forwards SIGHUP,
restarts a worker that dies, and on SIGTERM drains every worker and exits 0.

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
``python -m authz.supervisor``: a process that holds only what supervising takes (the
standard library and prometheus-client's multiprocess helpers, ~25 MB) instead of gRPC,
protobuf, the Envoy messages and the engine the command had imported (~60 MB more).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from authz import logging_setup
from authz.metrics import AUDIT_DROPPED, AUDIT_QUEUED_RECORDS, DROP_WORKER_KILLED
from authz.ports import bind_error

log = logging.getLogger("authz.supervisor")

# A worker that fails this soon after starting did not come up (a port in use, a bad flag):
# restarting it would only spin, so the whole service stops with its exit code. A worker
# killed by a signal is restarted whenever it happens.
START_GRACE_SECONDS = 3.0
STOP_TIMEOUT_SECONDS = 30.0


def _worker_preexec() -> Callable[[], None]:
    """In the worker before exec: die with the supervisor (Linux), and ignore SIGHUP until
    `authz serve` takes it over (an ignored signal stays ignored across exec)."""
    prctl = None
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):  # not Linux
        pass
    pr_set_pdeathsig = 1

    def preexec() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if prctl is not None:
            prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


METRICS_DIR_PREFIX = "authz-metrics-"


def _remove_orphaned_metrics_dirs() -> None:
    """Metrics directories of supervisors that were killed (SIGKILL leaves no chance to clean
    up): named after their supervisor's pid, removed when that process is gone."""
    tmp = tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        if not name.startswith(METRICS_DIR_PREFIX):
            continue
        pid_text = name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's, alive
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


def audit_records_held(metrics_dir: str, pid: int) -> int:
    """The audit records worker ``pid`` last reported holding, over all its sinks."""
    path = os.path.join(metrics_dir, f"gauge_livesum_{pid}.db")
    if not os.path.exists(path):
        return 0
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


class Supervisor:
    def __init__(self, serve_argv: list[str], workers: int) -> None:
        self.serve_argv = serve_argv  # ["serve", ...] without --workers
        self.workers = workers
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        self.exit_code = 0
        self.env = dict(os.environ)
        self.own_metrics_dir: str | None = None
        if not self.env.get("PROMETHEUS_MULTIPROC_DIR"):
            _remove_orphaned_metrics_dirs()
            self.own_metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
            self.env["PROMETHEUS_MULTIPROC_DIR"] = self.own_metrics_dir
        self.metrics_dir = self.env["PROMETHEUS_MULTIPROC_DIR"]
        self.audit_lost = 0.0  # records lost with killed workers, all told

    def start(self, index: int) -> None:
        argv = [sys.executable, "-m", "authz", *self.serve_argv, "--worker-index", str(index)]
        proc = subprocess.Popen(argv, env=self.env, preexec_fn=_worker_preexec())  # noqa: PLW1509
        self.children[index] = (proc, time.monotonic())
        log.info("worker %d started (pid %d)", index, proc.pid)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        try:
            for i in range(self.workers):
                self.start(i)
            while not self.stopping:
                time.sleep(0.2)
                self._reap()
        finally:
            self._stop_all()
            if self.own_metrics_dir is not None:
                shutil.rmtree(self.own_metrics_dir, ignore_errors=True)
        return self.exit_code

    def _reap(self) -> None:
        for index, (proc, started) in list(self.children.items()):
            code = proc.poll()
            if code is None or self.stopping:
                continue
            if code < 0:  # killed by a signal; a worker that exits closes its audit and counts itself
                self._count_lost_audit(index, proc.pid)
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if code > 0 and time.monotonic() - started < START_GRACE_SECONDS:
                log.error("worker %d exited with code %d while starting; stopping", index, code)
                self.exit_code = code or 1
                self.stopping = True
                return
            log.error("worker %d (pid %d) exited with code %d; restarting it", index, proc.pid, code)
            self.start(index)

    def _count_lost_audit(self, index: int, pid: int) -> None:
        lost = audit_records_held(self.metrics_dir, pid)
        if not lost:
            return
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
        for proc, _ in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def _stop_all(self) -> None:
        for proc, _ in self.children.values():
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: the worker drains in-flight checks and exits 0
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for index, (proc, _) in self.children.items():
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0 and self.exit_code == 0 and code != -signal.SIGTERM:
                log.error("worker %d exited with code %d", index, code)


def run(serve_argv: list[str], workers: int, addrs: list[str]) -> int:
    try:
        check_ports_free(addrs)
    except (PortInUse, OSError) as exc:
        print(f"authz serve: {exc}", file=sys.stderr)
        return 2  # as for any listener that cannot bind (cli.EXIT_USAGE)
    return Supervisor(serve_argv, workers).run()


def exec_supervisor(serve_argv: list[str], workers: int, addrs: list[str], log_level: str,
                    log_format: str) -> None:
    """Become the supervisor: exec ``python -m authz.supervisor`` (does not return)."""
    argv = [sys.executable, "-m", "authz.supervisor", "--workers", str(workers),
            "--log-level", log_level, "--log-format", log_format]
    for addr in addrs:
        argv += ["--addr", addr]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*argv, "--", *serve_argv])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz.supervisor",
                                     description="run by `authz serve --workers N`; not meant to be run by hand")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--addr", action="append", default=[])
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("serve_argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    serve_argv = args.serve_argv[1:] if args.serve_argv[:1] == ["--"] else args.serve_argv
    logging_setup.configure(args.log_level, args.log_format)
    return run(serve_argv, args.workers, args.addr)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
