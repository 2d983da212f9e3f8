"""Owners, leases and their state machine: pure data, no I/O.

Theory of operation: every lease moves through the states below, and the only way to change
a lease's state is :meth:`Lease.apply`, which looks the (state, event) pair up in
``TRANSITIONS`` and raises :class:`IllegalTransition` (changing nothing) when the pair is not
there. The server drives the events in the order the crash protocol demands (DESIGN §4):

    acquire:  kernel lock taken -> ACQUIRING --committed--> HELD        (then reply)
                                          \\--failed--> RELEASED         (lock dropped)
    release:  HELD --release--> RELEASING --committed--> RELEASED        (then close fd)
                                          \\--failed--> HELD             (lock kept)
    lost:     LOST --release--> RELEASING_LOST --committed--> RELEASED
    dropped:  HELD --lose--> LOST   (at run time: the shared filesystem dropped the lock
                                     behind our back, lockd/service/sharedfs.py found it)
    recovery: RECOVERING --adopt|retake--> HELD, --lose--> LOST,
              --owner-dead--> RELEASING

ACQUIRING and RELEASING leases have a commit in flight; a second request for the same
(owner, lockspace, resource) waits for it (``Lease.settled``) and then answers from the
settled state, which is what makes a retried request idempotent even while the first copy
is still being journaled.

:class:`LeaseTable` indexes leases by (owner, lockspace, resource key) for idempotency, by
(owner, resource name) for releases, and by (lockspace, resource key) for administration.
Resource keys are ``"dev:ino"`` in the direct lockspace (two paths to one inode are one
resource: the kernel already sees one lock) and the sha256 of the resource string in an
indirect one.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import heapq
from dataclasses import dataclass, field
from typing import Any

from lockd.errors import IllegalTransition


# str-valued enums: their hash is str's (C), and the transition table is looked up on
# every grant and release
class State(enum.StrEnum):
    RECOVERING = "recovering"
    ACQUIRING = "acquiring"
    HELD = "held"
    LOST = "lost"
    RELEASING = "releasing"
    RELEASING_LOST = "releasing-lost"
    RELEASED = "released"


class Event(enum.StrEnum):
    COMMITTED = "committed"
    FAILED = "failed"
    RELEASE = "release"
    ADOPT = "adopt"
    RETAKE = "retake"
    LOSE = "lose"
    OWNER_DEAD = "owner-dead"


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.ACQUIRING, E.COMMITTED): S.HELD,
    (S.ACQUIRING, E.FAILED): S.RELEASED,
    (S.HELD, E.RELEASE): S.RELEASING,
    (S.HELD, E.LOSE): S.LOST,
    (S.RELEASING, E.COMMITTED): S.RELEASED,
    (S.RELEASING, E.FAILED): S.HELD,
    (S.LOST, E.RELEASE): S.RELEASING_LOST,
    (S.RELEASING_LOST, E.COMMITTED): S.RELEASED,
    (S.RELEASING_LOST, E.FAILED): S.LOST,
    (S.RECOVERING, E.ADOPT): S.HELD,
    (S.RECOVERING, E.RETAKE): S.HELD,
    (S.RECOVERING, E.LOSE): S.LOST,
    (S.RECOVERING, E.OWNER_DEAD): S.RELEASING,
}

# What a client sees: in-flight states show as where they came from or are going.
WIRE_STATE = {
    S.RECOVERING: "held",
    S.ACQUIRING: "held",
    S.HELD: "held",
    S.LOST: "lost",
    S.RELEASING: "held",
    S.RELEASING_LOST: "lost",
    S.RELEASED: "released",
}


@dataclass(eq=False, slots=True)
class Owner:
    uuid: str
    name: str
    pid: int
    uid: int
    start_time: int
    boot_id: str
    fence: str
    registered_at: float
    # the VM manager's own number for it (libvirt's domain id), if it gave one
    domain_id: int | None = None
    pidfd: int | None = None
    leases: dict[tuple[str, str], Lease] = field(default_factory=dict)
    # resource name -> the newest of its leases taken under that name (in any lockspace: a
    # hit is checked against the lockspace asked for); a Release finds its lease here
    # without a stat (LockService._find)
    by_name: dict[str, Lease] = field(default_factory=dict)
    # the task releasing its leases once it died (one per owner: see LockService.owner_gone)
    dying: asyncio.Task[None] | None = None

    def row(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "pid": self.pid,
            "start_time": self.start_time,
            "boot_id": self.boot_id,
            "uid": self.uid,
            "fence": self.fence,
            "registered_at": self.registered_at,
            "domain_id": self.domain_id,
        }

    def wire(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "pid": self.pid,
            "uid": self.uid,
            "start_time": self.start_time,
            "fence": self.fence,
            "registered_at": self.registered_at,
            "domain_id": self.domain_id,
            "leases": len(self.leases),
        }

    def ref(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "pid": self.pid}


@dataclass(eq=False, slots=True)
class Lease:
    owner: Owner
    lockspace: str
    rkey: str
    resource: str
    path: str
    mode: str
    token: int
    acquired_at: float
    fdname: str
    state: State
    fd: int | None = None
    # kept (fd adopted from the store) | retaken (locked again after a gap) | lost | new
    continuity: str = "new"
    # set while a commit is in flight (to LockService.in_flight, a marker, until somebody
    # waits: then to a future of theirs, done when the lease settles); None once settled
    settled: asyncio.Future[None] | None = None
    # (when, why) the lease was lost, as journaled with its "lost" event; None while it is
    # not lost, or for a loss journaled before this daemon started until someone asks
    # (LockService.lost_event reads it back from history then)
    lost: tuple[float, str] | None = None
    # (lockspace, rkey): made once, shared by the owner's and the resource's index
    key: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.lockspace, self.rkey)

    @property
    def exclusive(self) -> bool:
        return self.mode == "exclusive"

    def apply(self, event: Event) -> State:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise IllegalTransition(f"lease {self.resource}: {event.value} in {self.state.value}")
        self.state = new
        return new

    def as_event(self, event: str, reason: str | None, at: float) -> dict[str, Any]:
        """An io.lockd Event about this lease, as Watch streams it."""
        return {
            "event": event,
            "at": at,
            "lockspace": self.lockspace,
            "resource": self.resource,
            "owner": self.owner.uuid,
            "pid": self.owner.pid,
            "token": self.token,
            "mode": self.mode,
            "reason": reason,
        }

    def wire(self) -> dict[str, Any]:
        return {
            "lockspace": self.lockspace,
            "resource": self.resource,
            "path": self.path,
            "mode": self.mode,
            "owner": self.owner.ref(),
            "token": self.token,
            "state": WIRE_STATE[self.state],
            "acquired_at": self.acquired_at,
            "continuity": self.continuity,
        }


class LeaseTable:
    """Owners by uuid and pid, leases by owner and by resource.

    A resource's holders are a tuple, not a dict: almost every resource has one holder
    (a disk image held exclusively), and a 1-tuple is a fifth of a 1-entry dict's size,
    10,000 leases ~1.5 MB less; the few shared resources with many holders pay a copy per
    change."""

    def __init__(self) -> None:
        self.owners: dict[str, Owner] = {}
        self.by_pid: dict[int, Owner] = {}
        self.by_resource: dict[tuple[str, str], tuple[Lease, ...]] = {}
        self.count = 0

    def add_owner(self, owner: Owner) -> None:
        self.owners[owner.uuid] = owner
        self.by_pid[owner.pid] = owner

    def remove_owner(self, owner: Owner) -> None:
        self.owners.pop(owner.uuid, None)
        if self.by_pid.get(owner.pid) is owner:
            del self.by_pid[owner.pid]

    def add(self, lease: Lease) -> None:
        key = lease.key
        lease.owner.leases[key] = lease
        lease.owner.by_name[lease.resource] = lease
        holders = self.by_resource.get(key)
        self.by_resource[key] = (lease,) if holders is None else (*holders, lease)
        self.count += 1

    def remove(self, lease: Lease) -> None:
        key = lease.key
        owner = lease.owner
        if owner.leases.get(key) is lease:
            del owner.leases[key]
            self.count -= 1
        if owner.by_name.get(lease.resource) is lease:
            del owner.by_name[lease.resource]
        holders = self.by_resource.get(key)
        if holders is None:
            return
        if len(holders) == 1:  # the usual case: its only holder
            if holders[0] is lease:
                del self.by_resource[key]
        elif lease in holders:
            self.by_resource[key] = tuple(h for h in holders if h is not lease)

    def holders(self, lockspace: str, rkey: str) -> list[Lease]:
        return list(self.by_resource.get((lockspace, rkey), ()))

    def leases(self) -> list[Lease]:
        # by resource, not by owner: a dead owner is forgotten at once, but its leases stay
        # (and are listed) until their release is journaled and their locks dropped
        return [lease for holders in self.by_resource.values() for lease in holders]

    def lost(self) -> int:
        return sum(1 for lease in self.leases() if lease.state == State.LOST)


_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=4096)  # names are reused, smallest first: the same few recur
def fdname_of(index: int) -> str:
    """The index-th name in shortest-first order: 0..9A..z, then 00, 01, ..."""
    length, span = 1, len(_ALPHABET)
    while index >= span:
        index -= span
        length += 1
        span = len(_ALPHABET) ** length
    chars = []
    for _ in range(length):
        index, digit = divmod(index, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


_DIGIT = {c: i for i, c in enumerate(_ALPHABET)}
# _SHORTER[n]: how many names are shorter than n characters (a recovery maps every stored
# name back to its index: this is arithmetic per character, not a search)
_SHORTER: list[int] = [0, 0] + [
    sum(int(len(_ALPHABET) ** k) for k in range(1, n)) for n in range(2, 9)
]


def fdname_index(name: str) -> int | None:
    if not name or len(name) >= len(_SHORTER):
        return None
    value = 0
    for c in name:
        digit = _DIGIT.get(c)
        if digit is None:
            return None
        value = value * len(_ALPHABET) + digit
    return _SHORTER[len(name)] + value


class FdNames:
    """Short, reusable FDNAMEs for stored lease fds, within the environment's size limit.

    systemd hands stored fds back with all their names in one environment string,
    ``LISTEN_FDNAMES=a:b:...``, and Linux caps one environment string at 128 KiB
    (MAX_ARG_STRLEN): past it the restart fails to exec (203/EXEC) and, with
    ``Restart=always``, loops forever. So names are the shortest free ones (1-3
    characters, reused after release) and a lease that would push the names past the
    budget is refused with LimitExceeded: about 33,000 leases fit under systemd's fd store.
    """

    # 128 KiB, less "LISTEN_FDNAMES=", the sockets' names and a margin
    BUDGET = 128 * 1024 - 256

    def __init__(self, in_use: list[str]) -> None:
        self.used_bytes = sum(len(n) + 1 for n in in_use)
        taken = {i for i in map(fdname_index, in_use) if i is not None}
        self._next = max(taken, default=-1) + 1
        self._free = [i for i in range(self._next) if i not in taken]
        heapq.heapify(self._free)

    def fits(self) -> bool:
        """Whether one more name fits (the next name is at most 3 characters + ':')."""
        return self.used_bytes + 4 <= self.BUDGET

    def take(self) -> str:
        if self._free:
            index = heapq.heappop(self._free)
        else:
            index, self._next = self._next, self._next + 1
        name = fdname_of(index)
        self.used_bytes += len(name) + 1
        return name

    def give_back(self, name: str) -> None:
        self.used_bytes -= len(name) + 1
        index = fdname_index(name)
        if index is not None:
            heapq.heappush(self._free, index)
