"""FlashAttention-3's Hopper kernels (bf16 and e4m3) beside sage8's attention and cuDNN's bf16 attention, at the
edit shape: the peer that issue #20's "the way FlashAttention-3's fp8 kernel does" names.

    python3 bench/attention/fa3_probe.py        # on a Hopper GPU with FlashAttention-3 importable

FlashAttention-3 is found as `flash_attn_interface` (a build of flash-attention's hopper/ folder) or as
`fa3_fwd_interface` (the `fa3-fwd` wheel on PyPI: the same forward kernels, built against PyTorch's stable ABI).
Its e4m3 path takes q, k, v in e4m3 with one descale per (batch, head) and writes bf16. Rows:
- FA3 e4m3 with each head's amax scale, as a user would call it;
- the same with K's mean over tokens taken off each head first (that takes a constant off each query row's
  scores, so the result is unchanged in exact arithmetic; SageAttention's smoothing, here for e4m3, not int8).
Each row gives ms per call (the whole call from bf16 q, k, v: sage8 with its fused quantization pass, FA3's e4m3 rows
with an unfused per-head amax and cast in PyTorch; and the kernel alone, its operands prepared beforehand),
TFLOP/s (4*B*H*L*L*D) and the relative L2 error against float64 attention on the probe's two inputs
(sage_attention_probe.py: "synthetic" unit-RMS q, k, and "block": q, k, v of a random full-size double block).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from random_weights import rel_l2
from sage_attention_probe import attempt, block_inputs, exact_attention, synthetic_inputs

from kontext_core import TransformerConfig
from kontext_kernels import sage_attention as sa
from kontext_kernels import sage_attention_hopper as hopper_kernel

E4M3 = torch.float8_e4m3fn


def load_fa3():
    """FlashAttention-3's flash_attn_func and where it came from, or (None, why)."""
    for module in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            imported = __import__(module)
            return imported.flash_attn_func, module
        except Exception as error:  # noqa: BLE001 - an import of a compiled extension can fail many ways
            reason = f"{module}: {type(error).__name__}: {error}"
    return None, reason


def per_head_e4m3(x: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] -> (e4m3 [B, L, H, D], float32 descale [B, H]): each head's amax mapped to 448; with
    `center`, the mean over tokens taken off each head's channels first."""
    x = x.float()
    if center:
        x = x - x.mean(dim=2, keepdim=True)
    descale = x.abs().amax(dim=(2, 3)).clamp(min=1e-12) / 448.0
    data = (x / descale[:, :, None, None]).clamp(-448, 448).to(E4M3)
    return data.transpose(1, 2).contiguous(), descale.contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--error-heads", type=int, default=4)
    args = parser.parse_args()
    from bench_step import cuda_time

    from kontext_core.compute.attention import _first_tensor as first  # some builds also return the LSE
    from kontext_core.compute.attention import cudnn_first

    def timed(fn):
        return 1e3 * cuda_time(fn, warmup=3, iterations=10, repeat=5)

    fa3, origin = load_fa3()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; FlashAttention-3: {origin}", flush=True)
    config = TransformerConfig()
    heads, head_dim, length = config.num_heads, config.head_dim, 512 + 2 * 64 * 64
    inputs = {"synthetic": synthetic_inputs(1, heads, length, head_dim, "cuda"),
              "block": block_inputs(config, 64, 512, "cuda", torch.bfloat16)}
    measured = slice(0, args.error_heads)
    exact = {name: exact_attention(*(t[:, measured] for t in x)) for name, x in inputs.items()}
    flops = 4 * heads * length * length * head_dim
    rows = []

    def add(label, fn, kernel_alone=None):
        ms = attempt(label, lambda: timed(lambda: fn(*inputs["synthetic"])))
        alone = attempt(label + " (kernel)", kernel_alone) if kernel_alone else None
        errors = {name: attempt(f"{label} on {name}", lambda x=x, name=name: rel_l2(fn(*x)[:, measured], exact[name]))
                  for name, x in inputs.items()}
        rows.append((label, ms, alone, errors))
        print(f"  {label}: {ms} ms, kernel {alone} ms, errors {errors}", flush=True)

    def sdpa(q, k, v):
        with cudnn_first():
            return F.scaled_dot_product_attention(q, k, v)

    add("bf16 SDPA (cuDNN first)", sdpa)

    q, k, v = inputs["synthetic"]
    operands = sa.quantize_operands(q, k, v, fp8_pv=True)
    out = torch.empty((1, length, heads, head_dim), dtype=q.dtype, device="cuda")
    add("sage8 (ours: int8 Q·Kᵀ, e4m3 P·V)", lambda q, k, v: sa.sage_attention(q, k, v, fp8_pv=True),
        lambda: timed(lambda: hopper_kernel.launch(operands, out)))

    if fa3 is not None:
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        add("FlashAttention-3 bf16", lambda q, k, v: first(fa3(q.transpose(1, 2), k.transpose(1, 2),
                                                                  v.transpose(1, 2))).transpose(1, 2),
            lambda: timed(lambda: fa3(qt, kt, vt)))
        for center in (False, True):
            def fa3_e4m3(q, k, v, center=center):
                (q8, qs), (k8, ks), (v8, vs) = (per_head_e4m3(t, center and t is k) for t in (q, k, v))
                return first(fa3(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs)).transpose(1, 2)

            def kernel_alone(center=center):
                (q8, qs), (k8, ks), (v8, vs) = (per_head_e4m3(t, center and t is k) for t in (q, k, v))
                return timed(lambda: fa3(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs))

            add("FlashAttention-3 e4m3, per-head scales" + (", K's mean off" if center else ""), fa3_e4m3,
                kernel_alone)

    print(f"\n[1, {heads}, {length}, {head_dim}], errors over the first {args.error_heads} heads\n")
    print("| path | ms, whole call | kernel alone ms | TFLOP/s (kernel) | rel. L2 synthetic | "
          "rel. L2 block |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, ms, alone, errors in rows:
        best = alone if alone is not None else ms
        tflops = f"{flops / best / 1e9:.0f}" if best else ""

        def cell(value, fmt):
            return format(value, fmt) if value is not None else "failed"

        print(f"| {label} | {cell(ms, '.3f')} | {cell(alone, '.3f') if alone else ''} | {tflops} | "
              f"{cell(errors.get('synthetic'), '.2%')} | {cell(errors.get('block'), '.2%')} |")


if __name__ == "__main__":
    main()
