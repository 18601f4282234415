#!/usr/bin/env bash
# One device call for the double block's paired int8 GEMM launch and the GEMM's cooperative schedule
# (bench/RESULTS.md, 2026-12-07, second session), in order of what decides it, each part bounded so that the
# whole fits one call:
#   1. the fast step with each stream's GEMMs launched apart, paired, and paired with the cooperative schedule for
#      plain products (the outputs must agree: "rel. error" 0);
#   2. the GPU tests of the paired launch;
#   3. bench/linear/pair_probe.py: each double-block op, text and image apart, paired, and as one 8704-row launch;
#   4. the int8 GEMM's ping-pong and cooperative (128x256) schedules beside cuBLAS's fp8 GEMM
#      (bench/linear/int8_probe.py);
#   5. the LayerNorm + modulation + int8 kernel against its looping candidate (bench/linear/row_quant_probe.py);
#   6. Nsight Compute's counters of the int8 GEMM beside cuBLAS's fp8 one at linear1 (bench/linear/gemm_counters.py);
#   7. the AE's 512-wide attention through each SDPA backend (bench/pipeline/ae_probe.py --attention);
#   8. with E2E=1, the whole 28-step edit with the GEMMs apart and paired.
# Usage (from the repository root, on the device): OUT=$OUT [E2E=1] bash bench/linear/pair_on_device.sh
set -u
OUT=${OUT:-/tmp/pair_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
git log --oneline -1 2>/dev/null
FAST=ours-int8-compiled+graphs+sage8+modtable+frozenstats
timeout 260 python3 bench/bench_step.py --no-check --workloads edit \
    --impls "$FAST+unpaired" "$FAST+paired" "$FAST+paired+cooperative" > "$OUT/step.txt" 2>&1
grep -v "^\s*$" "$OUT/step.txt" | tail -12
timeout 110 python3 -m pytest -q tests/kernels/test_int8_gemm_hopper.py tests/compute/test_int8.py \
    -k "not builds and (hopper or one_launch or pair)" 2>&1 | tail -4
timeout 80 python3 bench/linear/pair_probe.py > "$OUT/pair_probe.txt" 2>&1
tail -9 "$OUT/pair_probe.txt"
if [ "$SECONDS" -lt 360 ]; then  # the int8 GEMM's schedules (ping-pong, cooperative 128x256) beside cuBLAS fp8
    timeout 80 python3 bench/linear/int8_probe.py --pingpong > "$OUT/int8_probe.txt" 2>&1
    grep -E "^\| (qkv|proj|mlp|linear)" "$OUT/int8_probe.txt"
fi
if [ "$SECONDS" -lt 430 ]; then
    timeout 60 python3 bench/linear/row_quant_probe.py --layernorm > "$OUT/row_quant_probe.txt" 2>&1
    grep "LayerNorm" "$OUT/row_quant_probe.txt"
fi
if [ "$SECONDS" -lt 460 ]; then
    timeout 70 ncu --clock-control none --set full --import-source no \
        -k regex:'pingpong|gemm|nvjet|xmma|sm90' --launch-skip 4 --launch-count 2 -o "$OUT/gemm_linear1" \
        python3 bench/linear/gemm_counters.py --shape linear1 > "$OUT/ncu_log.txt" 2>&1 \
        && python3 bench/linear/gemm_counters.py --summarize "$OUT/gemm_linear1.ncu-rep" > "$OUT/gemm_counters.md" 2>&1
    head -c 4000 "$OUT/gemm_counters.md" 2>/dev/null
fi
if [ "$SECONDS" -lt 520 ]; then
    timeout 50 python3 bench/pipeline/ae_probe.py --attention > "$OUT/ae_attention.txt" 2>&1
    tail -9 "$OUT/ae_attention.txt"
fi
if [ "${E2E:-0}" = 1 ]; then
    E=int8+sage8+modtable+compiledae+frozenstats
    timeout 300 python3 bench/bench_step.py --no-check --workloads edit --impls "$FAST" \
        --e2e "$E+unpaired+graphs" "$E+paired+graphs" > "$OUT/e2e.txt" 2>&1
    grep "end-to-end" "$OUT/e2e.txt"
fi
echo "pair_on_device: $SECONDS s"
