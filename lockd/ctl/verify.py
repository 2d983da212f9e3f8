"""``lockctl verify``: does the kernel (and systemd's fd store) hold what lockd says it holds?

Theory of operation: three views of the same leases, taken from outside the daemon.

1. lockd's: ``io.lockd.Admin.ListDescriptors``, one consistent snapshot of every lease
   (the journal's leases: the table equals the journal between requests) with the daemon's
   pid, the fd of that pid that carries each held lease and the name it is parked under in
   the fd store.
2. the kernel's, three ways: ``/proc/PID/fdinfo/FD`` (the locks of the open file description
   behind each of the daemon's fds: who holds what, exactly), ``/proc/locks`` (every lock on
   the host: the lock must be there too) and an ``F_OFD_GETLK`` probe on byte 0 from a new
   open file description of the lease's path (what another process, e.g. a second QEMU,
   would be told; :func:`lockd.locks.ofd.holder`).
3. systemd's (when the daemon parks fds in its store): the unit's ``NFileDescriptorStore``
   (``systemctl show``; systemd 252 has no way to list the names), which must equal the
   number of parked lease fds.

The daemon's view is read before and after the others; if it changed (a request was served
in between) everything is read again, a few times, so a busy daemon is not reported as drift.

Locks the kernel keeps no record of: a FUSE filesystem that arbitrates locks itself (a
GlusterFS mount: the brick holds them) gets each lock request from the kernel and answers it;
the kernel then lists the lock neither in the fd's ``fdinfo`` nor in ``/proc/locks``
(fs/fuse/file.c, ``fuse_file_lock``; seen here with GlusterFS 10.3). For a held lease whose fd
shows no lock and whose path is on a FUSE filesystem in lockd's mount table (not found by
the fd's ``mnt_id`` or its ``/proc/PID/fd`` link: an fd handed back by systemd's fd store
may come from a mount namespace of an earlier instance, which neither resolves in; nor by a
stat, which such a mount may fail), what the filesystem answers stands in for the kernel's
record (``remote`` in the report counts such leases): the fd must still be the lease's file
(``wrong-file``; an fd the filesystem fails with EBADFD or ENOTCONN lost its lock:
``lock-missing``), another open file description must see the lease's mode (``probe``),
and for an exclusive lease the holder the filesystem names (classic ``F_GETLK``,
:func:`lockd.locks.ofd.holder_pid`) must be lockd's own pid (``lock-missing`` names the other one).
What that cannot see: which of several shared holders is lockd, a lock held there for no
lease (``orphan-lock``), and a holder on another host whose pid number happens to be lockd's.

Drift, each finding named (exit status 7 from lockctl when there is any):

- ``fd-missing``: a held lease with no fd, or an fd the daemon does not have open;
- ``lock-missing``: the lease's fd holds no OFD lock of the lease's mode on byte 0 (dropped
  behind lockd's back: another process unlocked the open file description);
- ``wrong-file``: the fd's lock is on another inode than the lease's path leads to now (the
  file was replaced or removed: a new open of the path is not protected);
- ``not-in-proc-locks``: ``/proc/locks`` does not list the lock;
- ``probe``: another open file description sees byte 0 free, or shared where the lease is
  exclusive;
- ``orphan-lock``: one of the daemon's fds holds an OFD lock on byte 0 that no held lease
  accounts for (a leak: a file locked for nobody);
- ``fd-store``: systemd's store holds another number of fds than lockd parked.

Needs root and lockd's PID namespace (``/proc/PID`` of the daemon must be ours to read).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lockd.locks import ofd

KINDS = (
    "fd-missing",
    "lock-missing",
    "wrong-file",
    "not-in-proc-locks",
    "probe",
    "orphan-lock",
    "fd-store",
)
SNAPSHOT_ATTEMPTS = 5


class VerifyError(Exception):
    """A view could not be read: the comparison is incomplete (not drift)."""


@dataclass(frozen=True)
class Lock:
    """One line of ``/proc/locks`` or of a ``fdinfo`` (``lock:`` prefix removed)."""

    kind: str  # OFDLCK, POSIX, FLOCK, ...
    access: str  # READ, WRITE
    key: str  # MAJOR:MINOR:INODE, device numbers in hex as the kernel prints them
    start: str
    end: str

    @property
    def byte0(self) -> bool:
        return self.kind == "OFDLCK" and (self.start, self.end) == ("0", "0")

    @property
    def mode(self) -> str:
        return "exclusive" if self.access == "WRITE" else "shared"


_LOCK_LINE = re.compile(
    r"^\s*(?:lock:\s*)?\d+:\s+(?:->\s+)?(\S+)\s+\S+\s+(\S+)\s+\S+\s+(\S+)\s+(\S+)\s+(\S+)"
)


def parse_lock(line: str) -> Lock | None:
    """``1: OFDLCK ADVISORY  WRITE -1 fe:00:2149683 0 0`` (fs/locks.c, lock_get_status)."""
    m = _LOCK_LINE.match(line)
    return None if m is None else Lock(*m.groups())


def inode_key(st: os.stat_result) -> str:
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def proc_locks() -> list[Lock]:
    with open("/proc/locks") as f:
        return [lock for line in f if (lock := parse_lock(line)) is not None]


def fd_locks(pid: int) -> dict[int, list[Lock]]:
    """fd -> the locks of its open file description, for every fd of ``pid``."""
    base = f"/proc/{pid}/fdinfo"
    try:
        names = os.listdir(base)
    except OSError as exc:
        raise VerifyError(
            f"cannot read lockd's open files ({base}: {exc.strerror}); run verify as root, "
            "in lockd's PID namespace"
        ) from None
    out: dict[int, list[Lock]] = {}
    for name in names:
        try:
            with open(f"{base}/{name}") as f:
                text = f.read()
        except OSError:
            continue  # closed meanwhile
        out[int(name)] = [
            lock for line in text.splitlines() if line.startswith("lock:") and
            (lock := parse_lock(line)) is not None
        ]  # fmt: skip
    return out


# FUSE filesystems: the kernel passes their locks to the FUSE server and records none itself
FUSE_FSTYPES = ("fuse", "fuseblk")


def is_fuse(fstype: str) -> bool:
    return fstype in FUSE_FSTYPES or fstype.startswith("fuse.")


def mount_types(pid: int) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount in ``/proc/PID/mountinfo`` (proc(5)),
    in its order; empty if it cannot be read."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            text = f.read()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and tail:
            # space, tab, newline and backslash are escaped as \ooo (octal)
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            out.append((point, tail[0]))
    return out


def fstype_of(path: str, mounts: list[tuple[str, str]]) -> str:
    """The filesystem type of the innermost mount holding ``path`` (the last mounted of
    equal ones: it hides the others); "" if none."""
    best, kind = -1, ""
    for point, fstype in mounts:
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= best:
            best, kind = len(point), fstype
    return kind


def unit_of(pid: int) -> tuple[str, bool] | None:
    """(unit, under a user manager) from ``/proc/PID/cgroup``; None outside a service."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            path = f.read().strip().splitlines()[-1].split(":", 2)[2]
    except (OSError, IndexError):
        return None
    parts = path.split("/")
    services = [p for p in parts if p.endswith(".service")]
    if not services:
        return None
    return services[-1], any(re.fullmatch(r"user@\d+\.service", p) for p in parts[:-1])


def fd_store_size(unit: str, user: bool) -> int:
    """systemd's ``NFileDescriptorStore`` of ``unit``."""
    argv = ["systemctl", *(["--user"] if user else []), "show", "--value"]
    try:
        out = subprocess.run(
            [*argv, "-p", "NFileDescriptorStore", unit],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VerifyError(f"cannot ask systemd about {unit}: {exc}") from None
    value = out.stdout.strip()
    if out.returncode != 0 or not value.isdigit():
        why = out.stderr.strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        raise VerifyError(f"cannot read NFileDescriptorStore of {unit}: {why[0]}")
    return int(value)


@dataclass
class Finding:
    kind: str
    detail: str
    token: int | None = None
    resource: str | None = None

    def wire(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Report:
    pid: int = 0
    leases: int = 0
    held: int = 0
    locks: int = 0  # OFD locks on byte 0 held by the daemon's fds
    fd_store: int | None = None  # systemd's count, when the store is in use
    # held leases on a FUSE filesystem, checked by its answers (module docstring)
    remote: int = 0
    findings: list[Finding] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "leases": self.leases,
            "held": self.held,
            "locks": self.locks,
            "fd_store": self.fd_store,
            "remote": self.remote,
            "drift": [f.wire() for f in self.findings],
        }


def _probe(path: str) -> str | None:
    try:
        return ofd.holder(path)
    except OSError:
        return None  # gone: the wrong-file check names it


def _remote(report: Report, d: dict[str, Any], fd: int) -> Finding | None:
    """A held lease whose lock a FUSE filesystem keeps (no kernel record): checked by the
    filesystem's own answers (module docstring). The first finding, in the order that says
    the most: the path leads to another file; another holder; nobody; the fd itself fails."""
    report.remote += 1
    at = {"token": d["token"], "resource": d["resource"]}
    try:
        now = inode_key(os.stat(d["path"]))
    except OSError as exc:
        return Finding("wrong-file", f"{d['path']}: {exc.strerror}", **at)
    fd_error: OSError | None = None
    try:
        have = inode_key(os.stat(f"/proc/{report.pid}/fd/{fd}"))
    except OSError as exc:
        fd_error = exc
    else:
        if have != now:
            return Finding("wrong-file", f"fd {fd} is inode {have}, {d['path']} is {now}", **at)
    try:
        seen, pid = ofd.holder_pid(d["path"])
    except OSError as exc:
        return Finding("probe", f"F_GETLK from another open file fails: {exc.strerror}", **at)
    if seen is None or (d["mode"] == "exclusive" and seen != "exclusive"):
        return Finding("probe", f"F_GETLK from another open file sees {seen or 'free'}", **at)
    if d["mode"] == "exclusive" and pid > 0 and pid != report.pid:
        detail = f"the filesystem says pid {pid} holds byte 0, not lockd (pid {report.pid})"
        return Finding("lock-missing", detail, **at)
    if fd_error is not None:
        if fd_error.errno in ofd.LOCK_DROPPED_ERRNOS:  # GlusterFS: EBADFD after a reconnect
            why = f"the filesystem dropped the lock ({fd_error.strerror} on fd {fd})"
            return Finding("lock-missing", why, **at)
        return Finding("wrong-file", f"fd {fd}: {fd_error.strerror}", **at)
    return None


def compare(
    snap: dict[str, Any],
    fds: dict[int, list[Lock]],
    host: list[Lock],
    store: int | None,
    mounts: list[tuple[str, str]] | None = None,
) -> Report:
    """The findings for one set of readings (pure, but for the probes and stats).
    ``mounts``: the daemon's mount table (:func:`mount_types`)."""
    report = Report(pid=int(snap["pid"]), leases=len(snap["descriptors"]), fd_store=store)
    find = report.findings
    held = [d for d in snap["descriptors"] if d["state"] == "held"]
    report.held = len(held)
    in_host = Counter((lk.key, lk.access) for lk in host if lk.byte0)
    accounted: set[int] = set()
    for d in held:
        token, resource, mode, fd = d["token"], d["resource"], d["mode"], d.get("fd")
        at = {"token": token, "resource": resource}
        if fd is None or fd not in fds:
            find.append(Finding("fd-missing", f"{mode} lease has no open fd ({fd})", **at))
            continue
        accounted.add(fd)
        mine = [lk for lk in fds[fd] if lk.byte0]
        # by the lease's path in lockd's mount table (module docstring)
        if not mine and mounts and is_fuse(fstype_of(d["path"], mounts)):
            finding = _remote(report, d, fd)
            if finding is not None:
                find.append(finding)
            continue
        if not mine or mine[0].mode != mode:
            got = mine[0].mode if mine else "no lock"
            find.append(
                Finding("lock-missing", f"fd {fd} holds {got} on byte 0, lease is {mode}", **at)
            )
            continue
        lock = mine[0]
        try:
            now = inode_key(os.stat(d["path"]))
        except OSError as exc:
            now = f"none ({exc.strerror})"
        if now != lock.key:
            find.append(
                Finding(
                    "wrong-file",
                    f"fd {fd} locks inode {lock.key}, but {d['path']} leads to {now}",
                    **at,
                )
            )
            continue
        if in_host[(lock.key, lock.access)] <= 0:
            missing = f"no OFDLCK {lock.access} on {lock.key}"
            find.append(Finding("not-in-proc-locks", missing, **at))
        else:
            in_host[(lock.key, lock.access)] -= 1
        seen = _probe(d["path"])
        if seen is None or (mode == "exclusive" and seen != "exclusive"):
            find.append(
                Finding("probe", f"F_OFD_GETLK from another open file sees {seen or 'free'}", **at)
            )
    for fd, locks in sorted(fds.items()):
        ours = [lk for lk in locks if lk.byte0]
        report.locks += len(ours)
        if ours and fd not in accounted:
            try:
                target = os.readlink(f"/proc/{report.pid}/fd/{fd}")
            except OSError:
                target = "?"
            find.append(
                Finding("orphan-lock", f"fd {fd} ({target}) holds {ours[0].mode}, for no lease")
            )
    if store is not None:
        parked = sum(1 for d in held if d.get("fd") is not None)
        if store != parked:
            find.append(Finding("fd-store", f"systemd stores {store} fds, lockd parked {parked}"))
    return report


def verify(list_descriptors: Any, unit: str | None = None, user: bool | None = None) -> Report:
    """Read every view (``list_descriptors()``: the daemon's reply) and compare them."""
    for _ in range(SNAPSHOT_ATTEMPTS):
        before = list_descriptors()
        pid = int(before["pid"])
        store = None
        if before["fd_store"]:
            found = unit_of(pid)
            name = unit or (found[0] if found else None)
            if name is None:
                raise VerifyError(
                    f"lockd (pid {pid}) parks fds in systemd's fd store but runs in no "
                    "service unit; name it with --unit"
                )
            store = fd_store_size(name, bool(found and found[1]) if user is None else user)
        fds = fd_locks(pid)
        host = proc_locks()
        report = compare(before, fds, host, store, mount_types(pid))
        if list_descriptors() == before:
            return report
    raise VerifyError(
        f"lockd's leases kept changing during {SNAPSHOT_ATTEMPTS} readings; try again when "
        "it is quieter"
    )
