"""Would an int8 path beat the fp8 one? Its GEMMs' speed and the whole model's error, on a CUDA GPU.

    python3 bench/linear/int8_probe.py [--gemms] [--pingpong] [--accuracy] [--host]

--gemms: at the edit step's shapes (8704 tokens), one layer's GEMM as bf16 (cuBLAS), fp8 (`torch._scaled_mm`,
rowwise scales, fast accumulation, as our fp8 path runs), cuBLAS's int8 GEMM (`torch._int_mm`, int32 out, no
scaling: a lower bound of what it would cost), our int8 kernel as the model calls it (kontext_kernels/int8_gemm.py,
autotuned), and its persistent TMA kernel at each of a few tile / stage / warp configs.

--pingpong: at the same shapes, cuBLAS's fp8 GEMM against our two int8 kernels on Hopper: the autotuned
Triton-language one and the warp-specialised Gluon one (kontext_kernels/int8_gemm_hopper.py) at a few ring depths and
tile-group heights (GROUP_M: output row tiles that walk one column band together, sharing weight tiles in L2), and
its cooperative schedule (128x256 tiles, both consumers on each).

--accuracy: the full-size model on random weights (bench_step's), the edit workload; the velocity's relative L2
error vs bf16 when every block linear's operands are rounded to int8 or e4m3 with per-row scales (simulated:
float32 GEMMs of the rounded values), and of the real fp8 path, which the e4m3
simulation should reproduce. The simulation's GEMMs run in float32 (TF32 off), as exact as the 8-bit GEMMs' own
accumulators.

--host: the host's time to enqueue one int8 GEMM (eager, no CUDA graph) as the model launches it, and a profile
of those calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from bench_step import cuda_time, inputs, matmul_rate, random_transformer, WORKLOADS  # noqa: E402
from random_weights import rel_l2  # noqa: E402

import kontext_kernels  # noqa: E402
from kontext_kernels import int8_gemm, int8_gemm_hopper  # noqa: E402
from kontext_kernels.runtime import row_bucket  # noqa: E402
from kontext_core import TransformerConfig  # noqa: E402
from kontext_core.compute import quant

SHAPES = {"qkv": (3072, 9216), "proj": (3072, 3072), "mlp up": (3072, 12288), "mlp down": (12288, 3072),
          "linear1": (3072, 21504), "linear2": (15360, 3072)}
TOKENS = 8704


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


# --- the persistent TMA kernel of kontext_kernels/int8_gemm.py at chosen configs, past its autotuner ---------------
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). At 94d41b8 this probe also swept non-persistent and warp-specialised
# variants of the kernel (bench/RESULTS.md, "An int8 path"): no faster.
TMA_CONFIGS = [(256, 128, 128, 3, 8), (128, 256, 128, 3, 8), (256, 128, 128, 4, 8), (128, 256, 128, 4, 8),
               (128, 128, 128, 4, 4)]


STORES = {"pointer": int8_gemm._STORE_POINTER, "TMA": int8_gemm._STORE_TMA, "TMA halves": int8_gemm._STORE_TMA_HALVES}


def int8_tma(data, scale, weight, weight_scale, bias, config, store="pointer"):
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_m, block_n, block_k, stages, warps = config
    M, K = data.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=torch.bfloat16, device=data.device)
    tiles = -(-M // block_m) * -(-N // block_n)
    programs = min(torch.cuda.get_device_properties(data.device).multi_processor_count, tiles)
    int8_gemm._int8_linear_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(data, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        TensorDescriptor.from_tensor(out, [block_m, block_n // 2 if store == "TMA halves" else block_n]),
        scale, weight_scale, bias, out, M, N, K, out.stride(0), row_bucket(M), HAS_BIAS=True,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, STORE=STORES[store], num_stages=stages,
        num_warps=warps)
    return out


def _shape_operands(k: int, n: int) -> tuple:
    """One GEMM shape's random operands: x [TOKENS, K] and w [N, K] in bf16 with a bias; their int8 rows and scales
    (the activation's [rows, 1], the weight's [N]); the exact product of those; and cuBLAS's fp8 GEMM of the same x
    and w, ready to time."""
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.02
    data, scale = int8_rows(x)
    w_data, w_scale = int8_rows(w)
    scale, w_scale = scale.contiguous(), w_scale.reshape(-1).contiguous()
    reference = int8_gemm.int8_linear_reference(data, scale, w_data, w_scale, bias, torch.bfloat16)
    x8 = quant.quantize_rows(x)
    w8, w8_scale = quant.quantize_weight(w, per_row=True)
    w8_scale_row = w8_scale.reshape(1, -1).contiguous()

    def fp8():
        return torch._scaled_mm(x8.data, w8.t(), scale_a=x8.scale, scale_b=w8_scale_row, bias=bias,
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    return x, w, bias, 2 * TOKENS * k * n, data, scale, w_data, w_scale, reference, fp8


def gemms() -> None:
    print(f"bf16 matmul rate (8192^3): {matmul_rate() / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for name, (k, n) in SHAPES.items():
        x, w, bias, flops, data, scale, w_data, w_scale, reference, fp8 = _shape_operands(k, n)
        candidates = {
            "bf16 cuBLAS": lambda: F.linear(x, w, bias),
            "fp8 _scaled_mm": fp8,
            "int8 _int_mm (int32 out, unscaled)": lambda: torch._int_mm(data, w_data.t()),
            "int8 ours (kontext_kernels/int8_gemm.py, autotuned)": lambda: int8_gemm.int8_linear(
                data, scale, w_data, w_scale, bias, torch.bfloat16),
        }
        for config in TMA_CONFIGS:
            for store in STORES:
                candidates[f"int8 ours (TMA {config}, {store} store)"] = (
                    lambda config=config, store=store: int8_tma(data, scale, w_data, w_scale, bias, config, store))
        for label, fn in candidates.items():
            try:
                seconds = cuda_time(fn, warmup=2, iterations=7, repeat=10, graphed=True)
                error = ""
                if label.startswith("int8 ours"):
                    error = f"{rel_l2(fn(), reference):.1e}"
                rows.append((name, label, seconds * 1e3, flops / seconds / 1e12, error))
            except Exception as exc:  # a variant that does not compile here is reported, not fatal
                rows.append((name, label, float("nan"), float("nan"), f"{type(exc).__name__}: {str(exc)[:80]}"))
            print(f"  {rows[-1][0]:16s} {rows[-1][1]:40s} {rows[-1][2]:7.3f} ms {rows[-1][3]:7.0f} T/s  {rows[-1][4]}",
                  flush=True)
    print("\n| shape | GEMM | ms | TFLOP/s (TOP/s) | rel. L2 error vs exact |\n| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]:.3f} | {row[3]:.0f} | {row[4]} |")


def pingpong() -> None:
    print(f"bf16 matmul rate (8192^3): {matmul_rate() / 1e12:.0f} TFLOP/s", flush=True)
    print("| shape | GEMM | ms | TFLOP/s (TOP/s) | of cuBLAS fp8 | rel. L2 error vs exact |\n"
          "| --- | --- | ---: | ---: | ---: | ---: |")
    for name, (k, n) in SHAPES.items():
        _, _, bias, flops, data, scale, w_data, w_scale, reference, fp8 = _shape_operands(k, n)
        scale = scale.reshape(-1)  # the Gluon launch's own form, as `int8_gemm._kernel_operands` passes it
        candidates = {
            "fp8 _scaled_mm": fp8,
            "int8 Triton (autotuned)": lambda: int8_gemm._launch(data, scale, w_data, w_scale, bias, torch.bfloat16,
                                                                 kernel="triton"),
        }
        for stages, group_m in ((4, 8), (5, 8), (4, 4), (4, 16), (4, 32)):
            candidates[f"int8 Gluon ping-pong, {stages} stages, GROUP_M {group_m}"] = (
                lambda stages=stages, group_m=group_m: int8_gemm_hopper.launch(
                    data, scale, w_data, w_scale, bias, torch.bfloat16, stages=stages, group_m=group_m))
        for stages, group_m in ((3, 8), (3, 16), (3, 32), (3, 64)):
            candidates[f"int8 Gluon cooperative 128x256, {stages} stages, GROUP_M {group_m}"] = (
                lambda stages=stages, group_m=group_m: int8_gemm_hopper.launch(
                    data, scale, w_data, w_scale, bias, torch.bfloat16, stages=stages, group_m=group_m,
                    schedule="cooperative"))
        base = None
        for label, fn in candidates.items():
            try:
                seconds = cuda_time(fn, warmup=2, iterations=7, repeat=10, graphed=True)
                base = base or seconds
                error = f"{rel_l2(fn(), reference):.1e}" if label.startswith("int8") else ""
                print(f"| {name} | {label} | {seconds * 1e3:.3f} | {flops / seconds / 1e12:.0f} | "
                      f"{base / seconds:.1%} | {error} |", flush=True)
            except Exception as exc:  # a variant that does not build here is reported, not fatal
                print(f"| {name} | {label} | failed: {type(exc).__name__}: {str(exc)[:300]} | | | |", flush=True)


GROUPS = {"modulation": ("_mod.lin", "modulation.lin"), "qkv": ("attn.qkv",), "proj": ("attn.proj",),
          "mlp up": ("mlp.0",), "mlp down": ("mlp.2",), "linear1": ("linear1",), "linear2": ("linear2",)}


class RoundedLinear(torch.nn.Module):
    """A block linear whose input rows and weight rows are rounded to `fmt` (per-row scales) before a float32 GEMM.

    Class-wide switches: `mode` ("off", "int8", "e4m3"); layers of the groups in `exact` keep both operands
    unrounded, those in `weight_only` round their weights only."""

    mode = "off"
    exact: set[str] = set()
    weight_only: set[str] = set()

    def __init__(self, name: str, inner: torch.nn.Linear):
        super().__init__()
        self.inner = inner
        self.group = next((g for g, suffixes in GROUPS.items() if name.endswith(suffixes)), "other")
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.weight, self.bias = inner.weight, inner.bias

    @staticmethod
    def rounded(t: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = t.reshape(-1, t.shape[-1]).float()
        if mode == "off":
            return rows, torch.ones_like(rows[:, :1])
        if mode == "int8":
            scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            return (rows / scale).round().clamp(-127, 127), scale
        scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
        return (rows / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float(), scale

    def forward(self, x):
        mode = "off" if self.group in RoundedLinear.exact else RoundedLinear.mode
        data, scale = self.rounded(x, "off" if self.group in RoundedLinear.weight_only else mode)
        w_data, w_scale = self.rounded(self.weight, mode)
        out = (data @ w_data.t()) * scale * w_scale.reshape(1, -1)  # float32, TF32 off
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def accuracy(sensitivity: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    config = TransformerConfig()
    x = inputs(config, WORKLOADS["edit"])
    kontext_kernels.set_enabled(True)
    model = random_transformer(config)

    def velocity(m):
        with torch.no_grad():
            return m.velocity(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"], x["ctx"],
                              x["ctx_ids"]).float()

    reference = velocity(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, RoundedLinear(name, module))
    runs = [("off", set(), set()), ("int8", set(), set()), ("e4m3", set(), set())]
    if sensitivity:
        runs += [("int8", {group}, set()) for group in GROUPS]
        runs += [("int8", set(), {"modulation"}), ("e4m3", {"modulation"}, set()), ("e4m3", set(), {"modulation"})]
    results = {}
    for mode, exact, weight_only in runs:
        RoundedLinear.mode, RoundedLinear.exact, RoundedLinear.weight_only = mode, exact, weight_only
        label = f"simulated {mode}" + (f", {'/'.join(sorted(exact))} unrounded" if exact else "") + (
            f", {'/'.join(sorted(weight_only))} weights only" if weight_only else "")
        results[label] = rel_l2(velocity(model), reference)
        print(f"  {label}: {results[label]:.3e}", flush=True)
    del model
    torch.cuda.empty_cache()
    fp8 = quant.quantize_model(random_transformer(config))
    results["real fp8 path (kernels, _scaled_mm)"] = rel_l2(velocity(fp8), reference)
    print("\n| block linears' operands | velocity rel. L2 error vs bf16 |\n| --- | ---: |")
    for name, error in results.items():
        print(f"| {name} | {error:.2e} |")


def host_time() -> None:
    """Host time to enqueue one int8 GEMM of each edit shape as the model launches it (autotuned), and a profile
    of those calls' host work. (A direct launch with the tuned config kept per shape measured the same on an H200,
    bench/RESULTS.md: the autotuner's dispatch is not where the time goes.)"""
    import cProfile
    import pstats
    import time

    device = torch.device("cuda")
    calls = 50
    print("\n| layer | host us / call |\n| --- | ---: |")
    operands = {}
    for name, (k, n) in SHAPES.items():
        data, scale = int8_rows(torch.randn(TOKENS, k, device=device))
        weight, weight_scale = int8_rows(torch.randn(n, k, device=device) * k**-0.5)
        bias = torch.randn(n, device=device, dtype=torch.bfloat16)
        args = (data, scale, weight, weight_scale.reshape(-1), bias, torch.bfloat16)
        operands[name] = args
        int8_gemm.int8_linear(*args)  # tunes once
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            int8_gemm.int8_linear(*args)
        host_us = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        print(f"| {name} | {host_us:.1f} |", flush=True)
    profile = cProfile.Profile()
    torch.cuda.synchronize()
    profile.enable()
    for _ in range(10):
        for args in operands.values():
            int8_gemm.int8_linear(*args)
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemms", action="store_true")
    parser.add_argument("--pingpong", action="store_true", help="the warp-specialised int8 GEMM against the others")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--sensitivity", action="store_true",
                        help="with --accuracy: also each group of block linears left unrounded, one at a time")
    parser.add_argument("--host", action="store_true", help="host time to enqueue one int8 GEMM, and its profile")
    args = parser.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    if args.accuracy:
        accuracy(args.sensitivity)
    if args.gemms:
        gemms()
    if args.pingpong:
        pingpong()
    if args.host:
        host_time()


if __name__ == "__main__":
    main()
