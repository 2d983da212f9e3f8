"""The tests' side of virtlockd's protocol: a client and a private, real virtlockd.

Theory of operation: the differential tests send the same conversations to libvirt's real
virtlockd and to lockd's virtlockd front end and compare the replies. So that a bug in lockd's
codec cannot hide behind the same bug here, this module shares no code with
``lockd.wire.virtlockd_rpc``: it is written again from libvirt's protocol definitions
(``src/rpc/virnetprotocol.x``: a 4-byte big-endian length counting itself, six header words
{program, version, procedure, type, serial, status}; ``src/locking/lock_protocol.x``: program
0xEA7BEEF version 1, procedures 1-8) with ``struct`` alone, and it decodes every field of an
error reply (``virNetMessageError``) so the tests can compare all of them.

:class:`PrivateVirtlockd` runs Debian's ``/usr/sbin/virtlockd`` (package libvirt-daemon,
9.0.0) in the foreground. Its socket path is fixed (``/run/libvirt/virtlockd-sock`` as
root), so it runs in a private mount namespace in which a directory of ours is bound over
``/run``: ``unshare --mount --propagation private`` then ``sh -c 'mount --bind DIR /run && exec
virtlockd ...'``; both exec, so the pid we spawn is virtlockd's. The socket is then reachable
from the test at ``DIR/libvirt/virtlockd-sock``, and files outside ``/run`` (the tests'
resource files) are the same inodes on both sides. It is stopped by that pid only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

VIRTLOCKD = "/usr/sbin/virtlockd"
PROGRAM = 0xEA7BEEF
VERSION = 1
REGISTER, RESTRICT, NEW, CREATE_RESOURCE, DELETE_RESOURCE = 1, 2, 3, 4, 5
ACQUIRE, RELEASE, CREATE_LOCKSPACE = 6, 7, 8
SHARED, AUTOCREATE = 1, 2
CALL, REPLY = 0, 1
OK, ERROR = 0, 1
HDR = struct.Struct(">IIIiiIi")


def unavailable() -> str | None:
    """Why a private virtlockd cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (a mount namespace for virtlockd's fixed socket path)"
    if not os.access(VIRTLOCKD, os.X_OK):
        return f"{VIRTLOCKD} is not installed (Debian package libvirt-daemon)"
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    return None


# --- encoding -----------------------------------------------------------------------------


def u32(v: int) -> bytes:
    return struct.pack(">I", v & 0xFFFFFFFF)


def xstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u32(len(b)) + b + b"\0" * (-len(b) % 4)


def frame(proc: int, body: bytes = b"", serial: int = 1, prog: int = PROGRAM,
          vers: int = VERSION, mtype: int = CALL, status: int = OK) -> bytes:  # fmt: skip
    return HDR.pack(28 + len(body), prog, vers, proc, mtype, serial, status) + body


def register_body(uuid: bytes, name: str, owner_id: int, pid: int, flags: int = 0) -> bytes:
    assert len(uuid) == 16
    return uuid + xstr(name) + u32(owner_id) + u32(pid) + u32(flags)


def resource_body(path: str, name: str, flags: int = 0) -> bytes:
    return xstr(path) + xstr(name) + u32(flags)


# --- decoding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One reply: header fields, and every field of the error body if status is ERROR."""

    length: int
    prog: int
    vers: int
    proc: int
    mtype: int
    serial: int
    status: int
    error: tuple[object, ...] | None  # (code, domain, message, level, str1, str2, str3, int1, int2)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def code(self) -> int | None:
        return None if self.error is None else int(self.error[0])  # type: ignore[call-overload]

    @property
    def message(self) -> str | None:
        return None if self.error is None else self.error[2]  # type: ignore[return-value]


class _R:
    def __init__(self, b: bytes) -> None:
        self.b, self.o = b, 0

    def i(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.o)
        self.o += 4
        return int(v)

    def s(self) -> str:
        n = struct.unpack_from(">I", self.b, self.o)[0]
        self.o += 4
        v = self.b[self.o : self.o + n].decode()
        self.o += n + (-n % 4)
        return v

    def opt(self) -> str | None:
        return self.s() if self.i() else None


def decode_error(body: bytes) -> tuple[object, ...]:
    r = _R(body)
    code, domain, message, level = r.i(), r.i(), r.opt(), r.i()
    if r.i():  # dom
        r.s()
        r.o += 16
        r.i()
    str1, str2, str3 = r.opt(), r.opt(), r.opt()
    int1, int2 = r.i(), r.i()
    if r.i():  # net
        r.s()
        r.o += 16
    assert r.o == len(body), f"{len(body) - r.o} bytes after virNetMessageError"
    return (code, domain, message, level, str1, str2, str3, int1, int2)


class Conn:
    """One connection, blocking, with a timeout; calls and raw bytes."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.serial = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def recv(self) -> Reply:
        (length,) = struct.unpack(">I", self._exact(4))
        rest = self._exact(length - 4)
        prog, vers, proc, mtype, serial, status = struct.unpack_from(">IIiiIi", rest)
        err = decode_error(rest[24:]) if status == ERROR else None
        if status == OK:
            assert len(rest) == 24, f"an OK reply with a body of {len(rest) - 24} bytes"
        return Reply(length, prog, vers, proc, mtype, serial, status, err)

    def outcome(self, wait: float = 0.5) -> Reply | str:
        """The next reply, or "eof" (closed by the peer) or "silent" (nothing within wait)."""
        old = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            return self.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return "eof"
        except TimeoutError:
            return "silent"
        finally:
            self.sock.settimeout(old)

    def call(self, proc: int, body: bytes = b"") -> Reply:
        self.serial += 1
        self.send(frame(proc, body, self.serial))
        r = self.recv()
        assert (r.prog, r.vers, r.proc, r.mtype, r.serial) == (
            PROGRAM, VERSION, proc, REPLY, self.serial,
        ), r  # fmt: skip
        return r

    # the procedures
    def register(self, uuid: bytes, name: str, owner_id: int, pid: int, flags: int = 0) -> Reply:
        return self.call(REGISTER, register_body(uuid, name, owner_id, pid, flags))

    def restrict(self, flags: int = 0) -> Reply:
        return self.call(RESTRICT, u32(flags))

    def new(self, path: str, flags: int = 0) -> Reply:
        return self.call(NEW, xstr(path) + u32(flags))

    def create_resource(self, path: str, name: str, flags: int = 0) -> Reply:
        return self.call(CREATE_RESOURCE, resource_body(path, name, flags))

    def delete_resource(self, path: str, name: str, flags: int = 0) -> Reply:
        return self.call(DELETE_RESOURCE, resource_body(path, name, flags))

    def acquire(self, name: str, path: str = "", flags: int = 0) -> Reply:
        return self.call(ACQUIRE, resource_body(path, name, flags))

    def release(self, name: str, path: str = "", flags: int = 0) -> Reply:
        return self.call(RELEASE, resource_body(path, name, flags))

    def create_lockspace(self, path: str) -> Reply:
        return self.call(CREATE_LOCKSPACE, xstr(path))


def probe(path: str | os.PathLike[str]) -> str:
    """The kernel's view of byte 0: ``free``, ``shared`` or ``exclusive``, whoever holds it
    (virtlockd takes process-owned POSIX locks, lockd OFD locks: F_OFD_GETLK sees both)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:

        def conflict(ltype: int) -> int:
            req = struct.pack("hhqqi4x", ltype, os.SEEK_SET, 0, 1, 0)
            return int(struct.unpack("hhqqi4x", fcntl.fcntl(fd, 36, req))[0])  # F_OFD_GETLK

        if conflict(fcntl.F_WRLCK) == fcntl.F_UNLCK:
            return "free"
        return "shared" if conflict(fcntl.F_RDLCK) == fcntl.F_UNLCK else "exclusive"
    finally:
        os.close(fd)


# --- a private virtlockd ----------------------------------------------------------------------


class PrivateVirtlockd:
    """virtlockd in the foreground in a private mount namespace (see the module docstring)."""

    def __init__(self) -> None:
        # short: the socket path must fit in sun_path (108 bytes)
        self.dir = Path(tempfile.mkdtemp(prefix="vlk.", dir="/tmp"))
        self.run = self.dir / "run"
        self.run.mkdir()
        self.conf = self.dir / "virtlockd.conf"
        self.log = self.dir / "virtlockd.log"
        self.conf.write_text(f'log_level = 3\nlog_outputs = "3:file:{self.log}"\n')
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.run / "libvirt" / "virtlockd-sock"

    def start(self, timeout: float = 20.0) -> PrivateVirtlockd:
        script = 'mount --bind "$1" /run && exec "$2" -f "$3"'
        with open(self.dir / "stderr.txt", "ab") as err:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                 script, "sh", str(self.run), VIRTLOCKD, str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"virtlockd exited {self.proc.returncode}: {self.diagnose()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
                return self
            time.sleep(0.02)
        raise RuntimeError(f"virtlockd did not listen within {timeout} s: {self.diagnose()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def diagnose(self) -> str:
        out = []
        for p in (self.dir / "stderr.txt", self.log):
            with contextlib.suppress(OSError):
                out.append(p.read_text()[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
