#!/bin/bash
# A real, private `systemd --user` manager in a private mount namespace, for lockd's tests.
# Adapted from the real-systemd recipe; PID 1 of the host need not be systemd.
#
#   user-manager.sh start WORKDIR UNITDIR [TARGET]   start it, load UNITDIR/*, wait until up
#   user-manager.sh exec  WORKDIR CMD...             run CMD inside the manager's mount namespace
#   user-manager.sh stop  WORKDIR                    orderly exit, kill leftovers, remove cgroups
# Env: BIN_DIR=DIR   bound over /usr/local/bin in the namespace (the units' ExecStart= is
#                    /usr/local/bin/lockd, as deployed; the host's /usr/local/bin is untouched)
#      PYTHON=EXE    an interpreter to make the socket node with (default python3)
#      JOURNAL=1     (default) run a private systemd-journald too (files in WORKDIR/journal)
#      SYSTEMD_LOG_LEVEL=info|debug
#
# Host safety: everything lives in a private mount namespace (tmpfs over /run/systemd and
# /run/log, binds over /dev/console and /usr/local/bin) and a sub-cgroup of its own; `stop`
# kills only the processes in that cgroup. Why each step is needed (systemd 252, root):
#  * `systemd --user` refuses to run unless sd_booted(), i.e. /run/systemd/system/ exists: we
#    fake it only inside the namespace, so host tools keep believing there is no systemd.
#  * PID 1 creates /run/systemd/inaccessible/{reg,dir,chr,blk,fifo,sock} at boot; sandboxing
#    options (ProtectKernelLogs=, InaccessiblePaths=) bind them over what they hide, and fail
#    with 226/NAMESPACE without them. Our private /run/systemd needs its own.
#  * The manager logs to /dev/console when not on a tty: a file is bound over it.
#  * It puts its services into sub-cgroups of its own cgroup: it gets a fresh one (unified +
#    name=systemd on a hybrid host, or the cgroup2 root's child on a pure cgroup2 host).
#  * Core dumps are off (ulimit -c 0): tests abort lockd on purpose, and the host's
#    core_pattern may be a plain file name in the service's working directory.
#  * Everything else is found through XDG_RUNTIME_DIR (notify socket, private bus socket, %t)
#    and XDG_CONFIG_HOME (unit dir; StateDirectory= maps there under the 252 user manager).
set -euo pipefail
SYSTEMD=${SYSTEMD:-/lib/systemd/systemd}
cmd=${1:?usage: $0 start|exec|stop WORKDIR [UNITDIR [TARGET]]}
W=$(realpath -m "${2:?WORKDIR}")

alive() {  # running and not a zombie (detached processes are reaped late by the host's init)
    local st
    st=$(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then
    CGDIRS="/sys/fs/cgroup"
else
    CGDIRS="/sys/fs/cgroup/unified /sys/fs/cgroup/systemd"
fi
CG2=${CGDIRS%% *}      # the cgroup2 mount

cg_rm() {  # remove a cgroup subtree depth-first (its processes must be gone)
    local h
    for h in $CGDIRS; do
        [ -d "$h/$1" ] || continue
        find "$h/$1" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
}

case $cmd in
start)
    UNITS=$(realpath "${3:?UNITDIR}"); TARGET=${4:-lockd-test.target}
    mkdir -p "$W/xdg" "$W/config/systemd/user"
    chmod 700 "$W/xdg"
    cp -a "$UNITS"/. "$W/config/systemd/user/"
    CG="lockd-sdu-$(basename "$W")-$$"
    echo "$CG" > "$W/cgroup"
    for h in $CGDIRS; do mkdir -p "$h/$CG"; done
    : > "$W/console.log"
    JOURNAL=${JOURNAL:-1}
    BIN_DIR=${BIN_DIR:-}
    PYTHON=${PYTHON:-python3}
    # hermetic unit search path: our units + the stock user units (basic.target, ...), but NOT
    # /etc/systemd/user (whose sockets.target.wants would start gpg-agent/dirmngr sockets).
    UNIT_PATH=${UNIT_PATH:-$W/config/systemd/user:/usr/lib/systemd/user}
    export W CG SYSTEMD TARGET JOURNAL UNIT_PATH CGDIRS BIN_DIR PYTHON
    # unshare without --fork exec()s, so $! is the manager's PID.
    setsid unshare --mount --propagation private -- /bin/sh -ec '
        # size: daemon-reload/reexec refuse to run with < 16M free on /run/systemd
        mount -t tmpfs -o mode=755,size=64m lockd-sdu /run/systemd
        mkdir /run/systemd/system
        mkdir -m 0755 /run/systemd/inaccessible
        cd /run/systemd/inaccessible
        touch reg; mkdir dir; mknod chr c 0 0; mknod blk b 0 0; mkfifo fifo
        "$PYTHON" -c "import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")"
        chmod 0000 reg dir chr blk fifo sock
        cd /
        mount --bind "$W/console.log" /dev/console
        if [ -n "$BIN_DIR" ]; then mount --bind "$BIN_DIR" /usr/local/bin; fi
        if [ "$JOURNAL" = 1 ]; then
            # private systemd-journald, files in $W/journal (journalctl -D $W/journal). CAP_AUDIT_*
            # dropped: journald 252 would otherwise switch kernel auditing on (no Audit= before
            # 253). SYSTEMD_LOG_TARGET=console: its own messages go to journald.out, not kmsg.
            mkdir -p "$W/journal"
            mount -t tmpfs -o mode=755,size=8m lockd-sdu-log /run/log
            mkdir /run/log/journal
            mount --bind "$W/journal" /run/log/journal
            [ -d /var/log/journal ] && mount --bind "$W/journal" /var/log/journal
            SYSTEMD_LOG_TARGET=console setpriv --bounding-set -audit_control,-audit_read,-audit_write \
                /lib/systemd/systemd-journald > "$W/journald.out" 2>&1 < /dev/null &
            echo $! > "$W/journald.pid"
            i=0; while [ ! -S /run/systemd/journal/stdout ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
            LOGT=journal
        else
            LOGT=console
        fi
        for h in $CGDIRS; do echo $$ > "$h/$CG/cgroup.procs"; done
        ulimit -c 0
        exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME="$W" USER=root LOGNAME=root \
            XDG_RUNTIME_DIR="$W/xdg" XDG_CONFIG_HOME="$W/config" \
            XDG_DATA_HOME="$W/data" XDG_STATE_HOME="$W/state" XDG_CACHE_HOME="$W/cache" \
            SYSTEMD_UNIT_PATH="$UNIT_PATH" \
            SYSTEMD_LOG_TARGET=$LOGT SYSTEMD_LOG_LEVEL="${SYSTEMD_LOG_LEVEL:-info}" \
            "$SYSTEMD" --user --unit="$TARGET"
    ' > "$W/manager.out" 2>&1 < /dev/null &
    echo $! > "$W/manager.pid"
    export XDG_RUNTIME_DIR="$W/xdg"
    for _ in $(seq 1 200); do                       # up to 10 s
        [ -S "$W/xdg/systemd/private" ] && break
        alive "$(cat "$W/manager.pid")" || { cat "$W/manager.out" "$W/console.log" >&2; exit 1; }
        sleep 0.05
    done
    # (`systemctl is-system-running` says "offline" outside the namespace: it checks sd_booted())
    S=
    for _ in $(seq 1 200); do
        S=$(systemctl --user show -p SystemState --value 2>/dev/null || true)
        case $S in running|degraded) break;; esac
        sleep 0.05
    done
    case $S in
        running|degraded) ;;
        *) echo "user manager did not come up (state '$S')" >&2
           cat "$W/manager.out" "$W/console.log" >&2; exit 1;;
    esac
    echo "manager pid $(cat "$W/manager.pid"), cgroup $CG, state $S"
    ;;
exec)   # run a command inside the manager's mount namespace (its /run/systemd, /usr/local/bin)
    shift 2
    exec env XDG_RUNTIME_DIR="$W/xdg" nsenter -t "$(cat "$W/manager.pid")" -m -- "$@"
    ;;
stop)
    export XDG_RUNTIME_DIR="$W/xdg"
    PID=$(cat "$W/manager.pid" 2>/dev/null || true)
    CG=$(cat "$W/cgroup" 2>/dev/null || true)
    if [ -n "$PID" ] && alive "$PID"; then
        kill -TERM "$PID"                       # user manager: SIGTERM = start exit.target
        for _ in $(seq 1 400); do alive "$PID" || break; sleep 0.025; done
        alive "$PID" && kill -KILL "$PID"
    fi
    JPID=$(cat "$W/journald.pid" 2>/dev/null || true)
    if [ -n "$JPID" ] && alive "$JPID"; then   # let journald close its files cleanly
        kill -TERM "$JPID"
        for _ in $(seq 1 80); do alive "$JPID" || break; sleep 0.025; done
    fi
    if [ -n "$CG" ]; then                       # anything left in our cgroup (only ours): by PID
        for p in $(find "$CG2/$CG" -name cgroup.procs -exec cat {} + 2>/dev/null); do
            kill -KILL "$p" 2>/dev/null || true
        done
        for _ in $(seq 1 40); do
            [ -z "$(find "$CG2/$CG" -name cgroup.procs -exec cat {} + 2>/dev/null)" ] && break
            sleep 0.025
        done
        cg_rm "$CG"
    fi
    # the mount namespace died with its last process
    ;;
*) echo "unknown command $cmd" >&2; exit 2;;
esac
