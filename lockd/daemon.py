"""``lockd``: the daemon's entry point. startup -> serve -> shutdown, signals in one place.

Theory of operation: :func:`main` maps flags to a :class:`~lockd.config.Config` and runs
:class:`Daemon`. Start-up order is the recovery protocol of DESIGN §5:

1. take the state directory's inter-process lock (fasteners) so a second daemon on the same
   state refuses to start (exit 3, naming the first one's pid) before touching anything;
2. open and migrate the journal;
3. bind and listen on both sockets (clients that connect from now on wait in the backlog:
   the grace period), but accept nothing yet;
4. recover every journaled lease; 5. start serving, then ``READY=1``.

Shutdown on SIGTERM/SIGINT stops serving and exits 0 *without* releasing anything: the
leases stay in the journal and the next start re-takes them (with systemd's fd store they
never drop at all). Releasing is only ever done by a client, an owner's death or an admin.

Exit codes: 0 clean stop; 1 fatal error (journal unusable, socket in use); 2 bad
configuration or usage; 3 another lockd already runs on this state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fasteners

from lockd import __version__, failpoint
from lockd.config import Config, ConfigError, load
from lockd.errors import JournalError, LimitExceeded
from lockd.frontends.server import Server
from lockd.frontends.virtlockd_server import VirtlockdServer
from lockd.journaling.journal import Journal, JournalUnreadable
from lockd.locks.lockspace import Lockspaces
from lockd.service import sharedfs, sharedio
from lockd.service.recovery import recover
from lockd.service.service import GroupCommit, LockService
from lockd.systemd import handover, notify

log = logging.getLogger("lockd")

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_RUNNING = 0, 1, 2, 3
GC_YOUNG_THRESHOLD = 10_000  # Python's default is 700 allocations
PID_FILE = "lockd.pid"


class Fatal(Exception):
    def __init__(self, message: str, code: int = EXIT_FATAL) -> None:
        super().__init__(message)
        self.code = code


def raise_nofile() -> int:
    # Every lease is an open fd; the default soft limit (1024) would cap us far below the
    # lease limit. The hard limit is the administrator's (LimitNOFILE= in the unit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def bind_socket(path: Path, mode: int, group: str | None) -> socket.socket:
    """A listening UNIX socket at ``path``, created with ``mode`` (never world-accessible)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise Fatal(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # stale: nobody accepts there
        else:
            raise Fatal(f"{path} is in use by another server")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket appears with 0600 at once, not after a chmod race
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        import grp

        os.chown(path, 0, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def socket_from_fd(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)  # family and type are read from the fd
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.reexec_requested = False
        self.bound: list[Path] = []  # socket paths bound here (unlinked at a clean stop)

    def request_reexec(self) -> None:
        self.reexec_requested = True
        self.stop.set()

    def lock_state_dir(self) -> fasteners.InterProcessLock:
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = fasteners.InterProcessLock(str(self.config.lock_path))
        pidfile = state / PID_FILE
        if not lock.acquire(blocking=False):
            try:
                pid = pidfile.read_text().strip()
            except OSError:
                pid = "unknown"
            raise Fatal(
                f"state directory {state} is in use by another lockd (pid {pid})", EXIT_RUNNING
            )
        pidfile.write_text(f"{os.getpid()}\n")
        return lock

    def inherited(self) -> handover.Handover:
        """Sockets and lease fds from a previous image (re-exec) or from systemd."""
        handed = handover.take()
        if handed is not None:
            return handed
        fds = notify.listen_fds()
        sockets = {name: fds.pop(name) for name in notify.SOCKET_NAMES if name in fds}
        mode = self.config.fd_store
        use_store = mode == "yes" or (
            mode == "auto" and (bool(sockets) or notify.store_announced())
        )
        return handover.Handover(sockets, fds, use_store)

    def listening(self, inherited: dict[str, int]) -> dict[str, socket.socket]:
        """The listening sockets by FileDescriptorName: inherited (systemd, re-exec) or
        bound here. virtlockd's protocol is served if systemd passed its socket
        (lockd-virtlockd.socket) or the config names one (``virtlockd_socket``)."""
        cfg = self.config
        paths: dict[str, tuple[Path | None, int, str | None]] = {
            notify.MAIN_SOCKET_NAME: (
                cfg.socket,
                0o660 if cfg.socket_group else 0o600,
                cfg.socket_group,
            ),
            notify.ADMIN_SOCKET_NAME: (cfg.admin_socket, 0o600, None),
            # root only, as virtlockd's own socket
            notify.VIRTLOCKD_SOCKET_NAME: (cfg.virtlockd_socket, 0o600, None),
        }
        out: dict[str, socket.socket] = {}
        for name, (path, mode, group) in paths.items():
            fd = inherited.get(name)
            if fd is not None:
                out[name] = socket_from_fd(fd)
            elif path is not None:
                out[name] = bind_socket(path, mode, group)
                self.bound.append(path)
        return out

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_loop_exception)
        # Signals first: a SIGTERM during start-up (or right after READY=1) must stop us
        # cleanly once we serve, not kill us by its default action halfway through.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.request_reexec)
        # -- startup: DESIGN §5, in order
        state_lock = self.lock_state_dir()
        nofile = raise_nofile()
        inherited = self.inherited()
        try:
            journal = Journal(self.config.journal_path, self.config.synchronous)
        except JournalUnreadable as exc:
            raise Fatal(str(exc)) from None
        listeners = self.listening(inherited.sockets)
        # configured lockspaces, and the named ones created at run time (journaled)
        lockspaces = Lockspaces(
            self.config.lockspaces, {n: Path(d) for n, d, _kind in journal.lockspaces()}
        )
        stored = dict(inherited.leases)
        # No collections while recovery builds the lease table: every object it makes lives
        # on (a full collection would walk all of them, more than once for 10,000 leases)
        gc.disable()
        # lockspaces on shared storage: their lease files are touched in a thread of their
        # own, with a bound, from recovery on (a mount that does not answer stalls nobody)
        workers = sharedfs.storage_workers(self.config, lockspaces, loop)
        try:
            outcome = recover(journal, lockspaces, stored, workers)
        except JournalError as exc:  # ENOSPC, EIO: nothing can be granted; say so and stop
            raise Fatal(f"cannot write the journal {self.config.journal_path}: {exc}") from None
        except LimitExceeded:
            raise Fatal(
                f"out of file descriptors re-taking the journaled leases (limit {nofile}); "
                "raise LimitNOFILE= and start again: the journal is unchanged"
            ) from None
        fdstore = notify.FdStore(inherited.fd_store)
        for lease in outcome.table.leases():
            if lease.continuity == "retaken" and lease.fd is not None:
                fdstore.add(lease.fdname, lease.fd)  # before anything is served
        for name, fd in stored.items():  # strays: released, or of a dead owner
            fdstore.remove(name)
            sharedfs.close_stray(fd, workers)
        commit = GroupCommit(journal, loop)
        commit.last_token = outcome.last_token
        service = LockService(
            self.config, journal, commit, lockspaces, outcome.table, fdstore, loop
        )
        service.counters.lost = outcome.report.lost
        service.shared_io.update(workers)
        for lease in outcome.pending:  # their storage did not answer: locked once it does
            sharedio.retake_in_background(service, lease)
        # indirect lockspaces on shared storage: refuse mounts that drop locks silently, and
        # verify the leases held there on a timer (lockd/service/sharedfs.py)
        verifier = sharedfs.Verifier(self.config, service)
        verifier.start()
        for owner in list(outcome.table.owners.values()):
            if not service.watch_owner(owner):
                service.owner_gone(owner, "owner exited during recovery")
        for uuid, lost in outcome.to_fence.items():
            fenced = outcome.table.owners.get(uuid)
            if fenced is not None:
                service.fence(fenced, lost)
        failpoint.hit("recovery.before-ready")
        # Recovery's objects (every lease, owner and import) live as long as the daemon: move
        # them out of the collector's sight, so a full collection does not walk 10,000 leases
        # in the middle of serving; and collect young objects less often (a request makes a
        # few dozen short-lived ones, and almost none are cyclic garbage).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD)
        gc.enable()
        server = Server(self.config, service, outcome.report, self.request_reexec)
        await server.start(listeners[notify.MAIN_SOCKET_NAME], listeners[notify.ADMIN_SOCKET_NAME])
        virtlockd: VirtlockdServer | None = None
        if notify.VIRTLOCKD_SOCKET_NAME in listeners:
            virtlockd = VirtlockdServer(self.config, service)
            await virtlockd.start(listeners[notify.VIRTLOCKD_SOCKET_NAME])
            virtlockd.count_others = lambda: len(server.connections)
            server.count_others = lambda: len(virtlockd.connections)
        log.info(
            "lockd %s ready: %s; %d leases held, fd store %s, fd limit %d",
            __version__,
            outcome.report.summary(),
            outcome.table.count,
            "on" if fdstore.enabled else "off",
            nofile,
            extra={"LOCKD_EVENT": "ready"},
        )
        notify.deliver(loop, f"READY=1\nSTATUS={server.status_line()}")
        # -- serve
        timers: list[Ticker | Pruner | sharedfs.Verifier] = [
            verifier,
            Pruner(loop, journal, self.config.history_retention),
            Ticker(loop, 2.0, lambda: notify.notify(f"STATUS={server.status_line()}")),
        ]
        interval = notify.watchdog_interval()
        if interval is not None:
            timers.append(
                Ticker(loop, interval, lambda: notify.deliver(loop, "WATCHDOG=1", interval))
            )
        if self.config.metrics_textfile_dir is not None:
            timers.append(textfile_writer(loop, self.config, server))
        while True:
            await self.stop.wait()
            if not self.reexec_requested:
                break
            # -- re-exec: journal what is in flight, then hand every fd to the new image
            commit.flush()
            held = {
                lease.fdname: lease.fd for lease in outcome.table.leases() if lease.fd is not None
            }
            log.info("re-executing with %d lease fds", len(held), extra={"LOCKD_EVENT": "reexec"})
            notify.deliver(loop, "RELOADING=1")
            try:
                handover.reexec(
                    handover.Handover(
                        {name: sock.fileno() for name, sock in listeners.items()},
                        held,
                        fdstore.enabled,
                    )
                )
            except OSError as exc:  # the new image cannot start: keep serving with this one
                log.error("re-exec failed: %s", exc, extra={"LOCKD_EVENT": "reexec-failed"})
                notify.deliver(loop, "READY=1")
                self.reexec_requested = False
                self.stop.clear()
        # -- shutdown: nothing is released; the journal keeps every lease. Nothing may reach
        # the journal once it is closed: every timer (verifier, pruner, metrics) stops, and
        # owners are no longer watched (a pidfd that fires from here on, even while asyncio
        # winds the loop down after the journal closed, would start a release). An owner that
        # dies now keeps its leases journaled; the next start's recovery releases them.
        for timer in timers:
            timer.cancel()
        service.stop_watching_owners()
        notify.deliver(loop, "STOPPING=1")
        log.info(
            "stopping; %d leases stay journaled", outcome.table.count, extra={"LOCKD_EVENT": "stop"}
        )
        await server.close()
        if virtlockd is not None:
            await virtlockd.close()
        commit.flush()
        journal.close()
        for sock_path in self.bound:  # systemd's sockets are systemd's to remove
            with contextlib.suppress(OSError):
                os.unlink(sock_path)
        # the pid file names a running daemon: gone at a clean stop (a crash leaves it, with
        # a dead pid, until the next start rewrites it). The lock file stays: unlinking a
        # lock file lets a starting daemon lock an inode that the next one no longer finds.
        with contextlib.suppress(OSError):
            (self.config.state_dir / PID_FILE).unlink()
        state_lock.release()
        return EXIT_OK


class Ticker:
    """Call ``fn`` every ``seconds`` from the event loop (so a hung loop stops the calls)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, fn: Callable[[], object]):
        self.loop, self.seconds, self.fn = loop, seconds, fn
        self.handle = loop.call_later(seconds, self._tick)

    def _tick(self) -> None:
        self.handle = self.loop.call_later(self.seconds, self._tick)  # first: fn may raise
        self.fn()

    def cancel(self) -> None:
        self.handle.cancel()


class Pruner:
    """History is bounded (DESIGN §4.5): delete what lies beyond the retention, in batches
    small enough not to stall the loop, every second. A full batch means more is waiting
    (a busy daemon writes more events a second than one batch: 16 clients, ~6,500), so the
    next batch follows after 0.1 s until the backlog is gone."""

    BATCH = 5000
    IDLE, BUSY = 1.0, 0.1

    def __init__(self, loop: asyncio.AbstractEventLoop, journal: Journal, retention: int):
        self.loop, self.journal, self.retention = loop, journal, retention
        self.handle = loop.call_later(self.IDLE, self._run)

    def _run(self) -> None:
        self.handle = self.loop.call_later(self.IDLE, self._run)  # first: prune may raise
        if self.journal.prune(self.retention, self.BATCH) >= self.BATCH:
            self.handle.cancel()
            self.handle = self.loop.call_later(self.BUSY, self._run)

    def cancel(self) -> None:
        self.handle.cancel()


def textfile_writer(loop: asyncio.AbstractEventLoop, config: Config, server: Server) -> Ticker:
    """node_exporter's textfile: DIR/lockd.prom now and every ``metrics_interval`` seconds.
    prometheus-client is imported here, only when the key is set (start-up time matters)."""
    from lockd.ctl import exposition
    from lockd.service import metrics

    directory = config.metrics_textfile_dir
    assert directory is not None

    def write() -> None:
        snap = metrics.snapshot(
            server.service, server.report, server.started_at, server.count_connections()
        )
        try:
            exposition.write_textfile(directory, snap)
        except OSError as exc:  # a full or missing directory must not stop the daemon
            log.warning(
                "cannot write metrics to %s: %s", directory, exc, extra={"LOCKD_EVENT": "metrics"}
            )

    write()
    return Ticker(loop, config.metrics_interval, write)


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    if isinstance(context.get("exception"), MemoryError):
        os.abort()  # DESIGN §8: abort and come back through recovery
    loop.default_exception_handler(context)


def setup_logging(level: str) -> None:
    """journald with structured fields (LOCKD_RESOURCE=, LOCKD_OWNER=, LOCKD_TOKEN=,
    LOCKD_EVENT=) when systemd connected our stderr to the journal, plain stderr elsewhere."""
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="lockd")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lockd[%(process)d]: %(levelname)s %(message)s"))
    root = logging.getLogger("lockd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def build_parser() -> argparse.ArgumentParser:
    """lockd's command line (also the source of the OPTIONS in lockd(8))."""
    p = argparse.ArgumentParser(
        prog="lockd",
        description="Crash-safe lock manager for virtualization hosts (runs in the foreground).",
        epilog="Exit codes: 0 stopped, 1 fatal error, 2 bad configuration, "
        "3 another lockd runs on this state directory. Failpoints for tests: "
        f"{failpoint.ENV}=NAME[@N][,...] with NAME in {', '.join(failpoint.POINTS)}.",
    )
    p.add_argument(
        "--config", metavar="FILE", type=Path,
        help="TOML config file (default /etc/lockd/lockd.conf)",
    )  # fmt: skip
    p.add_argument("--state-dir", metavar="DIR", type=Path, help="journal directory")
    p.add_argument("--socket", metavar="PATH", type=Path, help="main (io.lockd) socket path")
    p.add_argument(
        "--admin-socket", metavar="PATH", type=Path, help="admin (io.lockd.Admin) socket path"
    )
    p.add_argument(
        "--virtlockd-socket", metavar="PATH", type=Path,
        help="also answer virtlockd's protocol (libvirt) on this socket, e.g. "
        "/run/libvirt/virtlockd-sock (default: only if socket-activated)",
    )  # fmt: skip
    p.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the daemon's log level (default INFO, or the config file's log_level)",
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"lockd {__version__}")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        failpoint.armed_from_env()
        config = load(
            args.config,
            state_dir=args.state_dir,
            socket=args.socket,
            admin_socket=args.admin_socket,
            virtlockd_socket=args.virtlockd_socket,
            log_level=args.log_level,
        )
    except (ConfigError, ValueError) as exc:
        print(f"lockd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.log_level)
    # Out of memory, Python may fail even to report an exception ("Exception ignored on
    # building sys.unraisablehook arguments") and limp on or exit 1 (seen under RLIMIT_AS in
    # tests/test_faults.py). Every such path aborts instead: recovery brings the state back.
    sys.unraisablehook = _abort_on_memory_error
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
            return runner.run(Daemon(config).run())
    except Fatal as exc:
        print(f"lockd: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            print(f"lockd: {exc}", file=sys.stderr)
            return EXIT_FATAL
        os.abort()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        # MemoryError, or anything the daemon did not expect (SystemError from a loop that
        # ran out of memory): a crash either way, and a crash is an abort (DESIGN §8)
        os.abort()


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop  # imported here: lockctl and the client never need it

        return uvloop.new_event_loop
    return None  # asyncio's default


def _abort_on_memory_error(unraisable: Any) -> None:
    if isinstance(getattr(unraisable, "exc_value", None), MemoryError):
        os.abort()
    sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    sys.exit(main())
