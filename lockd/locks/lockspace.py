"""Lockspaces: from a (lockspace, resource) request to a file, a resource key and a lock.

Theory of operation (DESIGN §2):

- The **direct** lockspace (name ``""`` or ``"direct"``) locks the resource itself: an
  absolute, normalized path to an existing regular file or block device. lockd never creates
  it. Its key is ``"dev:ino"``, so two paths to one inode (a hard link, a symlink) are one
  resource, as they are for the kernel.
- An **indirect** lockspace is a configured directory (possibly on shared storage: NFSv4,
  GFS2, CephFS, whose own lock manager then keeps hosts apart). The resource is any string;
  its lease file is ``DIR/sha256(resource)``, created 0600 if missing, so a client can make
  the daemon create files only there and only with names it cannot choose.
- A **named** lockspace is a directory whose lease files the client names itself: the
  resource *is* the lease file's name (one path component), and its key is that name. It
  exists for clients that hash their resources themselves, as libvirt's lockd driver does
  (``file_lockspace_dir``: the lease file of a disk is ``DIR/sha256(disk path)``, so a
  configured indirect lockspace on the same directory names the same files). Such lockspaces
  are created at run time (virtlockd's ``CREATE_LOCKSPACE``), named by their directory, and
  journaled by the service, so they outlive a restart of the daemon; :meth:`Lockspaces.lock`
  creates a missing lease file 0600 as for an indirect one (whether a missing one may be
  created is the caller's decision, made before).

Paths are refused rather than repaired: a relative path, a NUL byte, ``..`` or ``//`` (anything
``os.path.normpath`` would change) is an :class:`InvalidResource`, because "fixing" ``..``
across a symlink silently changes which file is meant.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from lockd.errors import InvalidResource
from lockd.locks import ofd
from lockd.locks.ofd import Locked

DIRECT = ""
# what names the direct lockspace in a request (absent, empty, or its name)
DIRECT_NAMES = (None, "", "direct")
MAX_PATH = 4096  # PATH_MAX
MAX_NAME = 255  # NAME_MAX


def _invalid(resource: str, reason: str) -> InvalidResource:
    return InvalidResource(f"{resource!r}: {reason}", resource=resource[:256], reason=reason)


_NOT_NORMAL = frozenset(("", ".", ".."))


# Valid paths are remembered (an invalid one raises, and lru_cache keeps only returns): a
# client names the same few images again and again, and the check walks every component.
@functools.lru_cache(maxsize=1024)
def check_path(path: str) -> None:
    if not path:
        raise _invalid(path, "empty resource")
    if "\0" in path:
        raise _invalid(path, "contains a NUL byte")
    if len(path.encode("utf-8", "surrogateescape")) >= MAX_PATH:
        raise _invalid(path, f"longer than {MAX_PATH - 1} bytes")
    if not path.startswith("/"):
        raise _invalid(path, "not an absolute path")
    if path == "/":
        return
    # normalized (what os.path.normpath would leave unchanged, and no leading "//", which
    # POSIX leaves implementation-defined): no empty, "." or ".." component after the root
    for part in path[1:].split("/"):
        if part in _NOT_NORMAL:
            raise _invalid(path, "not a normalized path (no '.', '..', '//' or trailing '/')")
        # a UTF-8 character is at most 4 bytes: only a long part needs encoding to measure
        if len(part) * 4 > MAX_NAME and len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise _invalid(path, f"a path component is longer than {MAX_NAME} bytes")


def direct_key(dev: int, ino: int) -> str:
    return f"{dev}:{ino}"


def check_name(name: str) -> None:
    """A lease file's name in a named lockspace: one path component, not '.' or '..'."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise _invalid(name, "a lease file name is one path component, without '/' or NUL")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise _invalid(name, f"a lease file name is at most {MAX_NAME} bytes")


class Lockspaces:
    def __init__(self, indirect: dict[str, Path], named: dict[str, Path] | None = None) -> None:
        self.indirect = dict(indirect)
        # name -> directory of the named lockspaces (lease file = DIR/resource)
        self.named: dict[str, Path] = dict(named or {})

    def add_named(self, name: str, directory: Path) -> None:
        self.named[name] = directory

    def remove_named(self, name: str) -> None:
        self.named.pop(name, None)

    def resolve(self, lockspace: str | None, resource: str) -> str:
        """:meth:`canonical` and :meth:`check` of a request in one call (every request
        makes both; the direct lockspace, the usual one, without another call)."""
        if lockspace in DIRECT_NAMES:
            check_path(resource)
            return DIRECT
        ls = self.canonical(lockspace)
        self.check(ls, resource)
        return ls

    def canonical(self, lockspace: str | None) -> str:
        if lockspace in DIRECT_NAMES:
            return DIRECT
        assert lockspace is not None
        if lockspace not in self.indirect and lockspace not in self.named:
            raise InvalidResource(
                f"unknown lockspace {lockspace!r}",
                resource=lockspace[:256],
                reason="unknown lockspace",
            )
        return lockspace

    def check(self, lockspace: str, resource: str) -> None:
        if lockspace == DIRECT:
            check_path(resource)
        elif lockspace in self.named:
            check_name(resource)
        elif not resource or "\0" in resource or len(resource) > MAX_PATH:
            raise _invalid(resource, "a resource name is 1 to 4096 characters, without NUL")

    def key(self, lockspace: str, resource: str) -> str | None:
        """The resource key without locking; None if a direct path cannot be stat'ed."""
        return self.identify(lockspace, resource)[0]

    def identify(self, lockspace: str, resource: str) -> tuple[str | None, os.stat_result | None]:
        """The key, and for a direct resource the stat it came from (for :meth:`lock`)."""
        if lockspace in self.named:
            return resource, None
        if lockspace != DIRECT:
            import hashlib  # indirect lockspaces only (not configured on most hosts)

            return hashlib.sha256(resource.encode("utf-8", "surrogateescape")).hexdigest(), None
        try:
            st = os.stat(resource)
        except OSError:
            return None, None
        return direct_key(st.st_dev, st.st_ino), st

    def lease_path(self, lockspace: str, resource: str, rkey: str) -> str:
        if lockspace == DIRECT:
            return resource
        if lockspace in self.named:
            return str(self.named[lockspace] / resource)
        return str(self.indirect[lockspace] / rkey)

    def lock(
        self,
        lockspace: str,
        resource: str,
        rkey: str,
        exclusive: bool,
        path: str | None = None,
        check: Callable[[os.stat_result], None] | None = None,
        seen: os.stat_result | None = None,
    ) -> Locked:
        """Lock the resource's file (``path``, default: where the resource leads now). For
        direct resources the file must still be the inode the key names (the path may now
        lead elsewhere: then it is another resource), checked before the lock is taken.
        ``seen``: the stat :meth:`identify` just made of that path, which spares a second."""
        path = path or self.lease_path(lockspace, resource, rkey)
        if lockspace != DIRECT:
            return ofd.lock_lease_file(path, exclusive, resource)
        if seen is not None:  # the stat the key was made from
            inode = (seen.st_dev, seen.st_ino)
        else:
            dev, _, ino = rkey.partition(":")
            inode = (int(dev), int(ino))
        try:
            return ofd.lock_existing(path, exclusive, inode, check, seen)
        except InvalidResource as exc:
            raise _invalid(resource, str(exc.parameters.get("reason", exc))) from None
