#!/bin/sh
# The optional compiled build (setup.py, LOCKD_MYPYC=1) as a tree to run from, outside the
# source tree: the editable install keeps running the .py files you edit.
#
#   scripts/build-mypyc.sh [SRC [DEST]]    SRC: a lockd tree (default: this one);
#                                          DEST: default build/mypyc
#
# DEST then holds lockd/ with its hot modules compiled to extensions; run the daemon with DEST
# as its working directory or first on PYTHONPATH (make test-mypyc, bench --mypyc).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
src=$(cd "${1:-$here}" && pwd)
dest=${2:-$here/build/mypyc}
python=${PYTHON:-$here/.venv/bin/python}
rm -rf "$dest"
mkdir -p "$dest"
# lockd/schema is a symlink to ../schema: copied as a link, it finds DEST/schema
cp -R "$src/lockd" "$src/schema" "$src/setup.py" "$src/pyproject.toml" "$src/README.md" "$dest/"
find "$dest/lockd" -name __pycache__ -prune -exec rm -rf {} +
cd "$dest"
LOCKD_MYPYC=1 "$python" setup.py -q build_ext --inplace >build.log 2>&1 || {
    tail -20 build.log >&2
    exit 1
}
rm -rf build
echo "$dest"
