#!/bin/sh
# Set up everything lockd needs on a fresh Debian 12 machine (as root): the Debian packages
# that systemd-python builds against, a virtual environment in .venv, and lockd in it.
# Idempotent and quick when nothing changed (a stamp file remembers pyproject.toml).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need=""
# systemd-python 235 ships as source only: gcc, pkg-config and libsystemd's headers build it.
for pkg in libsystemd-dev pkg-config gcc; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
# Debian's own python3 needs python3-dev for Python.h and python3-venv for ensurepip.
inc=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$inc/Python.h" ] || need="$need python3-dev"
$PY -c 'import ensurepip' >/dev/null 2>&1 || need="$need python3-venv"
# The tests drive a real systemd and make a non-root user: both come with the base system,
# but a minimal image may lack them.
command -v systemctl >/dev/null 2>&1 || need="$need systemd"
command -v unshare >/dev/null 2>&1 || need="$need util-linux"
# The libvirt end-to-end tests (tests/test_libvirt.py) run a real libvirtd, virtlockd and TCG
# QEMU; these four (Debian 12: libvirt 9.0.0, QEMU 7.2) ship no service units and start nothing.
for pkg in libvirt-daemon libvirt-clients qemu-system-x86 qemu-utils; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
# The shared-storage tests run a private GlusterFS volume mounted twice (tests/gluster_harness.py;
# ~6-12 s to install, 22 packages). A fresh install enables and starts no service, and the
# harness's glusterd is its own, on private directories.
for pkg in glusterfs-server glusterfs-client; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
command -v ss >/dev/null 2>&1 || need="$need iproute2"
# shellcheck disable=SC2086 # one word a package
sh scripts/apt-install.sh setup $need

if [ ! -x .venv/bin/python ]; then
    $PY -m venv .venv
fi
stamp=.venv/.lockd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # compat mode: a plain .pth path entry; the default import-hook finder costs ~40 ms of
    # every start of lockd and lockctl
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' \
        --config-settings editable_mode=compat
    touch "$stamp"
fi
