"""The FFN's GEMMs in their candidate forms, timed alone on a CUDA GPU (edit workload, 8704 tokens).

    python3 bench/linear/gemm_variants.py [bf16] [shapes] [qkv] [attention] [fp8] [quantization] [lorafp8]

bf16: GEMM then GELU vs cuBLASLt's GELU epilogue; the single block's linear1 as one GEMM vs two;
its linear2 over a concat vs two accumulating GEMMs. shapes: every bf16 linear of an edit step at its own
shape. qkv: the qkv projections (3072 -> 9216, the step's slowest large GEMMs) in the forms cuBLAS
might run faster: without the bias (which the QK-norm kernel could add), weight stored transposed,
output transposed, per projection, under either cuBLAS library. attention: cuDNN's attention over [B, H, L, D] vs
[B, L, H, D] inputs. fp8: torch._scaled_mm with per-row/per-token
scales vs per-tensor scales, each with and without fast accumulation; the fp8 path's activation
quantizers (kontext_kernels/row_quant.py) vs the compiler's fusion of their references. lorafp8 (not in the
default set): an fp8 layer with a LoRA on the fly as the model runs it vs the LoRA as extra K columns of the
layer's GEMM. Prints ms and TFLOP/s (TB/s for the quantizers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from bench_step import cuda_time  # noqa: E402
from random_weights import rel_l2  # noqa: E402

TOKENS, HIDDEN, MLP = 8704, 3072, 12288


def report(label: str, flops: float, fn) -> float:
    seconds = cuda_time(fn, warmup=3, iterations=20)
    print(f"  {label:58s} {seconds * 1e3:7.3f} ms  {flops / seconds / 1e12:6.0f} TFLOP/s", flush=True)
    return seconds


def kernel_names(fn) -> str:
    """The GPU kernels one call launches (to see whether a variant adds copies or separate passes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return ", ".join(e.name[:48] for e in prof.events() if e.device_type.name == "CUDA")


def bf16_variants() -> None:
    dtype, dev = torch.bfloat16, "cuda"
    x = torch.randn(TOKENS, HIDDEN, device=dev, dtype=dtype)
    w1 = torch.randn(3 * HIDDEN + MLP, HIDDEN, device=dev, dtype=dtype) * HIDDEN**-0.5
    b1 = torch.randn(3 * HIDDEN + MLP, device=dev, dtype=dtype)
    w_mlp, b_mlp = w1[3 * HIDDEN:], b1[3 * HIDDEN:]
    print("bf16, MLP up-projection 3072 -> 12288:")
    flops = 2 * TOKENS * HIDDEN * MLP
    report("F.linear", flops, lambda: F.linear(x, w_mlp, b_mlp))
    report("F.linear + F.gelu(tanh)", flops, lambda: F.gelu(F.linear(x, w_mlp, b_mlp), approximate="tanh"))
    report("torch._addmm_activation(use_gelu)", flops,
           lambda: torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True))
    print("bf16, single block linear1 3072 -> 9216 + 12288:")
    flops = 2 * TOKENS * HIDDEN * (3 * HIDDEN + MLP)
    report("one GEMM + split + gelu", flops,
           lambda: F.gelu(F.linear(x, w1, b1)[:, 3 * HIDDEN:], approximate="tanh"))
    report("two GEMMs, GELU epilogue", flops,
           lambda: (F.linear(x, w1[:3 * HIDDEN], b1[:3 * HIDDEN]),
                    torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True)))
    attn = torch.randn(TOKENS, HIDDEN, device=dev, dtype=dtype)

    def wide(x, attn):
        qkv, mlp = F.linear(x, w1, b1).split([3 * HIDDEN, MLP], dim=-1)
        return qkv, torch.cat((attn, F.gelu(mlp, approximate="tanh")), -1)

    def split(x, attn):
        qkv = F.linear(x, w1[:3 * HIDDEN], b1[:3 * HIDDEN])
        return qkv, torch.cat((attn, torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True)), -1)

    def split_plain(x, attn):
        qkv = F.linear(x, w1[:3 * HIDDEN], b1[:3 * HIDDEN])
        return qkv, torch.cat((attn, F.gelu(F.linear(x, w_mlp, b_mlp), approximate="tanh")), -1)

    flops = 2 * TOKENS * HIDDEN * (3 * HIDDEN + MLP)
    for label, fn in (("compiled: one GEMM, GELU fused into the concat", wide),
                      ("compiled: two GEMMs, GELU epilogue, then the concat", split),
                      ("compiled: two plain GEMMs, GELU fused into the concat", split_plain)):
        compiled = torch.compile(fn, fullgraph=True)
        report(label, flops, lambda: compiled(x, attn))
    buffer = torch.empty(TOKENS, HIDDEN + MLP, device=dev, dtype=dtype)

    def into_buffer(x, attn):
        # The GELU GEMM writes its columns of linear2's input in place (a strided out=), the attention
        # output is copied beside them: no concatenation of the 12288-wide part.
        qkv = F.linear(x, w1[:3 * HIDDEN], b1[:3 * HIDDEN])
        torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True, out=buffer[:, HIDDEN:])
        buffer[:, :HIDDEN].copy_(attn)
        return qkv, buffer

    expected = split(x, attn)[1]
    error = rel_l2(into_buffer(x, attn)[1], expected)
    print(f"  (GEMM into the buffer vs concat: relative L2 {error:.1e}; "
          f"kernels: {kernel_names(lambda: into_buffer(x, attn))})")
    report("eager: two GEMMs, the GELU one into linear2's input buffer", flops, lambda: into_buffer(x, attn))
    report("eager: two GEMMs, GELU epilogue, then the concat", flops, lambda: split(x, attn))
    print("bf16, single block linear2 (3072 + 12288) -> 3072:")
    mlp = torch.randn(TOKENS, MLP, device=dev, dtype=dtype)
    w2 = torch.randn(HIDDEN, HIDDEN + MLP, device=dev, dtype=dtype) * (HIDDEN + MLP) ** -0.5
    b2 = torch.randn(HIDDEN, device=dev, dtype=dtype)
    flops = 2 * TOKENS * (HIDDEN + MLP) * HIDDEN
    report("cat + GEMM", flops, lambda: F.linear(torch.cat((attn, mlp), -1), w2, b2))
    joined = torch.cat((attn, mlp), -1)
    report("GEMM alone over an already concatenated input", flops, lambda: F.linear(joined, w2, b2))
    report("two GEMMs over weight column slices (addmm)", flops,
           lambda: torch.addmm(F.linear(mlp, w2[:, HIDDEN:], b2), attn, w2[:, :HIDDEN].t()))


def model_shapes() -> None:
    """Every bf16 linear of one edit step at its own shape (F.linear with bias): where the GEMM time goes."""
    dev, dtype = "cuda", torch.bfloat16
    image, text, joint = 8192, 512, TOKENS
    double, single = 19, 38
    # (label, rows, in, out, calls per step, GELU epilogue)
    shapes = [("double img qkv", image, HIDDEN, 3 * HIDDEN, double, False),
              ("double img proj", image, HIDDEN, HIDDEN, double, False),
              ("double img mlp up (GELU epilogue)", image, HIDDEN, MLP, double, True),
              ("double img mlp down", image, MLP, HIDDEN, double, False),
              ("double txt qkv", text, HIDDEN, 3 * HIDDEN, double, False),
              ("double txt proj", text, HIDDEN, HIDDEN, double, False),
              ("double txt mlp up (GELU epilogue)", text, HIDDEN, MLP, double, True),
              ("double txt mlp down", text, MLP, HIDDEN, double, False),
              ("single linear1 qkv part", joint, HIDDEN, 3 * HIDDEN, single, False),
              ("single linear1 mlp part (GELU epilogue)", joint, HIDDEN, MLP, single, True),
              ("single linear2", joint, HIDDEN + MLP, HIDDEN, single, False),
              ("double modulation (x2 streams)", 1, HIDDEN, 6 * HIDDEN, 2 * double, False),
              ("single modulation", 1, HIDDEN, 3 * HIDDEN, single, False)]
    total = 0.0
    print("bf16 linears of one edit step (F.linear with bias; ms per call, ms per step):")
    for label, rows, k, n, calls, gelu in shapes:
        x = torch.randn(rows, k, device=dev, dtype=dtype)
        w = torch.randn(n, k, device=dev, dtype=dtype) * k**-0.5
        b = torch.randn(n, device=dev, dtype=dtype)
        fn = ((lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)) if gelu
              else (lambda: F.linear(x, w, b)))
        seconds = cuda_time(fn, warmup=3, iterations=20, repeat=10, graphed=True)
        total += seconds * calls
        print(f"  {label:42s} {rows:5d}x{k:5d}->{n:5d} {seconds * 1e3:7.3f} ms  "
              f"{2 * rows * k * n / seconds / 1e12:5.0f} TFLOP/s  x{calls} = {seconds * calls * 1e3:6.1f} ms",
              flush=True)
    print(f"  all linears of a step: {total * 1e3:.1f} ms", flush=True)


def qkv_forms() -> None:
    """The qkv projections in other forms of the same product, to find one cuBLAS runs nearer its peak."""
    dev, dtype = "cuda", torch.bfloat16
    n = 3 * HIDDEN
    for rows in (TOKENS, 8192):
        x = torch.randn(rows, HIDDEN, device=dev, dtype=dtype)
        w = torch.randn(n, HIDDEN, device=dev, dtype=dtype) * HIDDEN**-0.5
        b = torch.randn(n, device=dev, dtype=dtype)
        w_t = w.t().contiguous()
        wide = torch.randn(n + MLP, HIDDEN, device=dev, dtype=dtype) * HIDDEN**-0.5
        flops = 2 * rows * HIDDEN * n
        print(f"bf16 qkv projection {rows}x{HIDDEN}->{n} (graphed, ms per call):")
        forms = [("F.linear with bias (as the step runs it)", lambda: F.linear(x, w, b)),
                 ("mm without bias", lambda: torch.mm(x, w.t())),
                 ("mm, weight stored [in, out]", lambda: torch.mm(x, w_t)),
                 ("mm, output transposed (w @ x^T)", lambda: torch.mm(w, x.t())),
                 ("three mms, one per projection", lambda: [torch.mm(x, w[i * HIDDEN:(i + 1) * HIDDEN].t())
                                                            for i in range(3)])]
        for label, fn in forms:
            for library in ("cublaslt", "cublas"):
                torch.backends.cuda.preferred_blas_library(library)
                seconds = cuda_time(fn, warmup=3, iterations=20, repeat=10, graphed=True)
                print(f"  {label:44s} [{library:8s}] {seconds * 1e3:7.3f} ms  {flops / seconds / 1e12:5.0f} TFLOP/s",
                      flush=True)
            torch.backends.cuda.preferred_blas_library("default")
        wide_flops = 2 * rows * HIDDEN * (n + MLP)
        seconds = cuda_time(lambda: torch.mm(x, wide.t()), warmup=3, iterations=20, repeat=10, graphed=True)
        print(f"  (reference: the whole linear1 {HIDDEN}->{n + MLP}, mm: {seconds * 1e3:.3f} ms, "
              f"{wide_flops / seconds / 1e12:.0f} TFLOP/s)", flush=True)


def attention_layouts() -> None:
    """cuDNN attention over q, k, v as [B, H, L, D] tensors vs [B, L, H, D] ones viewed so: the second gives
    an output whose [B, L, H*D] view needs no copy."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dtype, heads, dim = "cuda", torch.bfloat16, 24, 128
    flops = 4 * TOKENS * TOKENS * heads * dim
    bhld = [torch.randn(1, heads, TOKENS, dim, device=dev, dtype=dtype) for _ in range(3)]
    blhd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in bhld]
    print("cuDNN attention, 8704 tokens, 24 heads of 128:")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for label, (q, k, v) in (("q, k, v [B, H, L, D]", bhld), ("q, k, v [B, L, H, D] (transposed views)", blhd)):
            out = F.scaled_dot_product_attention(q, k, v)
            report(f"{label}: out strides {tuple(out.stride())}", flops,
                   lambda: F.scaled_dot_product_attention(q, k, v))
            seconds = cuda_time(lambda: out.transpose(1, 2).reshape(1, TOKENS, heads * dim), warmup=3,
                                iterations=20, repeat=10, graphed=True)
            print(f"    then [B, L, H*D]: {seconds * 1e6:.1f} us", flush=True)
        error = rel_l2(F.scaled_dot_product_attention(*blhd), F.scaled_dot_product_attention(*bhld))
        print(f"  the two layouts' outputs differ by relative L2 {error:.1e}", flush=True)


def fp8_variants() -> None:
    e4m3 = torch.float8_e4m3fn
    dev = "cuda"
    for k, n in ((HIDDEN, MLP), (HIDDEN + MLP, HIDDEN), (HIDDEN, 3 * HIDDEN + MLP)):
        print(f"fp8 e4m3, {k} -> {n}:")
        a = torch.randn(TOKENS, k, device=dev).to(e4m3)
        b = (torch.randn(n, k, device=dev) * 0.5).to(e4m3).t()
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
        flops = 2 * TOKENS * k * n
        row_a, row_b = torch.rand(TOKENS, 1, device=dev) + 0.5, torch.rand(1, n, device=dev) + 0.5
        one = torch.ones((), device=dev)
        for fast in (False, True):
            report(f"per-token x per-row scales, fast_accum={fast}", flops,
                   lambda: torch._scaled_mm(a, b, scale_a=row_a, scale_b=row_b, bias=bias, out_dtype=torch.bfloat16,
                                            use_fast_accum=fast))
            report(f"per-tensor scales, fast_accum={fast}", flops,
                   lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, bias=bias, out_dtype=torch.bfloat16,
                                            use_fast_accum=fast))


def fp8_lora_variants(rank: int = 32) -> None:
    """An fp8 layer with a LoRA on the fly: the layer's GEMM alone; as the model runs it now (plus an fp8
    down-projection and the up-projection accumulated in place); and as extra K columns of the layer's own
    GEMM ([x | x.D] against [W | U] in e4m3), with both operands contiguous and as views of wider buffers
    (row stride K + R, what the weight and the quantizers' output would be), if cuBLAS takes them."""
    e4m3, bf16, dev = torch.float8_e4m3fn, torch.bfloat16, "cuda"
    for k, n in ((HIDDEN, 3 * HIDDEN), (HIDDEN, MLP), (HIDDEN + MLP, HIDDEN), (HIDDEN, 3 * HIDDEN + MLP)):
        print(f"fp8 e4m3 {k} -> {n}, rank-{rank} LoRA:")
        wide_a = torch.randn(TOKENS, k + rank, device=dev).to(e4m3)
        wide_w = (torch.randn(n, k + rank, device=dev) * 0.5).to(e4m3)
        a, w = wide_a[:, :k].contiguous(), wide_w[:, :k].contiguous()
        down = (torch.randn(rank, k, device=dev) * 0.5).to(e4m3)
        up = torch.randn(n, rank, device=dev, dtype=bf16) * 0.01
        bias = torch.randn(n, device=dev, dtype=bf16)
        row_a, row_b = torch.rand(TOKENS, 1, device=dev) + 0.5, torch.rand(1, n, device=dev) + 0.5
        ones_r = torch.ones(1, rank, device=dev)
        flops = 2 * TOKENS * k * n

        def layer(a=a, w=w):
            return torch._scaled_mm(a, w.t(), scale_a=row_a, scale_b=row_b, bias=bias, out_dtype=bf16,
                                    use_fast_accum=True)

        def with_lora_now():
            out = layer()
            low = torch._scaled_mm(a, down.t(), scale_a=row_a, scale_b=ones_r, out_dtype=bf16)
            return out.addmm_(low, up.t())

        report("layer GEMM alone", flops, layer)
        report("+ LoRA as run now (fp8 down GEMM, up accumulated in place)", flops, with_lora_now)
        report("LoRA as K columns, contiguous [N, K+R] x [M, K+R]", flops, lambda: layer(wide_a, wide_w))
        try:
            strided = layer(wide_a[:, :k], wide_w[:, :k])
            same = torch.equal(strided, layer())
            report(f"layer GEMM over views with row stride K+R (same result: {same})", flops,
                   lambda: layer(wide_a[:, :k], wide_w[:, :k]))
        except RuntimeError as error:
            print(f"  views with row stride K+R refused: {str(error)[:120]}", flush=True)


def fp8_quantization_variants() -> None:
    """The fp8 path's activation quantizers: our row kernels vs the compiler's fusion of the references."""
    from kontext_kernels import row_quant

    dev, dtype = "cuda", torch.bfloat16
    x = torch.randn(1, TOKENS, HIDDEN, device=dev, dtype=dtype)
    shift, scale = torch.randn(2, 1, 1, HIDDEN, device=dev, dtype=dtype)
    wide = torch.randn(1, TOKENS, 3 * HIDDEN + MLP, device=dev, dtype=dtype)[..., 3 * HIDDEN:]
    cases = {"quantize_rows": (x,), "gelu_quantize_rows": (wide,), "concat_gelu_quantize_rows": (x, wide),
             "layernorm_modulate_quantize": (x, shift, scale)}
    print("fp8 activation quantization (reads bf16, writes e4m3 + row scales):")
    for name, args in cases.items():
        rows_in = args if name == "concat_gelu_quantize_rows" else args[:1]
        moved = sum(a.numel() for a in rows_in) * 3  # 2 bytes of bf16 read, 1 of e4m3 written
        for label, fn in (("kernel", getattr(row_quant, name)),
                          ("compiled reference", torch.compile(getattr(row_quant, name + "_reference")))):
            seconds = cuda_time(lambda: fn(*args), warmup=3, iterations=20, repeat=10, graphed=True)
            print(f"  {name:28s} {label:20s} {seconds * 1e6:8.1f} us  {moved / seconds / 1e12:5.2f} TB/s",
                  flush=True)


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    sections = sys.argv[1:] or ["bf16", "shapes", "qkv", "attention", "fp8", "quantization"]
    if "bf16" in sections:
        bf16_variants()
    if "shapes" in sections:
        model_shapes()
    if "qkv" in sections:
        qkv_forms()
    if "attention" in sections:
        attention_layouts()
    if "fp8" in sections:
        fp8_variants()
    if "quantization" in sections:
        fp8_quantization_variants()
    if "lorafp8" in sections:
        for rank in (32, 128):
            fp8_lora_variants(rank)
