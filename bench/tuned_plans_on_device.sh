#!/usr/bin/env bash
# One device call for the int8 GEMM's plans tuned on the card (kontext_kernels/int8_gemm_hopper.py, TUNE_PLANS, on
# by default: each plain product's shape takes the fastest of PLAN_CANDIDATES, timed at its first launch;
# bench/RESULTS.md, 2026-12-07, fourth and fifth sessions), in order of what decides it:
#   1. the fast step tuned (the default), untuned, and tuned again (run order's drift shows; "rel. error" must
#      read 0: every candidate gives the same sums), with the plans the tuning chose;
#   2. the GPU tests of the Hopper GEMM's launches (candidates, tuned and paired) and of CUDA graphs;
#   3. while the call is under 330 s, the whole 28-step edit tuned and untuned, each capturing its own graphs
#      (unless E2E=0);
#   4. while the call is under 400 s, the six GEMM shapes' schedules beside cuBLAS's fp8 GEMM
#      (bench/int8_probe.py --pingpong; PROBE=0 skips it).
# Usage (from the repository root, on the device):
#   OUT=$OUT [E2E=0] [PROBE=0] [TESTS_K=<pytest -k expression>] bash bench/tuned_plans_on_device.sh
set -u
OUT=${OUT:-/tmp/tuned_plans_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
git log --oneline -1 2>/dev/null
FAST=ours-int8-compiled+graphs+sage8+modtable+frozenstats+paired
timeout 240 python3 bench/bench_step.py --no-check --workloads edit \
    --impls "$FAST" "$FAST+untunedplans" "$FAST" > "$OUT/step.txt" 2>&1
grep -E "ms .*floor|tuned plan" "$OUT/step.txt"
# The offline sm_90 builds are CI's (and take most of the file's time): here the launches only.
timeout 170 python3 -m pytest -q tests/test_int8_gemm_hopper.py tests/test_cuda_graph.py -k "${TESTS_K:-not builds}" 2>&1 | tail -4
if [ "${E2E:-1}" = 1 ] && [ "$SECONDS" -lt 330 ]; then
    E=int8+sage8+modtable+compiledae+frozenstats
    timeout 240 python3 bench/bench_step.py --no-check --workloads edit --impls "$FAST" \
        --e2e "$E+paired+graphs" "$E+paired+untunedplans+graphs" > "$OUT/e2e.txt" 2>&1
    grep -E "end-to-end|tuned plan" "$OUT/e2e.txt"
fi
if [ "${PROBE:-1}" = 1 ] && [ "$SECONDS" -lt 400 ]; then
    timeout 80 python3 bench/int8_probe.py --pingpong > "$OUT/int8_probe.txt" 2>&1
    grep -E "^\| (qkv|proj|mlp|linear)" "$OUT/int8_probe.txt"
fi
echo "tuned_plans_on_device: $SECONDS s"
