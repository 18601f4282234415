#!/usr/bin/env bash
# Stage everything the peer rows of a run of record need on a device machine without internet, into folders git
# ignores (the copies are carried, never committed):
#
#   bench/peers/stage_peers.sh COMFYUI_CHECKOUT
#
# build/comfyui and build/comfy-wheels: ComfyUI's FLUX code and comfy-kitchen (bench/peers/stage_comfyui.sh).
# .whl: diffusers at the version the tests use here (or $DIFFUSERS_VERSION) and the one requirement of it the
# device image lacks (importlib-metadata), for CPython 3.12 x86_64. Then run bench/peers_on_device.sh there with
# `.whl` and `build` carried.
set -euo pipefail

if [ $# -ne 1 ]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
here=$(cd "$(dirname "$0")/../.." && pwd)
bash "$here/bench/peers/stage_comfyui.sh" "$1" "$here/build/comfyui" "$here/build/comfy-wheels"

version=${DIFFUSERS_VERSION:-$(python3 -c "import importlib.metadata as m; print(m.version('diffusers'))" 2>/dev/null || true)}
if [ -z "$version" ]; then
    echo "error: diffusers is not installed here; set DIFFUSERS_VERSION (the tests' reference, e.g. 0.42.1)" >&2
    exit 1
fi
mkdir -p "$here/.whl"
rm -f "$here"/.whl/diffusers-*.whl "$here"/.whl/importlib_metadata-*.whl
for wheel in "diffusers==$version" importlib-metadata; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$here/.whl" "$wheel"
done
echo "staged for the peer rows: $(du -sh "$here/build" | cut -f1) in build/, $(du -sh "$here/.whl" | cut -f1) in .whl/"
ls "$here"/.whl "$here"/build/comfy-wheels
