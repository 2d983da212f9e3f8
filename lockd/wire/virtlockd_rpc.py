"""virtlockd's wire protocol (libvirt RPC + the lock-space program), sans-IO: bytes in, calls
out; replies encoded from data. No sockets here: the connection module, the tests and the
fuzzers share it unchanged.

Theory of operation (libvirt's ``src/rpc/virnetprotocol.x`` and
``src/locking/lock_protocol.x``; the bytes libvirtd 9.0.0 really sends are in the tests' data):

- A message is a 4-byte big-endian length that counts itself, then an XDR header of six
  32-bit words {program, version, procedure, type, serial, status}, then an XDR body. The
  lock-space program is ``0xEA7BEEF`` version 1 with eight procedures (:class:`Proc`); every
  reply body is void, or on error a ``virNetMessageError`` (:class:`RpcError`).
- :class:`Decoder` is fed whatever the socket gave and returns events: :class:`Call` (a call
  to dispatch), :class:`Rejected` (a call that gets an error reply without being dispatched:
  unknown program, version or procedure, a status other than OK, a body that does not
  decode) and :class:`Dropped` (a message that is not a call: virtlockd answers nothing).
- Bounds: a frame shorter than a header, or longer than :data:`MAX_FRAME` (the largest call
  the program can carry: two strings of ``VIR_LOCK_SPACE_PROTOCOL_STRING_MAX`` = 65,536
  bytes), is a :class:`FrameError` at once, before its body is buffered: a peer cannot grow
  our memory past one frame. virtlockd closes the connection on a bad length too (after
  accepting lengths up to 33,554,436 bytes, measured); the caller closes it on a FrameError.
- Bodies are decoded as libvirt's XDR filters do: a string longer than its bound or a body
  shorter than its arguments is "Unable to decode message payload" (an RPC error reply; the
  connection stays usable), and bytes after the arguments are ignored (as xdrmem does).
  Strings are bytes on the wire; they become ``str`` with ``surrogateescape``, so a path that
  is not UTF-8 still names the same file.

Invariants: ``feed`` either returns events or raises :class:`FrameError`, never anything
else, whatever the bytes; after a FrameError the decoder is poisoned (every later ``feed``
raises again), so nothing after a framing error is ever interpreted. ``encode_*`` never
fails on any :class:`RpcError` or header built from decoded input.
"""

from __future__ import annotations

import enum
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, NamedTuple

from lockd.errors import ProtocolError

PROGRAM = 0x0EA7BEEF
VERSION = 1
# virNetMessageHeader, preceded by the length word
_HEADER = struct.Struct(">IIIiiIi")
HEADER_SIZE = _HEADER.size  # 28
_HEADER_ONLY = struct.Struct(">IIiiIi")  # the header after the length word
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
STRING_MAX = 65536  # VIR_LOCK_SPACE_PROTOCOL_STRING_MAX
UUID_LEN = 16  # VIR_UUID_BUFLEN
# The largest call of the program: ACQUIRE/RELEASE/... {path, name, flags} at their bounds.
MAX_FRAME = HEADER_SIZE + 2 * (4 + STRING_MAX) + 4

# virLockSpaceProtocolAcquireResourceFlags
ACQUIRE_SHARED = 1
ACQUIRE_AUTOCREATE = 2


class Proc(enum.IntEnum):
    REGISTER = 1
    RESTRICT = 2
    NEW = 3
    CREATE_RESOURCE = 4
    DELETE_RESOURCE = 5
    ACQUIRE_RESOURCE = 6
    RELEASE_RESOURCE = 7
    CREATE_LOCKSPACE = 8


class MsgType(enum.IntEnum):  # virNetMessageType
    CALL = 0
    REPLY = 1
    MESSAGE = 2
    STREAM = 3
    CALL_WITH_FDS = 4
    REPLY_WITH_FDS = 5
    STREAM_HOLE = 6


STATUS_OK = 0
STATUS_ERROR = 1

# virErrorNumber and virErrorDomain values used here (include/libvirt/virterror.h)
ERR_INTERNAL_ERROR = 1
ERR_INVALID_ARG = 8
ERR_OPERATION_FAILED = 9
ERR_OPERATION_DENIED = 29
ERR_SYSTEM_ERROR = 38
ERR_RPC = 39
ERR_OPERATION_INVALID = 55
ERR_OPERATION_UNSUPPORTED = 84
ERR_RESOURCE_BUSY = 87
FROM_RPC = 7
FROM_LOCKING = 42
FROM_LOCKSPACE = 51
LEVEL_ERROR = 2  # VIR_ERR_ERROR

# virErrorMsg(): the prefix libvirt puts before a message of each code (virerror.c; the
# strings are in libvirt.so.0 of 9.0.0). It travels as str1, the message without it as str2.
TEMPLATES = {
    ERR_INTERNAL_ERROR: "internal error: %s",
    ERR_INVALID_ARG: "invalid argument: %s",
    ERR_OPERATION_FAILED: "operation failed: %s",
    ERR_OPERATION_DENIED: "operation forbidden: %s",
    ERR_SYSTEM_ERROR: "%s",
    ERR_RPC: "%s",
    ERR_OPERATION_INVALID: "Requested operation is not valid: %s",
    ERR_OPERATION_UNSUPPORTED: "Operation not supported: %s",
    ERR_RESOURCE_BUSY: "resource busy: %s",
}


class FrameError(ProtocolError):
    """The byte stream is not libvirt RPC (bad length, garbage): close the connection."""


class Header(NamedTuple):
    program: int
    version: int
    procedure: int
    type: int
    serial: int
    status: int


@dataclass(frozen=True, slots=True)
class RpcError:
    """``virNetMessageError`` (the dom and net members are always absent here)."""

    code: int
    domain: int
    message: str | None
    level: int = LEVEL_ERROR
    str1: str | None = None
    str2: str | None = None
    str3: str | None = None
    int1: int = -1
    int2: int = -1

    @classmethod
    def of(cls, code: int, domain: int, detail: str, int1: int = -1) -> RpcError:
        """An error as ``virReportError(code, "%s", detail)`` makes it: message = the code's
        template applied to detail, str1 = the template, str2 = detail."""
        template = TEMPLATES[code]
        return cls(code, domain, template.replace("%s", detail, 1), str1=template, str2=detail,
                   int1=int1)  # fmt: skip


# --- call arguments (lock_protocol.x) ---------------------------------------------------------


class RegisterArgs(NamedTuple):
    uuid: bytes
    name: str
    id: int
    pid: int
    flags: int

    @property
    def owner_uuid(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))


class RestrictArgs(NamedTuple):
    flags: int


class NewArgs(NamedTuple):
    path: str
    flags: int


class ResourceArgs(NamedTuple):
    """CREATE_RESOURCE, DELETE_RESOURCE, ACQUIRE_RESOURCE, RELEASE_RESOURCE."""

    path: str
    name: str
    flags: int


class CreateLockspaceArgs(NamedTuple):
    path: str


Args = RegisterArgs | RestrictArgs | NewArgs | ResourceArgs | CreateLockspaceArgs


class Call(NamedTuple):
    header: Header
    args: Args

    @property
    def proc(self) -> Proc:
        return Proc(self.header.procedure)


class Rejected(NamedTuple):
    """A call answered with an error without being dispatched."""

    header: Header
    error: RpcError


class Dropped(NamedTuple):
    """A message that is not a call: virtlockd answers nothing, and neither do we."""

    header: Header


Event = Call | Rejected | Dropped


class _Short(Exception):
    """The body ended before the arguments did (or a bound was crossed)."""


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def u32(self) -> int:
        if self.pos + 4 > self.end:
            raise _Short
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def string(self) -> str:
        n = self.u32()
        if n > STRING_MAX:
            raise _Short
        return self.opaque(n).decode("utf-8", "surrogateescape")

    def opaque(self, n: int) -> bytes:
        padded = n + (-n % 4)
        if self.pos + padded > self.end:
            raise _Short
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += padded
        return data


def _register(r: _Reader) -> RegisterArgs:
    return RegisterArgs(r.opaque(UUID_LEN), r.string(), r.u32(), r.u32(), r.u32())


def _resource(r: _Reader) -> ResourceArgs:
    return ResourceArgs(r.string(), r.string(), r.u32())


_DECODERS: dict[int, Any] = {
    Proc.REGISTER: _register,
    Proc.RESTRICT: lambda r: RestrictArgs(r.u32()),
    Proc.NEW: lambda r: NewArgs(r.string(), r.u32()),
    Proc.CREATE_RESOURCE: _resource,
    Proc.DELETE_RESOURCE: _resource,
    Proc.ACQUIRE_RESOURCE: _resource,
    Proc.RELEASE_RESOURCE: _resource,
    Proc.CREATE_LOCKSPACE: lambda r: CreateLockspaceArgs(r.string()),
}


def rpc_error(detail: str) -> RpcError:
    """An RPC-level error (VIR_ERR_RPC, VIR_FROM_RPC), as virNetServerProgram reports them."""
    return RpcError.of(ERR_RPC, FROM_RPC, detail)


def _resource_at(buf: bytes | bytearray, pos: int, end: int) -> ResourceArgs:
    """ResourceArgs {path, name, flags} straight from the buffer: the arguments of every
    ACQUIRE and RELEASE, decoded as :class:`_Reader` would, in one call instead of ten."""
    if pos + 4 > end:
        raise _Short
    (n,) = _U32.unpack_from(buf, pos)  # path
    path = pos + 4
    pos = path + n + (-n % 4)
    if n > STRING_MAX or pos + 4 > end:
        raise _Short
    (m,) = _U32.unpack_from(buf, pos)  # name
    name = pos + 4
    pos = name + m + (-m % 4)
    if m > STRING_MAX or pos + 4 > end:  # then the flags
        raise _Short
    return ResourceArgs(
        str(buf[path : path + n], "utf-8", "surrogateescape"),
        str(buf[name : name + m], "utf-8", "surrogateescape"),
        _U32.unpack_from(buf, pos)[0],
    )


# the procedures whose arguments are ResourceArgs (the hot path: _resource_at)
_RESOURCE_PROCS = frozenset(
    (Proc.CREATE_RESOURCE, Proc.DELETE_RESOURCE, Proc.ACQUIRE_RESOURCE, Proc.RELEASE_RESOURCE)
)
_CALL = int(MsgType.CALL)
_REPLY = int(MsgType.REPLY)


def _event(header: Header, buf: bytes | bytearray, start: int, end: int) -> Event:
    """What a whole frame (its body at buf[start:end]) means; never raises."""
    if (
        header.procedure in _RESOURCE_PROCS
        and header.type == _CALL
        and header.program == PROGRAM
        and header.version == VERSION
        and header.status == STATUS_OK
    ):  # an ACQUIRE or RELEASE (what the general path below does, in fewer steps)
        try:
            return Call(header, _resource_at(buf, start, end))
        except _Short:
            return Rejected(header, rpc_error("Unable to decode message payload"))
    is_call = header.type in (MsgType.CALL, MsgType.CALL_WITH_FDS)
    if header.program != PROGRAM or header.version != VERSION:
        # virNetServerProgramUnknownError; the reply carries the program and version asked for
        if not is_call:
            return Dropped(header)
        return Rejected(
            header,
            rpc_error(f"Cannot find program {header.program} version {header.version}"),
        )
    if header.type == MsgType.STREAM or not is_call:
        return Dropped(header)
    if header.status != STATUS_OK:
        return Rejected(header, rpc_error(f"Unexpected message status {header.status}"))
    decode = _DECODERS.get(header.procedure)
    if decode is None:
        return Rejected(header, rpc_error(f"unknown procedure: {header.procedure}"))
    reader = _Reader(buf, start, end)
    try:
        if header.type == MsgType.CALL_WITH_FDS:
            # a word with the number of fds passed (SCM_RIGHTS) precedes the arguments; no
            # procedure of this program takes any, and we never receive them
            nfds = reader.u32()
            if nfds:
                return Rejected(header, rpc_error(f"no procedure takes file descriptors ({nfds})"))
        args = decode(reader)
    except _Short:
        return Rejected(header, rpc_error("Unable to decode message payload"))
    return Call(header, args)


class Decoder:
    """Split a byte stream into frames and decode each (see the module docstring)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._broken: FrameError | None = None
        # bytes held (an unfinished frame, or whole ones past ``limit``): an attribute, not a
        # property, because the connection reads it after every call
        self.pending = 0

    def feed(self, data: bytes, limit: int | None = None) -> list[Event]:
        """Append ``data``; return the events of the complete frames, at most ``limit`` of
        them (the rest stay buffered for a later call, which may pass ``b""``)."""
        if self._broken is not None:
            raise self._broken
        held = self._buf
        # frames are decoded from ``data`` itself when nothing is held (the usual case:
        # one read, whole frames), else from the buffer it is appended to
        buf: bytes | bytearray = data
        if held:
            held += data
            buf = held
        out: list[Event] = []
        pos = 0
        size = len(buf)
        try:
            while limit is None or len(out) < limit:
                if size - pos < 4:
                    break
                (length,) = _U32.unpack_from(buf, pos)
                if length < HEADER_SIZE:
                    raise FrameError(
                        f"frame of {length} bytes is shorter than a header", reason="too-short"
                    )
                if length > self.max_frame:
                    raise FrameError(
                        f"frame of {length} bytes is longer than {self.max_frame}",
                        reason="too-big",
                    )
                if size - pos < length:
                    break
                header = Header(*_HEADER_ONLY.unpack_from(buf, pos + 4))
                out.append(_event(header, buf, pos + HEADER_SIZE, pos + length))
                pos += length
        except FrameError as exc:
            self._broken = exc
            held.clear()
            self.pending = 0
            raise
        if buf is held:
            del held[:pos]
        elif pos < size:
            held += data[pos:]
        self.pending = len(held)
        return out


# --- encoding -----------------------------------------------------------------------------------


def _string(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    return _U32.pack(len(raw)) + raw + b"\0" * (-len(raw) % 4)


def _opt_string(value: str | None) -> bytes:
    return b"\0\0\0\0" if value is None else b"\0\0\0\1" + _string(value)


def _reply_header(header: Header, length: int, status: int) -> bytes:
    # the request's program, version, procedure and serial come back (libvirt reuses the
    # message); the type is REPLY
    return _HEADER.pack(length, header.program, header.version, header.procedure,
                        MsgType.REPLY, header.serial, status)  # fmt: skip


def encode_ok(header: Header) -> bytes:
    """The reply of a call that succeeded (every procedure returns void)."""
    return _HEADER.pack(HEADER_SIZE, header.program, header.version, header.procedure,
                        _REPLY, header.serial, STATUS_OK)  # fmt: skip


def encode_error_body(err: RpcError) -> bytes:
    return b"".join(
        (
            _I32.pack(err.code),
            _I32.pack(err.domain),
            _opt_string(err.message),
            _I32.pack(err.level),
            b"\0\0\0\0",  # dom: absent
            _opt_string(err.str1),
            _opt_string(err.str2),
            _opt_string(err.str3),
            _I32.pack(err.int1),
            _I32.pack(err.int2),
            b"\0\0\0\0",  # net: absent
        )
    )


def encode_error(header: Header, err: RpcError) -> bytes:
    body = encode_error_body(err)
    return _reply_header(header, HEADER_SIZE + len(body), STATUS_ERROR) + body


def encode_args(args: Args) -> bytes:
    if isinstance(args, RegisterArgs):
        return (args.uuid[:UUID_LEN].ljust(UUID_LEN, b"\0") + _string(args.name)
                + _U32.pack(args.id) + _U32.pack(args.pid) + _U32.pack(args.flags))  # fmt: skip
    if isinstance(args, RestrictArgs):
        return _U32.pack(args.flags)
    if isinstance(args, NewArgs):
        return _string(args.path) + _U32.pack(args.flags)
    if isinstance(args, ResourceArgs):
        return _string(args.path) + _string(args.name) + _U32.pack(args.flags)
    return _string(args.path)


def encode_call(proc: Proc, serial: int, args: Args) -> bytes:
    """A call as libvirt's lockd driver sends it (for tests and benchmarks)."""
    body = encode_args(args)
    return _HEADER.pack(HEADER_SIZE + len(body), PROGRAM, VERSION, proc, MsgType.CALL,
                        serial, STATUS_OK) + body  # fmt: skip


def decode_error_body(body: bytes) -> RpcError:
    """The inverse of :func:`encode_error_body` (tests; ProtocolError if malformed)."""
    r = _Reader(body, 0, len(body))
    try:
        code, domain = _signed(r.u32()), _signed(r.u32())
        message = r.string() if r.u32() else None
        level = _signed(r.u32())
        if r.u32():  # dom: name, uuid, id
            r.string(), r.opaque(UUID_LEN), r.u32()
        strs = [r.string() if r.u32() else None for _ in range(3)]
        int1, int2 = _signed(r.u32()), _signed(r.u32())
        if r.u32():  # net: name, uuid
            r.string(), r.opaque(UUID_LEN)
    except _Short:
        raise ProtocolError("truncated virNetMessageError", reason="truncated") from None
    return RpcError(code, domain, message, level, strs[0], strs[1], strs[2], int1, int2)


def _signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value
