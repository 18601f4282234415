"""Probe our 8-bit attention (kontext_kernels/sage_attention.py) against cuDNN's bf16 attention at FLUX Kontext's shape.

    python3 bench/attention/sage_attention_probe.py               # on a CUDA GPU: [1, 24, 8704, 128], then batch 2
    TRITON_INTERPRET=1 python3 bench/attention/sage_attention_probe.py --tiny   # on a CPU, tiny sizes: that it runs

Prints one table: for each path, ms per call and TFLOP/s (4*B*H*L*L*D flops), the speed-up over bf16 SDPA on
cuDNN, and the relative L2 error against exact attention (float64, over the first --error-heads heads) on two
kinds of inputs:
- "synthetic": q, k with unit-RMS rows (QK-norm with unit weights) rotated by RoPE at random angles, v ~ N(0, 1);
- "block": q, k, v captured from one double block of the real configuration (kontext_core/model/layers.py) with
  random weights at a realistic scale (bench_step.random_transformer's), run on random tokens with the edit
  workload's position ids (512 text tokens, a 64x64 target and a 64x64 context).
Paths: bf16 SDPA (cuDNN); ours as backends 'sage8' (P·V in e4m3 where the GPU has fp8) and 'sage8-fp16' call
it (quantization + kernel: on Hopper the warp-specialised Gluon one, kontext_kernels/sage_attention_hopper.py,
elsewhere the autotuned Triton-language one), each with its quantization pass and attention kernel alone (on
Hopper: both kernels, the Gluon one at 2-4 ring stages and with each of its switches turned the other way alone:
P's row sums on the tensor cores or in the softmax, `sage_attention_hopper.ROW_SUMS_ON_TENSOR_CORES`; block j-1's
P·V during block j's softmax or not, `PV_DURING_SOFTMAX`, in either schedule the consumers taking turns or not,
`CONSUMERS_TAKE_TURNS`, at 3-5 ring stages too) and the Triton-language kernel at each
config of the GPU's list; variants at sage8's chosen config (e4m3 with k scales per token, e4m3 with one
accumulator across key blocks, fp16 P·V with k scales per 128 tokens, pointer loads instead of TMA); cudnn-fp8 where it
runs, and SageAttention 1.0.6 from PyPI where it is installed (`pip install sageattention==1.0.6`: pure Python,
Triton kernels; int8 Q·Kᵀ, fp16 P·V). A path that fails prints its error and the probe goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if "--tiny" in sys.argv:  # before Triton is imported: the kernels are built for the interpreter at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from kontext_kernels import sage_attention as sa  # noqa: E402
from kontext_kernels import sage_attention_hopper as hopper_kernel  # noqa: E402
from kontext_core import TransformerConfig  # noqa: E402
from kontext_core.model.layers import DoubleStreamBlock, RopeFrequencies, rope_frequencies  # noqa: E402
from kontext_core.model.tokens import position_ids, text_position_ids  # noqa: E402
from random_weights import randomize_, rel_l2  # noqa: E402


SCORE_NAMES = {sa.SCORES_CONVERT: "converted", sa.SCORES_FOLDED: "folded bias"}


def pinned_config(text: str) -> dict:
    """'64x128:w4:s3[:r168]' -> a config for sage_attention._launch_attention."""
    tile, *rest = text.split(":")
    block_m, block_n = map(int, tile.split("x"))
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    names = {"w": "num_warps", "s": "num_stages", "r": "maxnreg"}
    for part in rest:
        if part[:1] not in names:
            raise argparse.ArgumentTypeError(f"{text!r}: parts are wN (warps), sN (stages), rN (registers)")
        config[names[part[0]]] = int(part[1:])
    return config


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 softmax(q kᵀ / sqrt(D)) v, one head at a time (an 8704² float64 score matrix is 0.6 GB)."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    scale = q.shape[-1] ** -0.5
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = (q[b, h].double() @ k[b, h].double().T) * scale
            out[b, h] = scores.softmax(dim=-1) @ v[b, h].double()
    return out


def rope_rotate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x [B, H, L, D] with each adjacent channel pair rotated by a random angle per token (as RoPE does)."""
    angle = torch.rand(x.shape[0], 1, x.shape[2], x.shape[3] // 2, generator=generator, device=x.device) * 6.2832
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((angle.cos() * even - angle.sin() * odd, angle.sin() * even + angle.cos() * odd),
                       dim=-1).flatten(-2)


def synthetic_inputs(batch: int, heads: int, length: int, head_dim: int, device: str, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)

    def unit_rms(x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True))

    shape = (batch, heads, length, head_dim)
    q = rope_rotate(unit_rms(torch.randn(shape, generator=generator, device=device)), generator)
    k = rope_rotate(unit_rms(torch.randn(shape, generator=generator, device=device)), generator)
    v = torch.randn(shape, generator=generator, device=device)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def block_inputs(config: TransformerConfig, latent: int, text: int, device: str, dtype: torch.dtype, seed: int = 0):
    """q, k, v [1, H, L, D] of one random double block of `config` on random tokens: text, target and context
    tokens positioned as in an edit (the target at index 0, the context at index 1, both latent x latent)."""
    from kontext_core.model import layers

    torch.manual_seed(seed)
    with torch.device("meta"):
        block = DoubleStreamBlock(config.hidden_size, config.num_heads, config.mlp_hidden_dim, config.qkv_bias)
    block = block.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    randomize_(block, generator)
    ids = torch.cat((text_position_ids(1, text, device=device), position_ids(latent, latent, device=device),
                     position_ids(latent, latent, index=1, device=device)), dim=1)
    rope = RopeFrequencies(*rope_frequencies(ids, config.axes_dim, config.theta))
    image_tokens = ids.shape[1] - text
    img = torch.randn(1, image_tokens, config.hidden_size, generator=generator, device=device).to(dtype)
    txt = torch.randn(1, text, config.hidden_size, generator=generator, device=device).to(dtype)
    vec = torch.randn(1, config.hidden_size, generator=generator, device=device).to(dtype)
    captured = []
    original = layers.joint_attention

    def capture(streams, cos, sin, num_heads):
        q, k, v = layers.fused.joint_qkv_heads(streams, cos, sin, num_heads)
        captured.append((q, k, v))
        raise StopIteration  # the rest of the block is not needed

    layers.joint_attention = capture
    try:
        with torch.no_grad():
            block(img, txt, vec, rope)
    except StopIteration:
        pass
    finally:
        layers.joint_attention = original
    return captured[0]


def load_pypi_sage():
    try:
        from sageattention import sageattn  # type: ignore[import-not-found]
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    import importlib.metadata

    return sageattn, importlib.metadata.version("sageattention")


class Table:
    def __init__(self, flops: float, timed: bool):
        self.flops, self.timed, self.rows, self.baseline = flops, timed, [], None

    def add(self, label: str, ms: float | None, errors: dict[str, float | None]) -> None:
        self.rows.append((label, ms, errors))
        if self.baseline is None and ms is not None:
            self.baseline = ms
        parts = [f"{label:46s}"]
        if ms is not None:
            parts.append(f"{ms:7.3f} ms {self.flops / ms / 1e9:6.0f} TFLOP/s x{self.baseline / ms:4.2f}")
        parts += [f"{name} {value * 100:6.3f}%" for name, value in errors.items() if value is not None]
        print("  " + "  ".join(parts), flush=True)

    def markdown(self, error_names: list[str]) -> str:
        head = "| path | ms | TFLOP/s | vs cuDNN bf16 | " + " | ".join(f"rel L2 {n}" for n in error_names) + " |"
        lines = [head, "|" + " --- |" * (4 + len(error_names))]
        for label, ms, errors in self.rows:
            timing = (f"{ms:.3f} | {self.flops / ms / 1e9:.0f} | {self.baseline / ms:.2f}x" if ms is not None
                      else " | | ")
            cells = [f"{errors[n] * 100:.3f}%" if errors.get(n) is not None else "" for n in error_names]
            lines.append(f"| {label} | {timing} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def attempt(label: str, fn):
    try:
        return fn()
    except Exception:
        print(f"!! {label} failed:", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU through Triton's interpreter")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-variants", action="store_true", help="skip the per-config and variant rows")
    parser.add_argument("--error-heads", type=int, default=8,
                        help="heads the errors are measured on (the float64 reference: ~1 s a head at 8704 tokens)")
    parser.add_argument("--scores", type=int, nargs="+", default=[sa.SCORES_DEFAULT], choices=sorted(SCORE_NAMES),
                        help="how the kernel makes scores of its int32 dots (sage_attention.SCORES_*), timed per "
                             "config and as variants")
    parser.add_argument("--configs", nargs="*", type=pinned_config, default=[], metavar="BMxBN:wW:sS[:rR]",
                        help="more kernel configs to time beside the listed ones (r: a register cap per thread)")
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    config = TransformerConfig.tiny() if args.tiny else TransformerConfig()
    heads, head_dim = config.num_heads, config.head_dim
    latent, text = (6, 7) if args.tiny else (64, 512)  # in tokens per side; the edit workload: 8704 tokens
    length = text + 2 * latent * latent
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          + (f"{torch.cuda.get_device_name()} {torch.cuda.get_device_capability()}" if device == "cuda"
             else "CPU (Triton's interpreter)"), flush=True)
    if device == "cuda":
        from bench_step import cuda_time
        from kontext_core.compute.attention import cudnn_first

        def timed(fn):
            return 1e3 * cuda_time(fn, warmup=3, iterations=10, repeat=5)
    else:
        def timed(fn):
            fn()
            return None

    fp8 = sa.fp8_tensor_cores(torch.device(device))
    sageattn, sage_version = load_pypi_sage()
    print(f"sage8's P·V in {'e4m3' if fp8 else 'fp16'} here; SageAttention from PyPI: {sage_version}", flush=True)

    t0 = time.perf_counter()
    inputs = {"synthetic": synthetic_inputs(1, heads, length, head_dim, device),
              "block": attempt("block inputs", lambda: block_inputs(config, latent, text, device, torch.bfloat16))}
    inputs = {name: x for name, x in inputs.items() if x is not None}
    measured = slice(0, min(heads, args.error_heads))
    exact = {name: exact_attention(*(t[:, measured] for t in x)) for name, x in inputs.items()}
    print(f"inputs and float64 references: {time.perf_counter() - t0:.1f} s; block q/k RMS "
          f"{inputs.get('block', inputs['synthetic'])[0].float().pow(2).mean().sqrt():.3f}", flush=True)

    def errors_of(fn) -> dict[str, float | None]:
        return {name: attempt(f"error on {name}", lambda x=x, name=name: rel_l2(fn(*x)[:, measured], exact[name]))
                for name, x in inputs.items()}

    def sdpa(q, k, v):
        if device == "cuda":
            with cudnn_first():
                return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    for batch in args.batches:
        q, k, v = synthetic_inputs(batch, heads, length, head_dim, device, seed=batch)
        flops = 4 * batch * heads * length * length * head_dim
        print(f"\n[{batch}, {heads}, {length}, {head_dim}]", flush=True)
        table = Table(flops, device == "cuda")
        first = batch == args.batches[0]
        table.add("bf16 SDPA (cuDNN first)", attempt("sdpa", lambda: timed(lambda: sdpa(q, k, v))),
                  errors_of(sdpa) if first else {})
        modes = [("sage8", fp8)] + ([("sage8-fp16", False)] if fp8 else [])
        chosen = {}
        for name, fp8_pv in modes:
            def ours(q, k, v, fp8_pv=fp8_pv):
                return sa.sage_attention(q, k, v, fp8_pv=fp8_pv)

            started = time.perf_counter()
            attempt(f"{name} first call", lambda: ours(q, k, v))
            chosen[name] = dict(sa.last_config)
            print(f"  ({name} first call, autotuning included: {time.perf_counter() - started:.1f} s; chose "
                  f"{chosen[name]})", flush=True)
            detail = f"P·V {'e4m3' if fp8_pv else 'fp16'}, k scales per {sa.default_k_rows(fp8_pv)}"
            table.add(f"{name} ({detail}; quantize + attention)", attempt(name, lambda: timed(lambda: ours(q, k, v))),
                      errors_of(ours) if first else {})
            operands = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv)
            table.add("  quantization pass alone", attempt("quantize", lambda: timed(
                lambda: sa.quantize_operands(q, k, v, fp8_pv=fp8_pv))), {})
            table.add(f"  attention kernel alone ({chosen[name].get('kernel')})", attempt("attend", lambda: timed(
                lambda: sa.attend(operands, q.dtype))), {})
            if chosen[name].get("kernel") == "gluon":
                out = torch.empty((batch, length, heads, head_dim), dtype=q.dtype, device=device)
                for stages in (2, 3, 4):
                    table.add(f"  gluon kernel, {stages} stages",
                              attempt(f"gluon {stages}", lambda stages=stages: timed(
                                  lambda: hopper_kernel.launch(operands, out, stages=stages))), {})
                # The kernel's switches, each turned to its other side alone: P's row sums as a wgmma of P and ones
                # instead of the softmax's additions; block j-1's P·V during block j's softmax.
                others = [("row sums " + ("in the softmax" if hopper_kernel.ROW_SUMS_ON_TENSOR_CORES else
                                          "on the tensor cores"),
                           dict(row_sums_on_tensor_cores=not hopper_kernel.ROW_SUMS_ON_TENSOR_CORES)),
                          ("P·V " + ("after" if hopper_kernel.PV_DURING_SOFTMAX else "during") + " the softmax",
                           dict(pv_during_softmax=not hopper_kernel.PV_DURING_SOFTMAX)),
                          ("consumers " + ("not " if hopper_kernel.CONSUMERS_TAKE_TURNS else "") + "taking turns",
                           dict(turns=not hopper_kernel.CONSUMERS_TAKE_TURNS)),
                          ("P·V during the softmax, consumers "
                           + ("not " if hopper_kernel.CONSUMERS_TAKE_TURNS else "") + "taking turns",
                           dict(pv_during_softmax=True, turns=not hopper_kernel.CONSUMERS_TAKE_TURNS))]
                # Ring depths of both schedules, with and without turns (timings only).
                depths = [(f"P·V {'during' if pv else 'after'} the softmax{', turns' if turns else ''}, "
                           f"{stages} stages", dict(pv_during_softmax=pv, turns=turns, stages=stages))
                          for pv, depths in ((False, (3, 4)), (True, (3, 4, 5))) for turns in (False, True)
                          for stages in depths]
                for label, switches in depths:
                    table.add(f"  gluon kernel, {label}", attempt(f"gluon {label}", lambda switches=switches: timed(
                        lambda: hopper_kernel.launch(operands, out, **switches))), {})
                for label, switches in others:
                    def switched(q, k, v, switches=switches):
                        quantized = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv)
                        result = torch.empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]), dtype=q.dtype,
                                             device=q.device)
                        hopper_kernel.launch(quantized, result, **switches)
                        return result.transpose(1, 2)

                    table.add(f"  gluon kernel, {label}", attempt(f"gluon {label}", lambda switches=switches: timed(
                        lambda: hopper_kernel.launch(operands, out, **switches))),
                        errors_of(switched) if first else {})
                # The Triton-language kernel beside it, autotuned, on keys in token order (its own); its choice is
                # what the rows below pin.
                operands = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv, permute_keys=False)
                table.add("  attention kernel alone (triton, autotuned)", attempt("attend triton", lambda: timed(
                    lambda: sa._launch_attention(operands, q.dtype, kernel="triton"))), {})
                chosen[name] = dict(sa.last_config)
            if not first or args.no_variants or device == "cpu":
                continue
            tma = bool(chosen[name].get("tma"))
            listed = [{**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                      for cfg in (sa._TMA_CONFIGS if tma else sa._POINTER_CONFIGS)]
            for pinned in listed + args.configs:
                for scores in args.scores:
                    label = (f"  kernel {pinned['BLOCK_M']}x{pinned['BLOCK_N']} w{pinned['num_warps']} "
                             f"s{pinned['num_stages']}" + (f" r{pinned['maxnreg']}" if "maxnreg" in pinned else "")
                             + f"{' tma' if tma else ''} scores {SCORE_NAMES[scores]}")
                    table.add(label, attempt(label, lambda pinned=pinned, scores=scores: timed(
                        lambda: sa._launch_attention(operands, q.dtype, config=pinned, tma=tma, scores=scores))), {})

        if first and not args.no_variants:
            # At sage8's chosen config (the interpreter's own on the CPU): one change each.
            best = {key: value for key, value in chosen["sage8"].items() if key in ("BLOCK_M", "BLOCK_N", "num_warps",
                                                                                    "num_stages")}
            tma = bool(chosen["sage8"].get("tma"))

            def variant(label, fp8_pv=fp8, k_rows=None, split=None, use_tma=tma, scores=None):
                def run(q, k, v):
                    ops = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv, k_rows=k_rows)
                    return sa._launch_attention(ops, q.dtype, config=best, tma=use_tma, split_accumulator=split,
                                                scores=scores)
                table.add(label, attempt(label, lambda: timed(lambda: run(q, k, v))), errors_of(run))

            for scores in args.scores:
                if scores != sa.SCORES_DEFAULT:
                    variant(f"  variant: scores {SCORE_NAMES[scores]}", scores=scores)

            if fp8:
                variant("  variant: e4m3, k scales per token", k_rows=1)
                variant("  variant: e4m3, one accumulator across key blocks", split=False)
            variant("  variant: fp16 P·V, k scales per 128 tokens", fp8_pv=False, k_rows=128)
            if tma:
                variant("  variant: pointer loads (no TMA)", use_tma=False)

        if device == "cuda":
            from kontext_core.compute import fp8_attention as fa

            if fa.available():
                table.add("cudnn-fp8 (kontext_core/compute/fp8_attention.py)",
                          attempt("cudnn-fp8", lambda: timed(lambda: fa.fp8_attention(q, k, v))),
                          errors_of(fa.fp8_attention) if first else {})
        if sageattn is not None:
            def pypi(q, k, v):
                return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
            table.add(f"SageAttention {sage_version} (PyPI)", attempt("sageattention", lambda: timed(
                lambda: pypi(q, k, v))), errors_of(pypi) if first else {})
        if first:
            print("\n" + table.markdown(list(inputs)), flush=True)


if __name__ == "__main__":
    main()
