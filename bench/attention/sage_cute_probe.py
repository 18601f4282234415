"""sage8's CuTe DSL attention kernel (kontext_kernels/sage_attention_cute.py) against the Gluon kernel it would
replace, sage8's reference and cuDNN's bf16 attention: agreement at awkward sizes, then time at the edit shape.

    python3 bench/attention/sage_cute_probe.py                      # CuTe DSL installed: compiles the kernel here
    python3 bench/attention/sage_cute_probe.py --module sage8.so    # exported ahead of time
                                                                    # (kontext_kernels/cute_runtime.py)

The exported module is what runs on a machine without the DSL's compiler (bench/RESULTS.md says how it was run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from random_weights import rel_l2
from sage_attention_probe import block_inputs, exact_attention, synthetic_inputs

from kontext_core import TransformerConfig
from kontext_kernels import cute_runtime
from kontext_kernels import sage_attention as sa
from kontext_kernels import sage_attention_hopper as gluon_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", nargs="*", default=[],
                        help="exported kernels (.so), each checked and timed (label: the file's name); none: "
                             "the kernel compiled here")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--json", help="write each kernel's times and errors there (and, with --module, the fastest "
                                       "build within the Gluon kernel's error to the same name with .best)")
    args = parser.parse_args()
    from bench_step import cuda_time

    if args.module:
        kernels = {Path(path).stem: cute_runtime.load_module(path) for path in args.module}
    else:
        from kontext_kernels import sage_attention_cute

        kernels = {"compiled here": sage_attention_cute.compiled(128)}

    def cute_attention(kernel, operands, out):
        cute_runtime.launch(operands, out, kernel)
        return out

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    torch.manual_seed(0)
    print("agreement with the Gluon kernel and sage8's reference (relative L2; max abs difference):")
    for batch, heads, length_q, length_k in ((1, 3, 256, 256), (2, 3, 200, 333), (1, 2, 1000, 8704 - 37),
                                             (2, 1, 77, 130), (1, 4, 4608, 4608)):
        q, k, v = (torch.randn(batch, heads, n, 128, device="cuda", dtype=torch.bfloat16) * s
                   for n, s in ((length_q, 1.5), (length_k, 1.5), (length_k, 1.0)))
        k = k + 0.5 * torch.randn(1, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
        operands = sa.quantize_operands(q, k, v, fp8_pv=True, permute_keys=True)
        gluon = torch.empty(batch, length_q, heads, 128, device="cuda", dtype=torch.bfloat16)
        gluon_kernel.launch(operands, gluon)
        reference = sa.attend_reference(operands, torch.bfloat16).transpose(1, 2)
        exact = exact_attention(q, k, v).transpose(1, 2)
        for label, kernel in kernels.items():
            ours = cute_attention(kernel, operands, torch.empty_like(gluon))
            torch.cuda.synchronize()
            print(f"  {label} [{batch}, {heads}, {length_q} x {length_k}]: vs Gluon {rel_l2(ours, gluon):.3e} "
                  f"(max {(ours.float() - gluon.float()).abs().max().item():.3e}), vs reference "
                  f"{rel_l2(ours, reference):.3e}, vs float64 {rel_l2(ours, exact):.3%} "
                  f"(Gluon {rel_l2(gluon, exact):.3%})", flush=True)

    config = TransformerConfig()
    heads, length = config.num_heads, 512 + 2 * 64 * 64
    from kontext_core.compute.attention import cudnn_first

    def timed(fn):
        return 1e3 * cuda_time(fn, warmup=3, iterations=args.iterations, repeat=5)

    # Checked and timed on both inputs: the model's own q, k, v (QK-norm + RoPE of random weights, at a smaller
    # image's token count) and synthetic ones at the edit shape.
    record = {}
    for name, (q, k, v) in (("block", block_inputs(config, 64, 512, "cuda", torch.bfloat16)),
                            ("synthetic", synthetic_inputs(1, heads, length, config.head_dim, "cuda"))):
        operands = sa.quantize_operands(q, k, v, fp8_pv=True, permute_keys=True)
        tokens = q.shape[2]  # the block inputs are a smaller image's (bench/attention/sage_attention_probe.py)
        flops = 4 * heads * tokens * tokens * config.head_dim
        gluon = torch.empty(1, tokens, heads, config.head_dim, device="cuda", dtype=torch.bfloat16)
        exact = exact_attention(*(t[:, :4] for t in (q, k, v))).transpose(1, 2)
        gluon_kernel.launch(operands, gluon)
        outputs = {label: cute_attention(kernel, operands, torch.empty_like(gluon))
                   for label, kernel in kernels.items()}
        errors = {label: rel_l2(out[:, :, :4], exact) for label, out in outputs.items()}
        errors["sage8 Gluon"] = rel_l2(gluon[:, :, :4], exact)
        print(f"\n{name} q, k, v {list(q.shape)}, error vs float64 over 4 heads: "
              + ", ".join(f"{label} {error:.3%}" for label, error in errors.items()), flush=True)

        def sdpa(q=q, k=k, v=v):
            with cudnn_first():
                return F.scaled_dot_product_attention(q, k, v)

        def gluon_call(operands=operands, gluon=gluon):
            gluon_kernel.launch(operands, gluon)

        ours = torch.empty_like(gluon)
        times = {"cuDNN bf16": timed(sdpa), "sage8 Gluon": timed(gluon_call)}
        for label, kernel in kernels.items():
            times[label] = timed(lambda kernel=kernel, operands=operands: cute_attention(kernel, operands, ours))
        times["sage8 Gluon again"] = timed(gluon_call)
        times["cuDNN bf16 again"] = timed(sdpa)
        print(f"kernel alone at [1, {heads}, {tokens}, 128], {name} inputs ({torch.cuda.get_device_name()}):")
        for label, ms in times.items():
            print(f"  {label}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, {times['cuDNN bf16'] / ms:.2f}x cuDNN",
                  flush=True)
        for label, ms in times.items():
            record.setdefault(label, {})[f"{name}_ms"] = ms
            if label in errors:
                record[label][f"{name}_error"] = errors[label]
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
        if args.module:
            fastest = best_build(record, list(kernels))
            print(f"\nfastest build within the Gluon kernel's error (+10%): {fastest}")
            Path(args.json).with_suffix(".best").write_text(fastest)


def best_build(record: dict, labels: list[str]) -> str:
    """The build with the least time at the edit shape (the synthetic inputs) of those whose error against float64 on
    both inputs is within 10% of the Gluon kernel's (else the first)."""
    gluon = record["sage8 Gluon"]
    fair = [label for label in labels
            if all(record[label][f"{inputs}_error"] <= 1.1 * gluon[f"{inputs}_error"] for inputs in ("block",
                                                                                                      "synthetic"))]
    return min(fair, key=lambda label: record[label]["synthetic_ms"]) if fair else labels[0]

if __name__ == "__main__":
    main()
