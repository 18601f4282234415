"""cuDNN's bf16 attention at the edit workload's shape, every execution plan cuDNN offers, on a CUDA GPU.

    python3 bench/attention/attention_plans.py

PyTorch's SDPA takes the first plan of cuDNN's heuristic. Through the cuDNN frontend (the package the fp8
attention uses) this builds the same bf16 graph with each attention implementation cuDNN has (AUTO,
COMPOSITE, UNIFIED), builds every plan of each, and times them against SDPA, with the error of each
against SDPA's output. It also times SDPA right after three of the step's MLP GEMMs, as it runs in the
model, to see how much of attention's lower rate inside the step is the GPU's clock after the GEMMs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from bench_step import cuda_time  # noqa: E402
from random_weights import rel_l2  # noqa: E402

from kontext_core.compute import fp8_attention  # noqa: E402
from kontext_core.compute.attention import cudnn_first  # noqa: E402

TOKENS, HEADS, HEAD_DIM = 8704, 24, 128
FLOPS = 4 * TOKENS * TOKENS * HEADS * HEAD_DIM


def attention_inputs() -> list[torch.Tensor]:
    """q, k, v [1, H, L, D] laid out [1, L, H, D] in memory, as the QK-norm kernel writes them."""
    return [torch.randn(1, TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(3)]


def frontend_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, expected: torch.Tensor) -> None:
    cudnn = fp8_attention._import_cudnn()
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    bf16, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
    out = torch.empty(1, TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pack = {1: q.data_ptr(), 2: k.data_ptr(), 3: v.data_ptr(), 4: out.data_ptr()}
    for implementation in ("AUTO", "COMPOSITE", "UNIFIED"):
        try:
            graph = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
            tensors = [graph.tensor(uid=uid, dim=tuple(t.shape), stride=tuple(t.stride()), data_type=bf16)
                       for uid, t in ((1, q), (2, k), (3, v))]
            o, _ = graph.sdpa(q=tensors[0], k=tensors[1], v=tensors[2], attn_scale=1.0 / math.sqrt(HEAD_DIM),
                              generate_stats=False, use_causal_mask=False,
                              implementation=getattr(cudnn.attention_implementation, implementation), name="sdpa")
            o.set_uid(4).set_output(True).set_dim(tuple(out.shape)).set_stride(tuple(out.stride())).set_data_type(bf16)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans(cudnn.build_plan_policy.ALL)
            count = graph.get_execution_plan_count()
        except Exception as error:  # an implementation this cuDNN lacks for the shape
            print(f"  {implementation}: not built ({type(error).__name__}: {str(error)[:160]})", flush=True)
            continue
        print(f"  {implementation}: {count} plans", flush=True)
        for index in range(count):
            try:
                workspace = torch.empty(max(graph.get_workspace_size_plan_at_index(index), 1), dtype=torch.uint8,
                                        device="cuda")

                def run(index=index, workspace=workspace):
                    graph.execute_plan_at_index(pack, workspace.data_ptr(), index, handle=handle)
                run()
                torch.cuda.synchronize()
                error = rel_l2(out, expected)
                seconds = cuda_time(run, warmup=3, iterations=20, repeat=5)
                print(f"    plan {index} {graph.get_plan_name_at_index(index)[:60]:60s} {seconds * 1e3:7.3f} ms "
                      f"{FLOPS / seconds / 1e12:5.0f} TFLOP/s  rel. L2 vs SDPA {error:.1e}", flush=True)
            except Exception as error:
                print(f"    plan {index}: failed ({type(error).__name__}: {str(error)[:160]})", flush=True)


def after_gemms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """SDPA's own time when three 8704x3072->12288 GEMMs ran just before it, as in the model, vs back to back."""
    x = torch.randn(TOKENS, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(12288, 3072, device="cuda", dtype=torch.bfloat16) * 3072**-0.5
    for label, gemms in (("back to back", 0), ("after 3 GEMMs", 3)):
        times = []
        for _ in range(30):
            for _ in range(gemms):
                F.linear(x, w)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            F.scaled_dot_product_attention(q, k, v)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        seconds = sorted(times)[len(times) // 2]
        print(f"  SDPA {label:14s} {seconds * 1e3:7.3f} ms  {FLOPS / seconds / 1e12:5.0f} TFLOP/s", flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    q, k, v = attention_inputs()
    with cudnn_first():
        expected = F.scaled_dot_product_attention(q, k, v)
        seconds = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), warmup=3, iterations=20, repeat=5)
        print(f"bf16 attention [1, {HEADS}, {TOKENS}, {HEAD_DIM}], [B, L, H, D] memory:", flush=True)
        print(f"  SDPA, cuDNN first {seconds * 1e3:7.3f} ms  {FLOPS / seconds / 1e12:5.0f} TFLOP/s", flush=True)
        after_gemms(q, k, v)
    frontend_plans(q, k, v, expected)


if __name__ == "__main__":
    main()
