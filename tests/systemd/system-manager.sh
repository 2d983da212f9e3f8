#!/bin/bash
# A real *system* manager for lockd's tests: /lib/systemd/systemd as PID 1 of private PID/mount/
# UTS/IPC/net/cgroup namespaces, booting a throw-away root made of the host's /usr (read-only)
# + a copy of /etc whose /etc/systemd/system holds ONLY our units + tmpfs elsewhere. The units
# run exactly as deployed: %t = /run, StateDirectory= = /var/lib. Adapted from the
# real-systemd recipe.
#
#   system-manager.sh start WORKDIR UNITDIR [TARGET]   boot it, wait until the target is reached
#   system-manager.sh exec  WORKDIR CMD...             run CMD inside all its namespaces
#   system-manager.sh stop  WORKDIR                    poweroff (SIGRTMIN+4), kill leftovers
# Env: BIN_DIR=DIR        bound (read-only) over /usr/local/bin (ExecStart=/usr/local/bin/lockd)
#      RO_BINDS="DIR ..."  host directories bound read-only at the same path (the project, its
#                         virtual environment, the Python it was made from)
#      BIND="DIR ..."      host directories bound read-write at the same path (test files)
#      OVERLAY=1          a host whose package manager works (tests/test_deb.py): /usr and /var
#                         are overlays of the host's (upper layers in WORKDIR/overlay, so dpkg
#                         and apt write only there), not a read-only /usr and an empty /var;
#                         the host's /etc/lockd, /var/lib/lockd and policy-rc.d are hidden
#
# Host safety, on top of the namespaces:
#  * The container's cgroup tree is a sub-cgroup of our own (cgroup namespace); `stop` kills
#    only the processes in it.
#  * /proc/sys is read-only (as nspawn does): PID 1 and systemd-sysctl would otherwise write
#    global, non-namespaced sysctls (PID 1 sets kernel.core_pattern, for one).
#  * Units that touch the shared kernel or the host's files are masked, among them
#    systemd-tmpfiles-setup: Debian's tmp.conf has `D /tmp`, which empties /tmp at boot, and
#    /tmp may hold a BIND directory of the host.
#  * DefaultLimitCORE=0: PID 1 raises RLIMIT_CORE to infinity, tests abort lockd on purpose.
set -euo pipefail
SYSTEMD=${SYSTEMD:-/lib/systemd/systemd}
SELF=$(realpath "$0")
cmd=${1:?usage: $0 start|exec|stop WORKDIR [UNITDIR [TARGET]]}
W=$(realpath -m "${2:?WORKDIR}")

alive() {
    local st
    st=$(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then
    CG2=/sys/fs/cgroup
else
    CG2=/sys/fs/cgroup/unified
fi

MASK="systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
      systemd-firstboot.service systemd-modules-load.service systemd-random-seed.service
      systemd-udevd.service systemd-udev-trigger.service systemd-hwdb-update.service
      systemd-udevd-control.socket systemd-udevd-kernel.socket
      systemd-pstore.service systemd-timesyncd.service sys-kernel-debug.mount
      sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount
      dev-hugepages.mount kmod-static-nodes.service ldconfig.service
      systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service
      systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer
      systemd-journald-audit.socket systemd-repart.service systemd-machine-id-commit.service"

case $cmd in
start)
    UNITS=$(realpath "${3:?UNITDIR}"); TARGET=${4:-lockd-test.target}
    mkdir -p "$W"
    CG="lockd-pid1-$(basename "$W")-$$"
    echo "$CG" > "$W/cgroup"
    # $CG/payload becomes the container's cgroup root; the waiting `unshare` parent is moved up
    # to $CG afterwards so the container's root cgroup holds only its own processes.
    mkdir -p "$CG2/$CG/payload"
    export W CG UNITS TARGET SYSTEMD CG2 MASK OVERLAY="${OVERLAY:-}" BIN_DIR="${BIN_DIR:-}" RO_BINDS="${RO_BINDS:-}" BIND="${BIND:-}"
    setsid /bin/sh -ec '
        echo $$ > "$CG2/$CG/payload/cgroup.procs"
        exec unshare --pid --fork --mount --uts --ipc --net --cgroup --propagation private -- \
            /bin/bash "$0" _boot "$W"
    ' "$SELF" > "$W/pid1.out" 2>&1 < /dev/null &
    U=$!     # setsid sh exec()s unshare: same PID; its child is PID 1 inside
    P=
    for _ in $(seq 1 200); do
        alive "$U" || break
        P=$(pgrep -P "$U" | head -1 || true)
        [ -n "$P" ] && [ "$(cat "/proc/$P/comm" 2>/dev/null)" = systemd ] && break
        sleep 0.05
    done
    if [ -z "$P" ] || [ "$(cat "/proc/$P/comm" 2>/dev/null)" != systemd ]; then
        echo "container PID 1 did not start:" >&2; cat "$W/pid1.out" >&2
        "$SELF" stop "$W"; exit 1
    fi
    echo "$P" > "$W/pid1.pid"
    echo "$U" > "$CG2/$CG/cgroup.procs"
    S=
    for _ in $(seq 1 300); do   # wait for boot to finish (15 s)
        S=$(nsenter -t "$P" -a systemctl show -p SystemState --value 2>/dev/null || true)
        case $S in running|degraded) break;; esac
        sleep 0.05
    done
    case $S in
        running|degraded) ;;
        *) echo "container did not boot (state '$S')" >&2; cat "$W/pid1.out" >&2; exit 1;;
    esac
    echo "container PID 1 = host pid $P, state $S"
    ;;
_boot)  # inside the new namespaces, as PID 1: build the root, then exec systemd
    R=$W/root; mkdir -p "$R"
    mount -t tmpfs -o mode=755,size=256m lockd-pid1-root "$R"
    mkdir -p "$R"/{usr,proc,sys,dev,run,tmp,var,root,oldroot}
    chmod 1777 "$R/tmp"
    for l in bin lib lib64 sbin; do [ -e "/$l" ] && ln -s "usr/$l" "$R/$l"; done
    if [ -n "$OVERLAY" ]; then
        for d in usr var; do
            mkdir -p "$W/overlay/$d" "$W/overlay/$d.work"
            mount -t overlay "lockd-pid1-$d" \
                -o "lowerdir=/$d,upperdir=$W/overlay/$d,workdir=$W/overlay/$d.work" "$R/$d"
        done
        rm -rf "$R/var/lib/lockd"   # a whiteout in the upper layer; the host's stays
        # a container image's "start no service" policy (exit 101) is not a host's
        rm -f "$R/usr/sbin/policy-rc.d"
        # man-db's index, rebuilt after every dpkg run that ships a manual, is half of the
        # time of installing lockd here (6 of 13 s) and not what the tests are about
        rm -f "$R/var/lib/man-db/auto-update"
    else
        mount --bind /usr "$R/usr"; mount -o remount,bind,ro "$R/usr"
    fi
    if [ -n "$BIN_DIR" ]; then
        mount --bind "$BIN_DIR" "$R/usr/local/bin"; mount -o remount,bind,ro "$R/usr/local/bin"
    fi
    for d in $RO_BINDS; do
        mkdir -p "$R/$d"; mount --bind "$d" "$R/$d"; mount -o remount,bind,ro "$R/$d"
    done
    for d in $BIND; do
        mkdir -p "$R/$d"; mount --bind "$d" "$R/$d"
    done
    cp -a /etc "$R/etc"
    rm -rf "$R/etc/systemd/system" "$R/etc/systemd/user" "$R/etc/machine-id" "$R/etc/lockd"
    mkdir -p "$R/etc/systemd/system" "$R/etc/systemd/system.conf.d"
    cp -a "$UNITS"/. "$R/etc/systemd/system/"
    ln -s "$TARGET" "$R/etc/systemd/system/default.target"
    printf '[Manager]\nDefaultLimitCORE=0\n' > "$R/etc/systemd/system.conf.d/50-lockd-test.conf"
    # a journald too (stock units), so that status/journalctl show logs
    mkdir -p "$R/etc/systemd/system/$TARGET.d"
    printf '[Unit]\nWants=systemd-journald.socket systemd-journald.service\n' \
        > "$R/etc/systemd/system/$TARGET.d/journal.conf"
    echo lockd-test > "$R/etc/hostname"
    for u in $MASK; do ln -sf /dev/null "$R/etc/systemd/system/$u"; done
    # /dev: minimal, like nspawn
    mount -t tmpfs -o mode=755,size=4m lockd-pid1-dev "$R/dev"
    for d in null zero full random urandom tty; do
        touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"
    done
    mkdir "$R/dev/pts" "$R/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
    ln -s pts/ptmx "$R/dev/ptmx"
    mount -t tmpfs -o mode=1777 shm "$R/dev/shm"
    mount -t proc proc "$R/proc"
    for f in sys sysrq-trigger; do
        [ -e "$R/proc/$f" ] || continue
        mount --bind "$R/proc/$f" "$R/proc/$f"; mount -o remount,bind,ro "$R/proc/$f"
    done
    # read-only sysfs of our netns + cgroup2 rooted at our cgroup namespace (= $CG/payload)
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
    cd "$R"; pivot_root . oldroot; umount -l /oldroot; rmdir /oldroot
    exec setpriv --bounding-set -sys_module,-sys_time,-audit_control,-audit_read,-sys_rawio,-mac_admin,-mac_override,-syslog,-wake_alarm,-sys_boot \
        env -i container=lockd-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        "$SYSTEMD" --unit="$TARGET" systemd.unified_cgroup_hierarchy=1
    ;;
exec)
    shift 2
    exec nsenter -t "$(cat "$W/pid1.pid")" -a -- "$@"
    ;;
stop)
    P=$(cat "$W/pid1.pid" 2>/dev/null || true)
    CG=$(cat "$W/cgroup" 2>/dev/null || true)
    if [ -n "$P" ] && alive "$P"; then
        kill -s RTMIN+4 "$P"            # = systemctl poweroff (SIGTERM would mean re-exec for PID 1)
        for _ in $(seq 1 200); do alive "$P" || break; sleep 0.025; done
    fi
    if [ -n "$CG" ] && [ -d "$CG2/$CG" ]; then
        for p in $(find "$CG2/$CG" -name cgroup.procs -exec cat {} + 2>/dev/null); do
            kill -KILL "$p" 2>/dev/null || true
        done
        for _ in $(seq 1 40); do
            [ -z "$(find "$CG2/$CG" -name cgroup.procs -exec cat {} + 2>/dev/null)" ] && break
            sleep 0.025
        done
        find "$CG2/$CG" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    fi
    rmdir "$W/root" 2>/dev/null || true   # its tmpfs lived in the (now dead) mount namespace
    ;;
*) echo "unknown command $cmd" >&2; exit 2;;
esac
