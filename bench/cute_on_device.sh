#!/usr/bin/env bash
# Runs sage8's CuTe DSL kernel on a GPU machine that has no CuTe DSL compiler (bench/RESULTS.md, 2026-12-06 (sixth
# session)). DIR (default .whl/rt) holds what was prepared on a machine with the DSL:
#   *.o                           kernels exported by kontext_kernels/sage_attention_cute.export (CUTE_DSL_ARCH=sm_90a);
#                                 sage8.o is the one cute_runtime loads
#   libcute_dsl_runtime.so.xz     the DSL's runtime library (nvidia_cutlass_dsl/cu13/lib), xz-compressed
#   apache_tvm_ffi-*.whl          TVM-FFI for the GPU machine's Python
# Then: the probe over every exported kernel, the CuTe tests, and the fast step with and without the CuTe kernel.
set -o pipefail
dir="${1:-.whl/rt}"
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
export KONTEXT_SAGE_CUTE_MODULE=/tmp/rt/sage8.so
timeout 150 python3 bench/sage_cute_probe.py --module "${kernels[@]}" || exit 1
timeout 100 python3 -m pytest -q tests/test_sage_attention_cute.py -p no:cacheprovider
fast=ours-int8-compiled+graphs+sage8+modtable
timeout 200 python3 bench/bench_step.py --no-check --workloads edit --impls $fast $fast+cuteattention
