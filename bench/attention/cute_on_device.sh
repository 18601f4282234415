#!/usr/bin/env bash
# Runs sage8's CuTe DSL kernel on a GPU machine that has no CuTe DSL compiler (bench/RESULTS.md, 2026-12-06 (sixth
# session)). DIR (default .whl/rt) holds what was prepared on a machine with the DSL:
#   *.o                           builds exported by bench/attention/cute_export.py (CUTE_DSL_ARCH=sm_90a), one per
#                                 cute_runtime.VARIANTS name; sage8.o is the default build
#   libcute_dsl_runtime.so.xz     the DSL's runtime library (nvidia_cutlass_dsl/cu13/lib), xz-compressed
#   apache_tvm_ffi-*.whl          TVM-FFI for the GPU machine's Python
# Then: the probe over every build (its times and errors to $OUT/cute_probe.json when OUT is set), the CuTe tests
# (every build), and the fast step and whole edit with the Gluon kernel and with the fastest build within the
# Gluon kernel's error (E2E=0: the step alone).
set -o pipefail
dir="${1:-.whl/rt}"
out="${OUT:-/tmp/cute_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$dir"/*.whl || exit 1
export PYTHONPATH=/tmp/site
mkdir -p /tmp/rt && xz -dc "$dir/libcute_dsl_runtime.so.xz" > /tmp/rt/libcute_dsl_runtime.so || exit 1
tvm=$(python3 -c "import os, tvm_ffi; print(os.path.join(os.path.dirname(tvm_ffi.__file__), 'lib'))")
export LD_LIBRARY_PATH=/tmp/rt:$tvm:$LD_LIBRARY_PATH
kernels=()
for object in "$dir"/*.o; do
    kernels+=("/tmp/rt/$(basename "$object" .o).so")
    g++ -shared -o "${kernels[-1]}" "$object" -L/tmp/rt -lcute_dsl_runtime -L"$tvm" -ltvm_ffi || exit 1
done
export KONTEXT_SAGE_CUTE_MODULE=/tmp/rt/sage8.so  # the other builds are found beside it
timeout 170 python3 bench/attention/sage_cute_probe.py --module "${kernels[@]}" --json "$out/cute_probe.json" || exit 1
timeout 90 python3 -m pytest -q tests/kernels/test_sage_attention_cute.py -p no:cacheprovider
best=$(cat "$out/cute_probe.best" 2>/dev/null || echo sage8)
echo "the step's CuTe build: $best"
export KONTEXT_SAGE_CUTE_MODULE=/tmp/rt/$best.so
fast=ours-int8-compiled+graphs+sage8+modtable+frozenstats
edit=int8+sage8+modtable+compiledae+frozenstats
whole_edit=(--e2e $edit+graphs $edit+cuteattention+graphs)
[ "${E2E:-1}" = 0 ] && whole_edit=()  # E2E=0: the step pair alone, where device time is short
timeout 330 python3 bench/bench_step.py --no-check --workloads edit --impls $fast $fast+cuteattention \
    "${whole_edit[@]}" --out "$out"
