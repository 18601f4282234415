#!/usr/bin/env bash
# The second device call of #20's run of record (the first: bench/record_on_device.sh): our bf16 and fast steps
# side by side with the peers the issue names, in one process, as "rows measured in one run" asks: diffusers eager
# and compiled, ComfyUI 0.8 native in bf16 (comfy-kitchen RoPE, cuDNN attention), and ComfyUI loading the
# fp8-scaled Kontext file as its template does, with and without its --fast (bench/bench_step.py explains each),
# then our plain fp8 and int8 steps, which the issue sets against that file (last: a row cut off by the timeout
# costs the least there).
# The check step compares every row's velocity with ours first. Stage here first with
# bench/peers/stage_peers.sh ~/ComfyUI, then on the device, carrying .whl and build:
#   OUT=$OUT bash bench/peers_on_device.sh
set -u
OUT=${OUT:-/tmp/peers_out}
mkdir -p "$OUT"
for folder in .whl build/comfyui build/comfy-wheels; do
    if [ ! -d "$folder" ]; then
        echo "peers_on_device: $folder is missing; run bench/peers/stage_peers.sh COMFYUI_CHECKOUT here and carry" \
             ".whl and build" >&2
        exit 2
    fi
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl build/comfy-wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 540 python3 bench/bench_step.py --workloads edit --comfyui build/comfyui \
    --impls fast ours-compiled+graphs diffusers diffusers-compiled comfyui+cudnn comfyui-fp8scaled \
    comfyui-fp8scaled-fast ours-fp8-compiled+graphs ours-int8-compiled+graphs > "$OUT/peers.txt" 2>&1
grep -E "matmul|floor|ours|diffusers|comfyui|check" "$OUT/peers.txt"
echo "peers_on_device: $SECONDS s"
