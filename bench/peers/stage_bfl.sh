#!/usr/bin/env bash
# Stage what bench/peers/bfl_native.py needs of Black Forest Labs' reference code, for a machine without internet.
#
#   bench/peers/stage_bfl.sh SOURCE DEST
#
# SOURCE: a checkout of github.com/black-forest-labs/flux (a directory with src/flux/model.py), or a git
# directory of it (a bare clone or mirror: its HEAD is read). DEST gets the five modules the transformer
# imports (flux/__init__.py, math.py, model.py, modules/layers.py, modules/lora.py, about 30 KB) and the
# repository's LICENSE (Apache-2.0). Carry the copy, never commit it: stage into an ignored folder such as
# build/. Its one import beyond torch, einops, is in the device image.
set -euo pipefail

if [ $# -ne 2 ]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
src=$1
dest=$2
files=(src/flux/__init__.py src/flux/math.py src/flux/model.py src/flux/modules/layers.py src/flux/modules/lora.py LICENSE)

read_file() {  # $1: path inside the repository, printed to stdout
    if [ -f "$src/src/flux/model.py" ]; then
        cat "$src/$1"
    else
        git --git-dir="$src" show "HEAD:$1"
    fi
}

if [ ! -f "$src/src/flux/model.py" ] && ! git --git-dir="$src" cat-file -e HEAD:src/flux/model.py 2>/dev/null; then
    echo "error: $src is neither a checkout nor a git directory of black-forest-labs/flux (no src/flux/model.py)" >&2
    exit 1
fi
rm -rf "$dest/flux"
mkdir -p "$dest/flux/modules"
for f in "${files[@]}"; do
    out="$dest/${f#src/}"
    read_file "$f" > "$out.tmp"
    mv "$out.tmp" "$out"
done
echo "staged BFL's flux transformer modules in $dest"
