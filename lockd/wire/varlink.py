"""Varlink framing and messages, sans-IO: bytes in, calls out; calls in, bytes out.

Theory of operation: a Varlink connection is a stream of JSON objects, each terminated by
one NUL byte (varlink.org, "Protocol"). :class:`Decoder` is fed whatever the socket gave and
returns the complete messages; it keeps the tail of an unfinished one. It never touches a
socket, so the server, the client and the fuzzers share it unchanged.

Invariants (what makes a hostile peer harmless):
- a message longer than ``max_message`` bytes is refused as soon as the buffer passes that
  size without a NUL, so a peer that never sends NUL cannot grow our memory past the limit;
- anything that is not a JSON object, nests deeper than ``MAX_DEPTH``, or has fields of the
  wrong type raises :class:`~lockd.errors.ProtocolError` (close the connection) or
  :class:`~lockd.errors.InvalidParameter` (answer with the error, keep the connection);
- after a ProtocolError the decoder is poisoned: every later ``feed`` raises again, so no
  byte after a framing error is ever interpreted.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from lockd.errors import InvalidParameter, LockdError, ProtocolError

MAX_MESSAGE = 64 * 1024
# Our parameters are at most two levels deep; 16 leaves room for clients that wrap things.
MAX_DEPTH = 16
MAX_STRING = 4096


def _too_deep(obj: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        cur, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(cur, dict):
            stack.extend((v, depth + 1) for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            stack.extend((v, depth + 1) for v in cur if isinstance(v, (dict, list)))
    return False


def loads(raw: bytes) -> dict[str, Any]:
    """One message body (without its NUL) to a dict, or ProtocolError."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"message is not JSON: {exc}", reason="not-json") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a JSON object", reason="not-object")
    # Nesting needs an opening bracket per level: with at most MAX_DEPTH of them in the
    # bytes (brackets inside strings count too, so this only errs towards the full walk),
    # the message cannot be too deep, and the walk is skipped for every ordinary call.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _too_deep(obj, MAX_DEPTH):
        raise ProtocolError(f"message nests deeper than {MAX_DEPTH}", reason="too-deep")
    return obj


def dumps(obj: dict[str, Any]) -> bytes:
    """One message, NUL-terminated."""
    return orjson.dumps(obj) + b"\0"


class Decoder:
    """Split a byte stream into Varlink messages."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._scanned = 0  # bytes at the start of _buf known to hold no NUL
        self._broken: ProtocolError | None = None
        # bytes held (an unfinished message, or whole ones past ``limit``): an attribute, not
        # a property, because the server reads it after every call
        self.pending = 0

    def feed(self, data: bytes, limit: int | None = None) -> list[dict[str, Any]]:
        """Append ``data``; return the complete messages, at most ``limit`` of them (the
        rest stay buffered for the next call, which may pass ``b""``)."""
        if self._broken is not None:
            raise self._broken
        # The usual read: exactly one whole message of an allowed size, nothing held (a
        # client waits for each reply). Decoded from ``data`` itself, without the buffer.
        end = len(data) - 1
        if not self._buf and limit != 0 and 0 <= end <= self.max_message and data.find(0) == end:
            try:
                return [loads(data[:end])]
            except ProtocolError as exc:
                self._broken = exc
                raise
        # Search for NUL only in what is new: a large message arriving in many small reads
        # would otherwise be rescanned from its start on every read (quadratic).
        scan = self._scanned
        self._buf += data
        out: list[dict[str, Any]] = []
        try:
            start = 0
            while limit is None or len(out) < limit:
                end = self._buf.find(0, scan)
                if end < 0:
                    scan = len(self._buf)
                    break
                if end - start > self.max_message:
                    raise self._too_big()
                out.append(loads(bytes(self._buf[start:end])))
                start = scan = end + 1
            del self._buf[:start]
            self._scanned = scan - start
            if self._scanned > self.max_message:  # no NUL in sight: one message too long
                raise self._too_big()
        except ProtocolError as exc:
            self._broken = exc
            self._buf.clear()
            self.pending = 0
            raise
        self.pending = len(self._buf)
        return out

    def _too_big(self) -> ProtocolError:
        return ProtocolError(f"message longer than {self.max_message} bytes", reason="too-big")


class Call(NamedTuple):
    """One call, immutable. A NamedTuple, not a frozen dataclass: the server makes one per
    request, and a frozen dataclass's ``__init__`` costs a ``setattr`` call per field (2.5%
    of an acquire+release pair, bench.instructions)."""

    method: str
    parameters: dict[str, Any]
    more: bool = False
    oneway: bool = False

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Call:
        return cls(*call_fields(msg))

    def encode(self) -> bytes:
        msg: dict[str, Any] = {"method": self.method}
        if self.parameters:
            msg["parameters"] = self.parameters
        if self.more:
            msg["more"] = True
        if self.oneway:
            msg["oneway"] = True
        return dumps(msg)


def call_fields(msg: dict[str, Any]) -> tuple[str, dict[str, Any], bool, bool]:
    """A call message's method, parameters, more and oneway: checked, defaults filled in
    (ProtocolError: no method; InvalidParameter: a field of the wrong type). A plain tuple:
    the server reads every call with this, and a named tuple's ``__new__`` is a Python call."""
    method = msg.get("method")
    if type(method) is not str or not method or len(method) > 255:
        raise ProtocolError("call has no method name", reason="no-method")
    params = msg.get("parameters")
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise InvalidParameter(parameter="parameters")
    more = msg.get("more", False)
    oneway = msg.get("oneway", False)
    if more is not False and more is not True:
        raise InvalidParameter(parameter="more")
    if oneway is not False and oneway is not True:
        raise InvalidParameter(parameter="oneway")
    return method, params, more, oneway


def encode_reply(parameters: dict[str, Any], continues: bool = False) -> bytes:
    if continues:
        return orjson.dumps({"parameters": parameters, "continues": True}) + b"\0"
    return orjson.dumps({"parameters": parameters}) + b"\0"  # dumps, inline (every reply)


def encode_error(err: LockdError) -> bytes:
    return dumps(err.to_wire())


class Params:
    """Typed, bounded access to a call's parameters; every miss is an InvalidParameter."""

    __slots__ = ("_p",)

    def __init__(self, parameters: dict[str, Any]) -> None:
        self._p = parameters

    def string(self, name: str, default: str | None = None, max_len: int = MAX_STRING) -> str:
        value = self._p.get(name)
        if value is None:
            if default is None:
                raise InvalidParameter(f"parameter {name!r} is required", parameter=name)
            return default
        if not isinstance(value, str) or len(value) > max_len:
            raise _not_a_string(name, max_len)
        return value

    def opt_string(self, name: str, max_len: int = MAX_STRING) -> str | None:
        value = self._p.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > max_len:
            raise _not_a_string(name, max_len)
        return value

    def opt_int(self, name: str, lo: int = 0, hi: int = 2**63 - 1) -> int | None:
        value = self._p.get(name)
        if value is None:
            return None
        # bool is an int in Python but not in Varlink's type system
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise InvalidParameter(
                f"parameter {name!r} must be an integer in [{lo}, {hi}]", parameter=name
            )
        return value

    def integer(self, name: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
        value = self.opt_int(name, lo, hi)
        if value is None:
            raise InvalidParameter(f"parameter {name!r} is required", parameter=name)
        return value


def _not_a_string(name: str, max_len: int) -> InvalidParameter:
    return InvalidParameter(
        f"parameter {name!r} must be a string of at most {max_len} characters", parameter=name
    )
