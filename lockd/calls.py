"""The calls of lockd's API, sans-IO: what each one sends and how its reply is read.

Theory of operation: a :class:`Request` is one call described as data -- the Varlink method,
its parameters (optional ones left out when not given) and the function that reads the
reply's parameters into what the caller gets (the ``Lease`` object of an Acquire, the list of
an Admin.ListLeases, ...). :class:`requests` makes them, once, for both clients: the blocking
:class:`lockd.client.Client` and the asyncio :class:`lockd.aio.Client` differ only in how the
bytes travel and how a failed attempt is retried (:class:`lockd.client.Attempts`), never in
what a call means.

:func:`unwrap` turns a reply message into its parameters, or raises its error as the
:mod:`lockd.errors` class of the wire name (an *error reply* is an answer: the clients never
retry it). A reply that lacks the object or list a call promises is a
:class:`~lockd.errors.ProtocolError` (``bad-reply``), not a KeyError in the caller.

Invariants: nothing here does I/O or keeps state; every method of the clients' public API has
exactly one maker here, so both clients send the same parameters and raise the same errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lockd.errors import ProtocolError, from_wire
from lockd.wire.varlink import Call

__all__ = ["Reply", "Request", "reply_list", "reply_object", "requests", "unwrap"]

Reply = dict[str, Any]
T = TypeVar("T")


def _params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def unwrap(msg: Reply) -> Reply:
    """A reply's parameters, or its error raised as the matching lockd.errors class."""
    if "error" in msg:
        name, params = msg["error"], msg.get("parameters")
        if not isinstance(name, str):
            raise ProtocolError("error reply without an error name", reason="bad-reply")
        raise from_wire(name, params if isinstance(params, dict) else None)
    params = msg.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError("reply parameters are not an object", reason="bad-reply")
    return params


def reply_object(reply: Reply, key: str) -> Reply:
    value = reply.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"reply has no object {key!r}", reason="bad-reply")
    return value


def reply_list(reply: Reply, key: str) -> list[Reply]:
    value = reply.get(key)
    if not isinstance(value, list):
        raise ProtocolError(f"reply has no list {key!r}", reason="bad-reply")
    return value


@dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """One API call, sans-IO: the method, its parameters and how to read its reply."""

    method: str
    params: dict[str, Any]
    read: Callable[[Reply], T]


def _whole(reply: Reply) -> Reply:
    return reply


def _nothing(reply: Reply) -> None:
    return None


class requests:  # noqa: N801 - a namespace, used as ``requests.acquire(...)``
    """The calls of the API, made once here for :class:`lockd.client.Client` and
    :class:`lockd.aio.Client` (same parameters, same reading of the reply, same errors)."""

    @staticmethod
    def register(
        pid: int, *, uuid: str | None, name: str | None, fence: str | None
    ) -> Request[Reply]:
        params = _params(pid=pid, uuid=uuid, name=name, fence=fence)
        return Request("io.lockd.Register", params, lambda r: reply_object(r, "owner"))

    @staticmethod
    def unregister(*, owner: str | None, pid: int | None) -> Request[None]:
        return Request("io.lockd.Unregister", _params(owner=owner, pid=pid), _nothing)

    @staticmethod
    def acquire(
        resource: str | os.PathLike[str],
        *,
        owner: str | None,
        pid: int | None,
        lockspace: str | None,
        shared: bool,
        token: int | None,
    ) -> Request[Reply]:
        params = _params(
            resource=os.fspath(resource),
            owner=owner,
            pid=pid,
            lockspace=lockspace,
            mode="shared" if shared else "exclusive",
            token=token,
        )
        return Request("io.lockd.Acquire", params, lambda r: reply_object(r, "lease"))

    @staticmethod
    def release(
        resource: str | os.PathLike[str],
        *,
        owner: str | None,
        pid: int | None,
        lockspace: str | None,
    ) -> Request[Reply]:
        params = _params(resource=os.fspath(resource), owner=owner, pid=pid, lockspace=lockspace)
        return Request("io.lockd.Release", params, lambda r: reply_object(r, "lease"))

    @staticmethod
    def release_all(*, owner: str | None, pid: int | None) -> Request[list[Reply]]:
        params = _params(owner=owner, pid=pid)
        return Request("io.lockd.ReleaseAll", params, lambda r: reply_list(r, "leases"))

    @staticmethod
    def inquire(*, owner: str | None, pid: int | None) -> Request[Reply]:
        return Request("io.lockd.Inquire", _params(owner=owner, pid=pid), _whole)

    @staticmethod
    def watch(*, owner: str | None, pid: int | None) -> Call:
        return Call("io.lockd.Watch", _params(owner=owner, pid=pid), more=True)

    @staticmethod
    def status() -> Request[Reply]:
        return Request("io.lockd.Admin.Status", {}, lambda r: reply_object(r, "status"))

    @staticmethod
    def list_leases(lockspace: str | None, owner: str | None) -> Request[list[Reply]]:
        params = _params(lockspace=lockspace, owner=owner)
        return Request("io.lockd.Admin.ListLeases", params, lambda r: reply_list(r, "leases"))

    @staticmethod
    def list_owners() -> Request[list[Reply]]:
        return Request("io.lockd.Admin.ListOwners", {}, lambda r: reply_list(r, "owners"))

    @staticmethod
    def history(limit: int | None, owner: str | None, resource: str | None) -> Request[list[Reply]]:
        params = _params(limit=limit, owner=owner, resource=resource)
        return Request("io.lockd.Admin.History", params, lambda r: reply_list(r, "events"))

    @staticmethod
    def force_release(
        resource: str | os.PathLike[str], lockspace: str | None, owner: str | None
    ) -> Request[list[Reply]]:
        params = _params(resource=os.fspath(resource), lockspace=lockspace, owner=owner)
        return Request("io.lockd.Admin.ForceRelease", params, lambda r: reply_list(r, "leases"))

    @staticmethod
    def metrics() -> Request[Reply]:
        return Request("io.lockd.Admin.Metrics", {}, lambda r: reply_object(r, "metrics"))

    @staticmethod
    def get_info() -> Request[Reply]:
        return Request("org.varlink.service.GetInfo", {}, _whole)

    @staticmethod
    def get_interface_description(interface: str) -> Request[str]:
        return Request(
            "org.varlink.service.GetInterfaceDescription",
            {"interface": interface},
            lambda r: str(r.get("description", "")),
        )
