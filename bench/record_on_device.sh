#!/usr/bin/env bash
# One device call for #20's run of record (bench/RESULTS.md keeps each one with its date, card and commit), in
# order of what the targets need:
#   1. one process: our bf16 step (compiled + CUDA graphs), the fast step (tuned plans and paired row
#      quantizers, the defaults), the fast step untuned, the fast step with a row-quantizer launch per stream
#      (+unpairedrows), then the fast preset's whole 28-step 1024² edit with the AE, as the preset runs it and
#      with the AE's attention on PyTorch's math path (no +fusedae, as before 2026-12-08). The fast rows' "rel.
#      error vs first" is the velocity error against bf16; "attention alone ... (cuDNN first)" is cuDNN bf16's
#      rate at the edit shape;
#   2. the GPU tests of every GEMM plan candidate (bit for bit against the default launch), the dispatch, the CUDA
#      graphs of the steps that record and reuse sage8's statistics, the paired row quantizers (bytes; the int8 and
#      e4m3 models, the latter with a LoRA's columns and against the unpaired fp8 path's error), and every
#      kontext:: operator against torch.compile's contract (opcheck) with its GPU kernels;
#   3. while the call is under 420 s, sage8's attention kernel alone at the edit shape
#      (bench/attention/attention_counters.py --time ''), for its ratio to cuDNN;
#   4. while the call is under 480 s, the AE's attention alone through each SDPA backend, with the operands as
#      the exact path and as the fast preset hand them (bench/pipeline/ae_probe.py --attention).
# Usage (from the repository root, on the device): OUT=$OUT bash bench/record_on_device.sh
# SHORT=1 leaves out the untuned and unpaired rows (~70 s) where the session's device time is short.
set -u
OUT=${OUT:-/tmp/record_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 330 python3 bench/bench_step.py --no-check --workloads edit \
    --impls ours-compiled+graphs fast $([ "${SHORT:-0}" = 1 ] || echo "fast+untunedplans fast+unpairedrows") \
    --e2e int8+sage8+modtable+compiledae+fusedae+frozenstats+paired+graphs \
    int8+sage8+modtable+compiledae+frozenstats+paired+graphs > "$OUT/record.txt" 2>&1
grep -E "matmul|floor|tuned plan|end-to-end" "$OUT/record.txt"
timeout 120 python3 -m pytest -q tests/kernels/test_int8_gemm_hopper.py tests/compute/test_cuda_graph.py \
    -k "plan_candidate or dispatches or recording" 2>&1 | tail -3
timeout 160 python3 -m pytest -q tests/kernels/test_kernels.py tests/compute/test_int8.py \
    tests/compute/test_fp8_fused.py tests/compute/test_op_contracts.py \
    -k "cuda and (pair_of_inputs or one_launch or stacked or paired_row_quantizers or by_default or as_accurate or contract)" \
    2>&1 | tail -3
if [ "$SECONDS" -lt 420 ]; then
    timeout 90 python3 bench/attention/attention_counters.py --time '' > "$OUT/attention.txt" 2>&1
    tail -5 "$OUT/attention.txt"
fi
if [ "$SECONDS" -lt 480 ]; then
    timeout 90 python3 bench/pipeline/ae_probe.py --attention > "$OUT/ae.txt" 2>&1
    tail -12 "$OUT/ae.txt"
fi
echo "record_on_device: $SECONDS s"
