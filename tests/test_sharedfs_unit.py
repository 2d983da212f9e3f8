"""lockd/service/sharedfs.py without a shared filesystem: reading mountinfo, and which mounts count.

The mountinfo lines below are in the kernel's format (proc(5)); the GlusterFS ones are copied
from this machine's /proc/self/mountinfo with the test bed's two mounts. What a real mount
does with them is in tests/test_sharedfs.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from lockd.service import sharedfs

GLUSTER = (
    "42 27 0:39 / /tmp/lkd-gl.x/mnt/a rw,relatime - fuse.glusterfs vm:lockdvol "
    "rw,user_id=0,group_id=0,default_permissions,allow_other,max_read=131072\n"
)
NFS_LOCAL = (
    "50 27 0:52 / /srv/vm\\040images rw,relatime shared:30 - nfs4 filer:/export "
    "rw,vers=4.2,local_lock=all,addr=10.0.0.2\n"
)
GFS2_LOCAL = "51 27 253:3 / /gfs rw,relatime - gfs2 /dev/mapper/vg-gfs rw,localflocks\n"


def test_parse_mountinfo_fields_and_escapes() -> None:
    [(dev, m)] = sharedfs.parse_mountinfo(NFS_LOCAL)
    assert dev == os.makedev(0, 52)
    assert (m.mountpoint, m.fstype, m.source) == ("/srv/vm images", "nfs4", "filer:/export")
    assert {"relatime", "vers=4.2", "local_lock=all"} <= m.options
    [(_, g)] = sharedfs.parse_mountinfo(GLUSTER)
    assert (g.fstype, g.source) == ("fuse.glusterfs", "vm:lockdvol")
    assert sharedfs.parse_mountinfo("garbage\n\n1 2 x:y / /m rw - ext4 /dev/x rw\n") == []


def test_mounts_whose_locks_stay_on_this_host() -> None:
    [(_, nfs)] = sharedfs.parse_mountinfo(NFS_LOCAL)
    [(_, gfs2)] = sharedfs.parse_mountinfo(GFS2_LOCAL)
    [(_, gluster)] = sharedfs.parse_mountinfo(GLUSTER)
    assert "local_lock=all" in str(sharedfs.local_locks(nfs))
    assert "localflocks" in str(sharedfs.local_locks(gfs2))
    assert sharedfs.local_locks(gluster) is None  # judged by its strict-locks, not options


def test_mount_of_finds_the_innermost_mount(tmp_path: Path) -> None:
    """A directory (made or not yet) on this machine's real mount table."""
    here = sharedfs.mount_of(str(tmp_path))
    assert here is not None and str(tmp_path).startswith(here.mountpoint)
    later = sharedfs.mount_of(str(tmp_path / "not" / "made"))
    assert later == here
    root = sharedfs.mount_of("/")
    assert root is not None and root.mountpoint == "/"
    # a lockspace on a local filesystem is not shared unless configured
    local = sharedfs.classify("x", str(tmp_path))
    forced = sharedfs.classify("x", str(tmp_path), forced_shared=True)
    if here.fstype not in sharedfs.SHARED_FSTYPES and not here.fstype.startswith("fuse."):
        assert not local.shared
    assert forced.shared and forced.unsafe is None
