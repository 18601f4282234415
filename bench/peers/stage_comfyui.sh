#!/usr/bin/env bash
# Stage what bench/peers/comfyui_native.py needs of a ComfyUI checkout, for a machine without ComfyUI or internet.
#
#   bench/peers/stage_comfyui.sh COMFYUI_CHECKOUT DEST WHEELDIR
#
# DEST gets the part of ComfyUI's comfy/ package the FLUX model imports (comfy/*.py, comfy/ldm/*.py,
# comfy/ldm/flux/, comfy/ldm/modules/; .py files only, about 1 MB), comfyui_version.py and LICENSE (GPL-3.0:
# the copy is carried, never committed; stage into an ignored folder such as build/). No top-level ComfyUI
# module (nodes.py, folder_paths.py, ...) is imported. The fp8-scaled twin needs nothing more: it loads the
# file through comfy/utils.py (the scaled-fp8 conversion and detection), comfy/ops.py (the mixed-precision
# operations) and comfy/quant_ops.py; comfy/sd.py's own loader, which imports ComfyUI's whole model registry
# and transformers, is not staged (the self-check compares the two where ComfyUI's venv has it).
# WHEELDIR gets the one wheel the target lacks: comfy-kitchen (ComfyUI's RoPE kernel for FLUX; its quantized
# tensors, fp8 casts and GEMM dispatch for the fp8-scaled rows), at the version installed in the checkout's
# .venv (or $COMFY_KITCHEN_VERSION), for CPython 3.12 x86_64. Its AMD (HIP) extension, 154 MB unpacked and
# loaded only under a ROCm PyTorch, is removed from the wheel to keep the copy small. The other packages
# comfy's FLUX path imports (torch, einops, numpy, pillow, psutil, safetensors) are in the device image.
# Install there with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site WHEELDIR/*.whl
set -euo pipefail

if [ $# -ne 3 ]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
src=$(cd "$1" && pwd)
dest=$2
wheels=$3
if [ ! -f "$src/comfy/ldm/flux/model.py" ]; then
    echo "error: $src is not a ComfyUI checkout (no comfy/ldm/flux/model.py)" >&2
    exit 1
fi

mkdir -p "$dest" "$wheels"
rm -rf "$dest/comfy"
# The .py files of comfy/ itself and of the parts of comfy/ldm the FLUX model imports (about 1 MB).
(cd "$src" && find comfy -maxdepth 1 -name '*.py' -print0 && find comfy/ldm -maxdepth 1 -name '*.py' -print0 \
    && find comfy/ldm/flux comfy/ldm/modules -name '*.py' -not -path '*/__pycache__/*' -print0) \
    | (cd "$src" && tar --null -cf - -T -) | tar -xf - -C "$dest"
for f in comfyui_version.py LICENSE; do
    if [ -f "$src/$f" ]; then cp "$src/$f" "$dest/"; fi
done

version=${COMFY_KITCHEN_VERSION:-}
if [ -z "$version" ]; then
    info=$(ls -d "$src"/.venv/lib/python3*/site-packages/comfy_kitchen-*.dist-info 2>/dev/null | head -n 1 || true)
    if [ -z "$info" ]; then
        echo "error: no comfy_kitchen in $src/.venv; set COMFY_KITCHEN_VERSION" >&2
        exit 1
    fi
    version=$(basename "$info" .dist-info)
    version=${version#comfy_kitchen-}
fi

rm -f "$wheels"/comfy_kitchen-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$wheels" "comfy-kitchen==$version"

# Drop the HIP extension from the wheel (and from its RECORD, so pip installs it as a consistent wheel).
python3 - "$wheels"/comfy_kitchen-"$version"-*.whl <<'EOF'
import os, sys, zipfile

for path in sys.argv[1:]:
    drop = lambda name: name.startswith("comfy_kitchen/backends/hip/_C.")
    with zipfile.ZipFile(path) as old:
        items = [(info, old.read(info)) for info in old.infolist() if not drop(info.filename)]
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as new:
        for info, data in items:
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop(line.split(",", 1)[0])).encode()
            new.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
EOF

echo "staged ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dest/comfyui_version.py" 2>/dev/null) in $dest ($(du -sh "$dest" | cut -f1)), wheels in $wheels:"
ls -l "$wheels"/comfy_kitchen-*.whl
