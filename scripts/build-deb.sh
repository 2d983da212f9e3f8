#!/bin/sh
# make deb: build dist/lockd_<version>_<arch>.deb from this checkout (README, "Install on a
# host"), on Debian 12 as root. Installs its own build dependencies (debian/control), builds in
# a copy of the tracked files (build/deb/), and runs lintian on the result.
#   LOCKD_VERSION=V  build as version V instead of lockd.__version__ (tests/test_deb.py builds
#                    a higher one to test an upgrade)
#   OUT=DIR          where the .deb goes (default dist/)
set -eu
cd "$(dirname "$0")/.."
SRC=$(pwd)
OUT=${OUT:-$SRC/dist}
current=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' lockd/__init__.py)
VERSION=${LOCKD_VERSION:-$current}
# pip's wheel cache outside the build copy: a second build reuses the compiled dependencies
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$SRC/build/pip-cache}

need=""
for pkg in debhelper dpkg-dev fakeroot python3.11 python3.11-venv python3-pip python3.11-dev \
    libsystemd-dev pkg-config gcc lintian; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
# shellcheck disable=SC2086 # one word a package
sh scripts/apt-install.sh deb $need

# a clean copy of what git tracks (plus new files not yet committed), never the venv or caches
B=$(mktemp -d "${TMPDIR:-/tmp}/lockd-deb.XXXXXX")
trap 'rm -rf "$B"' EXIT
mkdir "$B/lockd-$VERSION"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c \
    '[ -e "$1" ] || [ -L "$1" ] && cp -P --parents "$1" "$2"' sh {} "$B/lockd-$VERSION"
cd "$B/lockd-$VERSION"
if [ "$VERSION" != "$current" ]; then
    sed -i "s/^__version__ = .*/__version__ = \"$VERSION\"/" lockd/__init__.py
    { printf 'lockd (%s) unstable; urgency=medium\n\n  * Built as %s by scripts/build-deb.sh.\n\n' \
          "$VERSION" "$VERSION"
      printf ' -- lockd maintainers <maintainers@users.noreply.r-seed-06b2ba84.example>  %s\n\n' "$(date -R)"
      cat debian/changelog; } > debian/changelog.new
    mv debian/changelog.new debian/changelog
fi
dpkg-buildpackage -b -us -uc -ui >"$B/build.log" 2>&1 || { tail -40 "$B/build.log" >&2; exit 1; }
mkdir -p "$OUT"
deb=$(ls "$B"/lockd_"$VERSION"_*.deb)
cp "$deb" "$OUT/"
echo "deb: $OUT/$(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"
if [ -z "${LOCKD_NO_LINTIAN:-}" ]; then
    lintian --fail-on error --info "$OUT/$(basename "$deb")"
fi
