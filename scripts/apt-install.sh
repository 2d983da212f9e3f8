#!/bin/sh
# Install the Debian packages a script found missing (scripts/setup.sh, scripts/build-deb.sh).
#   apt-install.sh WHO [PACKAGE...]    nothing to do without packages; WHO prefixes messages
set -eu
who=$1
shift
[ $# -gt 0 ] || exit 0
if [ "$(id -u)" != 0 ]; then
    echo "$who: missing Debian packages: $* (run as root, or apt-get install them)" >&2
    exit 1
fi
echo "$who: installing $*"
apt-get update -qq
# another apt-get may hold dpkg's lock (a shared machine): wait for it instead of failing
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "$@" >/dev/null
