"""Typed errors with their Varlink wire names.

Theory of operation: every error a client can see has one class here, named after its wire
error (``io.lockd.ResourceBusy`` <-> ``ResourceBusy``). The daemon raises them and the server
turns them into ``{"error": NAME, "parameters": {...}}``; the client turns the wire form back
into the same class with :func:`from_wire`. Each class also subclasses the builtin exception
a Python caller would expect (filelock's convention), so ``except BlockingIOError`` catches a
busy resource and ``except PermissionError`` a refused one.

Invariant: ``WIRE_ERRORS`` maps every wire name to exactly one class, and ``to_wire`` of an
error gives back an equal error through ``from_wire``.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar


class LockdError(Exception):
    """Base of every error lockd reports by name."""

    wire_name: ClassVar[str] = "io.lockd.Error"

    def __init__(self, message: str = "", **parameters: Any) -> None:
        self.parameters: dict[str, Any] = parameters
        super().__init__(message or self.default_message())

    def default_message(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.parameters.items())
        return f"{self.wire_name}({fields})"

    def to_wire(self) -> dict[str, Any]:
        return {"error": self.wire_name, "parameters": self.parameters}


class ResourceBusy(LockdError, BlockingIOError):
    """The kernel refused the lock (EAGAIN): another open file description holds it."""

    wire_name = "io.lockd.ResourceBusy"

    def __init__(self, message: str = "", **parameters: Any) -> None:
        LockdError.__init__(self, message, **parameters)
        self.errno = errno.EAGAIN


class NoSuchOwner(LockdError, LookupError):
    wire_name = "io.lockd.NoSuchOwner"


class NotHeld(LockdError, LookupError):
    wire_name = "io.lockd.NotHeld"


class InvalidResource(LockdError, ValueError):
    wire_name = "io.lockd.InvalidResource"


class PermissionDenied(LockdError, PermissionError):
    wire_name = "io.lockd.PermissionDenied"


class LimitExceeded(LockdError, OSError):
    wire_name = "io.lockd.LimitExceeded"


class TokenMismatch(LockdError, ValueError):
    wire_name = "io.lockd.TokenMismatch"


class LeaseLost(LockdError):
    """The lease is lost: someone took the resource in a crash's gap, or shared storage
    dropped the lock (the reason is in Watch and History)."""

    wire_name = "io.lockd.LeaseLost"


class JournalError(LockdError, OSError):
    """The journal refused a write (ENOSPC, EIO): nothing was granted or released."""

    wire_name = "io.lockd.JournalError"


class InvalidParameter(LockdError, ValueError):
    """A parameter is missing, of the wrong type, or out of bounds (Varlink's own error)."""

    wire_name = "org.varlink.service.InvalidParameter"


class MethodNotFound(LockdError, LookupError):
    wire_name = "org.varlink.service.MethodNotFound"


class InterfaceNotFound(LockdError, LookupError):
    wire_name = "org.varlink.service.InterfaceNotFound"


class ProtocolError(LockdError, ValueError):
    """The byte stream is not Varlink: the connection is closed after this is sent."""

    wire_name = "io.lockd.ProtocolError"


class DaemonUnreachable(LockdError, ConnectionError):
    """Client side only: the daemon did not answer within the client's timeout."""

    wire_name = "io.lockd.DaemonUnreachable"


WIRE_ERRORS: dict[str, type[LockdError]] = {
    cls.wire_name: cls
    for cls in (
        ResourceBusy,
        NoSuchOwner,
        NotHeld,
        InvalidResource,
        PermissionDenied,
        LimitExceeded,
        TokenMismatch,
        LeaseLost,
        JournalError,
        InvalidParameter,
        MethodNotFound,
        InterfaceNotFound,
        ProtocolError,
    )
}


def from_wire(name: str, parameters: dict[str, Any] | None) -> LockdError:
    """The exception for a wire error; an unknown name still keeps its name."""
    params = parameters if isinstance(parameters, dict) else {}
    cls = WIRE_ERRORS.get(name)
    if cls is None:
        err = LockdError(f"{name}({params!r})", **params)
        err.wire_name = name  # type: ignore[misc]
        return err
    return cls(**params)


class IllegalTransition(RuntimeError):
    """A bug, never on the wire: an event that a lease's state does not allow
    (:meth:`lockd.locks.leases.Lease.apply`). Nothing was changed. Here with the other exception
    classes, which stay interpreted Python when the hot modules are compiled (mypyc cannot
    make a builtin exception subclass a native class)."""


class JournalUnreadable(ValueError):
    """The file is not a lockd journal we can use (corrupt, foreign, or from a newer lockd).
    Never on the wire: the daemon refuses to start (lockd.journaling.journal,
    lockd.journaling.migrations)."""
