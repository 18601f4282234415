"""The AE's share of a 1024x1024 edit: encode of the context image and decode of the result, at a few settings.

    python3 bench/pipeline/ae_probe.py            # on a CUDA GPU
    python3 bench/pipeline/ae_probe.py --tiny     # on a CPU: that it runs
    python3 bench/pipeline/ae_probe.py --attention   # the decoder's attention alone, through each SDPA backend

bench_step.py's end-to-end edit is 28 transformer steps plus one AE encode and one AE decode; this times those two
alone (CUDA events, median of 5), in bf16 with random full-size weights, as the pipeline runs them (eager,
contiguous), and in channels-last memory and/or compiled by torch.compile (Autoencoder.compile_parts is the
"compiled" row). Each variant's output is compared with the same weights' float32 eager output (relative L2): a
faster variant that rounds worse than the eager bf16 one would show there.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from random_weights import random_autoencoder, rel_l2  # noqa: E402

from kontext_core.model.autoencoder import AutoencoderConfig  # noqa: E402


def timed(fn, device: str) -> float:
    """Median seconds of one call (one plain call on the CPU)."""
    fn()
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def profile_kernels(fn, label: str, top: int = 8) -> None:
    """GPU time of one call grouped by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            totals[event.name[:80]] = totals.get(event.name[:80], 0.0) + event.device_time / 1e3
    print(f"    {label}: {sum(totals.values()):.1f} ms of GPU time; " + "; ".join(
        f"{ms:.1f} {name}" for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]), flush=True)


def _decoder_attention_operands(ae, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [1, 1, H*W, C] of the decoder's mid-block attention on `latent`, as AttnBlock forms them."""
    block = ae.decoder.mid.attn_1
    seen = []
    handle = block.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    try:
        ae.decode(latent)
    finally:
        handle.remove()
    x = seen[0]
    batch, channels, height, width = x.shape
    h = block.norm(x)
    return tuple(conv(h).reshape(batch, 1, channels, height * width).transpose(-1, -2).contiguous()
                 for conv in (block.q, block.k, block.v))


def attention_backends(ae, latent: torch.Tensor, device: str) -> None:
    """The AE's single 512-wide head through each SDPA backend that takes it, in bf16, against float64; and
    PyTorch's default choice on the strided operands, in the query chunks, that the exact path's AttnBlock hands
    it."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _decoder_attention_operands(ae, latent)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    print(f"decoder attention: q/k/v {list(q.shape)} {q.dtype}")
    print("| SDPA backend | ms | rel L2 vs float64 |\n| --- | ---: | ---: |")
    backends = [("default choice", None), ("math", SDPBackend.MATH), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]
    def tensor_core_matmuls():
        # bf16 products on the tensor cores with float32 outputs (cuBLAS), softmax in float32, P in bf16.
        scores = torch.bmm(q[0], k[0].transpose(-1, -2), out_dtype=torch.float32) * q.shape[-1] ** -0.5
        return torch.bmm(scores.softmax(dim=-1).to(v.dtype), v[0])[None]

    def bf16_scores():
        # The same with the scores rounded to bf16 (the matmul's own output type), softmax in float32.
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.matmul(scores.float().softmax(dim=-1).to(v.dtype), v)

    backends += [("bf16 matmuls, float32 scores", tensor_core_matmuls), ("bf16 matmuls, bf16 scores", bf16_scores)]
    # The exact path's operands: AttnBlock's transposed views, whose strided last dimension the fused kernels
    # refuse, through the block's own attention (query chunks included; the fast preset's fused_attention hands
    # SDPA the contiguous ones above, in one call).
    block = ae.decoder.mid.attn_1
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    assert not block.fused_attention  # the exact path's setting, as random_autoencoder builds it
    backends.insert(1, ("default choice, strided and chunked as the exact path", lambda: block.attend(*strided)))
    for label, backend in backends:
        def call():
            if callable(backend):
                return backend()
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            out = call()
        except (RuntimeError, NotImplementedError) as error:  # the backend refuses this head size or device
            print(f"| {label} | refused: {str(error).splitlines()[0][:100]} | |", flush=True)
            continue
        print(f"| {label} | {timed(call, device) * 1e3:.2f} | {rel_l2(out, exact):.2e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny AE on the CPU: that the probe runs")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--profile", action="store_true", help="each variant's decode, kernel by kernel")
    parser.add_argument("--channels-last", action="store_true",
                        help="also channels-last memory (slower than contiguous on an H200: 88 / 149 ms eager)")
    parser.add_argument("--attention", action="store_true",
                        help="only the decoder's attention, through each SDPA backend, against float64")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = AutoencoderConfig.tiny() if args.tiny else AutoencoderConfig()
    size = 32 if args.tiny else args.size
    ae = random_autoencoder(config, device, dtype)
    image = torch.rand(1, 3, size, size, device=device, dtype=dtype) * 2 - 1
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: AE at {size}x{size}, bf16")

    with torch.no_grad():
        latent = ae.encode(image)
        if args.attention:
            attention_backends(ae, latent, device)
            return
        # The same weights in float32: what each bf16 variant's rounding is measured against.
        exact = copy.deepcopy(ae).float()
        reference = {"encode": exact.encode(image.float()), "decode": exact.decode(latent.float())}
        del exact
        variants = [("eager", False, False)] + ([] if args.tiny else [("compiled", False, True)])
        if args.channels_last:
            variants += [("channels-last", True, False)] + ([] if args.tiny
                                                            else [("channels-last, compiled", True, True)])
        print("| variant | encode ms | decode ms | rel L2 vs float32 (encode / decode) |\n| --- | ---: | ---: | --- |")
        for label, channels_last, compiled in variants:
            memory = torch.channels_last if channels_last else torch.contiguous_format
            ae = ae.to(memory_format=memory)
            encode, decode = ae.encode, ae.decode
            if compiled:
                torch._dynamo.reset()
                ae.compile_parts()
            x = image.contiguous(memory_format=memory)
            z = latent.contiguous(memory_format=memory)
            encoded, decoded = encode(x), decode(z)
            errors = (rel_l2(encoded.float(), reference["encode"]), rel_l2(decoded.float(), reference["decode"]))
            seconds = (timed(lambda: encode(x), device), timed(lambda: decode(z), device))
            print(f"| {label} | {seconds[0] * 1e3:.1f} | {seconds[1] * 1e3:.1f} | "
                  f"{errors[0]:.2e} / {errors[1]:.2e} |", flush=True)
            if args.profile and device == "cuda":
                profile_kernels(lambda: decode(z), f"{label} decode")


if __name__ == "__main__":
    main()
