#!/usr/bin/env bash
# One device call for the int8 GEMM's per-shape plan (kontext_kernels/int8_gemm_hopper.py, SHAPE_PLANS: linear1
# cooperative with GROUP_M 16, 0.763 against 0.858 ms alone on an H200; bench/RESULTS.md, 2026-12-07, third
# session), in order of what decides it:
#   1. the fast step without the plan, with it, and without it again (run order's drift shows; "rel. error" must
#      read 0: the plan changes the tile order and schedule, not the sums);
#   2. the GPU tests of the plan and of the schedules it uses;
#   3. the six GEMM shapes' schedules beside cuBLAS's fp8 GEMM again (bench/int8_probe.py --pingpong);
#   4. unless E2E=0, and while the call is under 300 s, the whole 28-step edit without and with the plan (the
#      last session's call of this size took 109 s for two step rows and three edits);
#   5. unless PROFILE=0, and while the call is under 440 s, the step with the plan by kernel kind.
# Usage (from the repository root, on the device): OUT=$OUT [E2E=0] [PROFILE=0] bash bench/shape_plans_on_device.sh
set -u
OUT=${OUT:-/tmp/shape_plans_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
git log --oneline -1 2>/dev/null
FAST=ours-int8-compiled+graphs+sage8+modtable+frozenstats+paired
timeout 240 python3 bench/bench_step.py --no-check --workloads edit \
    --impls "$FAST+noshapeplans" "$FAST+shapeplans" "$FAST+noshapeplans" > "$OUT/step.txt" 2>&1
grep -v "^\s*$" "$OUT/step.txt" | tail -8
timeout 120 python3 -m pytest -q tests/test_int8_gemm_hopper.py -k "shape_plan or matches or pair" 2>&1 | tail -4
if [ "$SECONDS" -lt 400 ]; then
    timeout 80 python3 bench/int8_probe.py --pingpong > "$OUT/int8_probe.txt" 2>&1
    grep -E "^\| (qkv|proj|mlp|linear)" "$OUT/int8_probe.txt"
fi
if [ "${E2E:-1}" = 1 ] && [ "$SECONDS" -lt 300 ]; then
    E=int8+sage8+modtable+compiledae+frozenstats+paired
    timeout 300 python3 bench/bench_step.py --no-check --workloads edit --impls "$FAST" \
        --e2e "$E+graphs" "$E+shapeplans+graphs" > "$OUT/e2e.txt" 2>&1
    grep "end-to-end" "$OUT/e2e.txt"
fi
if [ "${PROFILE:-1}" = 1 ] && [ "$SECONDS" -lt 440 ]; then
    # Where the step's GPU time goes with the plan: the breakdown the next lever is chosen from.
    timeout 100 python3 bench/bench_step.py --no-check --workloads edit --impls "$FAST+shapeplans" --profile \
        --profile-top 30 > "$OUT/profile.txt" 2>&1
    grep -A32 "profile " "$OUT/profile.txt"
fi
echo "shape_plans_on_device: $SECONDS s"
