"""Speed of one Kontext transformer step on a CUDA GPU: ours vs the reference implementations, against the
compute floor.

    python3 bench/bench_step.py --impls ours diffusers --workloads edit t2i [--e2e] [--out DIR]
    python3 bench/bench_step.py --impls ours comfyui --comfyui ~/ComfyUI  # ComfyUI's own FLUX code (comfyui_native.py)
    python3 bench/bench_step.py --impls ours comfyui-fp8scaled comfyui-fp8scaled-fast comfyui-fp8scaled-dequant \
        --comfyui ~/ComfyUI  # ComfyUI loading our weights as flux1-dev-kontext_fp8_scaled.safetensors
    python3 bench/bench_step.py --impls ours bfl --bfl build/bfl          # BFL's reference code (bfl_native.py)

Random weights at full size (bf16). Workloads: edit = 1024x1024 target + one 1024x1024 context + 512
text tokens (8704 tokens); t2i = 1024x1024 + 512 text (4608). The floor is the step's FLOPs divided by
the bf16 matmul rate measured in the same run. Every number of one run comes from the same process.
The reference rows run as their code does (PyTorch's SDPA in its default backend order, flash first);
their `+cudnn` variants put cuDNN's attention first, as ours does, to separate attention from the rest.
The comfyui-fp8scaled rows are what most ComfyUI users run: the fp8-scaled file of ComfyUI's Kontext
template (here: our weights in that layout), loaded by ComfyUI 0.8 into its mixed-precision operations;
"-fast" is ComfyUI started with `--fast`, "-dequant" the same file with its marker asking for full-precision
matmuls (what ComfyUI does on GPUs without fp8 compute). comfyui_native.py says what each computes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))  # the reference twins, imported per row

import kontext_kernels  # noqa: E402
from kontext_kernels import int8_gemm, int8_gemm_hopper, row_quant, sage_attention, sage_attention_hopper  # noqa: E402
from kontext_core.compute import fused, quant  # noqa: E402
from kontext_core import KontextTransformer, TransformerConfig, set_attention_backend  # noqa: E402
from kontext_core.compute import attention as attention_module  # noqa: E402
from kontext_core.compute.attention import flash_attn_variant  # noqa: E402
from kontext_core.checkpoints.key_maps import to_theirs, transformer_links  # noqa: E402
from kontext_core.compute.cuda_graph import GraphedVelocity  # noqa: E402
from kontext_core.pipeline import GenerationSettings, KontextPipeline  # noqa: E402
from kontext_core.presets import PRESETS  # noqa: E402
from kontext_core.sampling import TextConditioning  # noqa: E402
from kontext_core.model.tokens import context_tokens, pack_latent, position_ids, text_position_ids  # noqa: E402
from random_weights import random_autoencoder, randomize_, rel_l2  # noqa: E402

WORKLOADS = {"edit": {"latent": 128, "context": True, "text": 512},
             "t2i": {"latent": 128, "context": False, "text": 512}}


def step_flops(config: TransformerConfig, image_tokens: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of one forward: every block's linears (24 h^2 per token) and attention (4 N^2 h per block)."""
    h, blocks = config.hidden_size, config.depth + config.depth_single_blocks
    tokens = image_tokens + text_tokens
    linear = 24 * h * h * tokens * blocks
    linear += (2 * image_tokens * h * (config.in_channels + config.out_channels)
               + 2 * text_tokens * h * config.context_in_dim)
    attention = 4 * tokens * tokens * h * blocks
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def _plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors holding a tensor's memory: a traceable tensor subclass's inner tensors (ComfyUI's
    QuantizedTensor wraps its fp8 data and scale so), else the tensor itself."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [t for name in names for t in _plain(getattr(tensor, name))]
    return [tensor]


def _cuda_storages(module) -> dict[int, int]:
    if not isinstance(module, torch.nn.Module):
        return {}
    tensors = itertools.chain.from_iterable(_plain(t) for t in itertools.chain(module.parameters(), module.buffers()))
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cuda}


def others_bytes(target, candidates) -> int:
    """GPU bytes of the candidates' parameters and buffers that `target` does not share."""
    own, other = _cuda_storages(target), {}
    for candidate in candidates:
        if candidate is not None and candidate is not target:
            other.update(_cuda_storages(candidate))
    return sum(size for pointer, size in other.items() if pointer not in own)


def cuda_time(fn, warmup: int = 2, iterations: int = 5, repeat: int = 1, graphed: bool = False) -> float:
    """Median seconds of one `fn` call, over CUDA-event-timed iterations of `repeat` calls each.

    A kernel shorter than the host's work to launch it is timed, call by call, with the GPU idle while
    the host launches it (the fp8 row quantizers read 1.5-2x slower so): `graphed` captures the
    `repeat` calls in a CUDA graph once and times its replays, the GPU's time alone.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def calls():
        for _ in range(repeat):
            fn()

    run = calls
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls()
        run = graph.replay
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / repeat)
    return statistics.median(times)


def matmul_rate(m: int = 8192, n: int = 8192, k: int = 8192) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    seconds = cuda_time(lambda: a @ b, warmup=3, iterations=10)
    return 2 * m * n * k / seconds


def attention_rates(tokens: int, config: TransformerConfig) -> tuple[float, float, str]:
    """SDPA alone at the workload's shape: FLOP/s in our order (cuDNN first), FLOP/s in PyTorch's default order
    and that order's kernel (what the reference rows get unless "+cudnn")."""
    from torch.nn.functional import scaled_dot_product_attention
    from torch.profiler import ProfilerActivity, profile

    from kontext_core.compute.attention import cudnn_first

    q, k, v = (torch.randn(1, config.num_heads, tokens, config.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    flops = 4 * tokens * tokens * config.hidden_size

    def call():
        return scaled_dot_product_attention(q, k, v)

    with cudnn_first():
        ours = cuda_time(call, warmup=3, iterations=10)
    default = cuda_time(call, warmup=3, iterations=10)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels_run = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernel = max(kernels_run, key=lambda e: e.device_time).name[:60] if kernels_run else "unknown"
    return flops / ours, flops / default, kernel


# How random weights are drawn: "fan-in" (std 1/sqrt(fan_in), activations O(1) through every layer) or "std0.02"
# (every matrix at std 0.02, as transformer training starts: small activations, larger relative rounding).
WEIGHT_INIT = os.environ.get("KONTEXT_BENCH_INIT", "fan-in")


def random_transformer(config: TransformerConfig) -> KontextTransformer:
    """Full-size model with random weights (WEIGHT_INIT), norms at 1."""
    with torch.device("meta"):
        model = KontextTransformer(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    randomize_(model, torch.Generator(device="cuda").manual_seed(0), WEIGHT_INIT)
    return model.eval().requires_grad_(False)


def diffusers_twin(model: KontextTransformer):
    """diffusers' FluxTransformer2DModel sharing our weights (converted by our key map)."""
    from diffusers import FluxTransformer2DModel

    c = model.config
    with torch.device("meta"):
        twin = FluxTransformer2DModel(
            patch_size=1, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
            num_single_layers=c.depth_single_blocks, attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
            joint_attention_dim=c.context_in_dim, pooled_projection_dim=c.vec_in_dim,
            guidance_embeds=c.guidance_embed, axes_dims_rope=list(c.axes_dim))
    ours = model.state_dict()
    state = {}
    for link in transformer_links(c):
        state.update({k: v.contiguous()
                      for k, v in to_theirs(link, ours[link.ours], lambda n, t: tuple(t.shape)).items()})
    twin.load_state_dict(state, assign=True, strict=True)
    return twin.eval().requires_grad_(False)


def inputs(config: TransformerConfig, workload: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = workload["latent"]
    dev = "cuda"

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dev, torch.bfloat16)

    data = {
        "img": pack_latent(randn(1, 16, side, side)), "img_ids": position_ids(side, side, device=dev),
        "txt": randn(1, workload["text"], config.context_in_dim),
        "txt_ids": text_position_ids(1, workload["text"], device=dev),
        # t and guidance exact after diffusers' bf16 rounding of t*1000 and g*1000, so the check compares models.
        "t": torch.tensor([0.5], device=dev), "y": randn(1, config.vec_in_dim), "g": torch.tensor([4.0], device=dev),
        "ctx": None, "ctx_ids": None,
    }
    if workload["context"]:
        data["ctx"], data["ctx_ids"] = context_tokens([randn(1, 16, side, side)], (side, side), "kontext")
    return data


def ours_step(model: KontextTransformer, x: dict, graphed: bool = False, modulation_table: bool = False,
              frozen_statistics: bool = False):
    velocity = model.velocity
    if graphed:
        velocity = GraphedVelocity(model)
        if (reason := velocity.prepare()) is not None:
            raise RuntimeError(f"+graphs: this model cannot be replayed: {reason}")
    extra = ()
    if modulation_table:
        # A 28-step run's table whose first row is this step's t, so that the row's output compares with the others.
        times = torch.cat((x["t"][:1].float(), torch.linspace(0.96, 0.04, 27, device=x["t"].device)))
        with torch.no_grad():
            made = cuda_time(lambda: model.modulation_table(times, x["y"], x["g"]), warmup=1, iterations=3)
            extra = (model.modulation_table(times, x["y"], x["g"])[0],)
        print(f"    modulation table for 28 steps: {made * 1e3:.1f} ms once a run", flush=True)
    mode = "off"
    if frozen_statistics:
        # Recorded on another input, as a run records on an earlier step: the latent plus 30% noise, at t = 0.6.
        generator = torch.Generator(device=x["img"].device).manual_seed(1)
        earlier = x["img"] + 0.3 * torch.randn(x["img"].shape, generator=generator, device=x["img"].device,
                                               dtype=x["img"].dtype)
        attention_module.forget_frozen_statistics()
        with torch.no_grad(), attention_module.frozen_statistics("record"):
            model.velocity(earlier, x["img_ids"], x["txt"], x["txt_ids"], torch.full_like(x["t"], 0.6), x["y"], x["g"],
                           x["ctx"], x["ctx_ids"], *extra)
        mode = "reuse"

    def step():
        with attention_module.frozen_statistics(mode):
            return velocity(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"],
                            x["ctx"], x["ctx_ids"], *extra)

    return step


def diffusers_step(twin, x: dict):
    img = x["img"] if x["ctx"] is None else torch.cat([x["img"], x["ctx"]], 1)
    ids = x["img_ids"][0] if x["ctx"] is None else torch.cat([x["img_ids"], x["ctx_ids"]], 1)[0]
    n = x["img"].shape[1]
    return lambda: twin(hidden_states=img, encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                        timestep=x["t"].to(torch.bfloat16), img_ids=ids, txt_ids=x["txt_ids"][0],
                        guidance=x["g"].to(torch.bfloat16), return_dict=False)[0][:, :n]


IMPLS = ("ours", "ours-kernels", "ours-rowkernels", "ours-compiled", "ours-fp8", "ours-fp8-kernels",
         "ours-fp8-compiled", "ours-int8-rowkernels", "ours-int8-compiled", "diffusers", "diffusers-compiled",
         "comfyui", "comfyui-compiled", "comfyui-fp8scaled", "comfyui-fp8scaled-compiled", "comfyui-fp8scaled-fast",
         "comfyui-fp8scaled-fast-compiled", "comfyui-fp8scaled-dequant", "comfyui-fp8scaled-dequant-compiled", "bfl",
         "bfl-compiled")
MODIFIERS = {
    "noepilogues": "GELU as its own pass, not in cuBLASLt's epilogue; the single block's linear2 over a concatenation",
    "exactaccum": "fp8 GEMMs without fast accumulation",
    "nokernels": "compiled blocks without our QK-norm+RoPE kernel (the compiler's own fusion)",
    "fp8attention": "attention through cuDNN's fp8 graph (needs nvidia-cudnn-frontend)",
    "sage8": "attention through our 8-bit Triton kernel (kontext_kernels/sage_attention.py; int8 q.k, e4m3 P.V); "
             "with ours-int8-compiled+graphs it is the fast preset",
    "sage8fp16": "attention through our 8-bit Triton kernel with fp16 P.V",
    "convertedscores": "with +sage8: the kernel's scores by a conversion instruction per score "
                       "(kontext_kernels/sage_attention.py, SCORES_CONVERT; default: SCORES_FOLDED)",
    "tritongemm": "int8 GEMMs on Hopper by the Triton-language kernel (kontext_kernels/int8_gemm.py), not the "
                  "warp-specialised Gluon one (kontext_kernels/int8_gemm_hopper.py)",
    "fusedqkv": "with +sage8: q's int8 rows and K/V's column statistics made in the QK-norm + RoPE pass "
                "(kontext_kernels/sage_qkv.py), not by separate passes",
    "tanhgelu": "int8/fp8 rows: the row quantizers' GELU through the GPU's tanh.approx (kontext_kernels/row_quant.py, "
                "GELU_TANH_APPROX; default: exp2 and a division)",
    "mmarowsums": "with +sage8 on Hopper: P's row sums by a wgmma of P and ones, not the softmax's additions "
                  "(kontext_kernels/sage_attention_hopper.py, ROW_SUMS_ON_TENSOR_CORES)",
    "pvsoftmax": "with +sage8 on Hopper: block j-1's P·V during block j's softmax, P through shared memory "
                 "(kontext_kernels/sage_attention_hopper.py, PV_DURING_SOFTMAX)",
    "frozenstats": "with +sage8: q, k, v quantized in the QK-norm + RoPE pass with K's mean and V's amax recorded on "
                   "an earlier step (kontext_kernels/sage_qkv.py; the fast preset's attention_statistics_refresh): "
                   "recorded here on the latent plus 30% noise at t = 0.6; in --e2e, recorded as the fast preset does",
    "turns": "with +sage8 on Hopper: the consumers take turns issuing their MMAs, through named barriers "
             "(kontext_kernels/sage_attention_hopper.py, CONSUMERS_TAKE_TURNS)",
    "chainrows": "with +sage8 on Hopper: the softmax's row max and row sum as Triton's chains, not the product's "
                 "trees (kontext_kernels/sage_attention_hopper.py, TREE_ROWS)",
    "tritonattention": "with +sage8 on Hopper: the Triton-language attention kernel "
                       "(kontext_kernels/sage_attention.py), not the warp-specialised Gluon one "
                       "(kontext_kernels/sage_attention_hopper.py)",
    "unpaired": "the double blocks' text and image int8 GEMMs as a launch each, not one paired launch "
                "(kontext_kernels/int8_gemm.py, PAIR_STREAMS)",
    "paired": "the double blocks' text and image int8 GEMMs in one launch on Hopper (kontext_kernels/int8_gemm.py, "
              "PAIR_STREAMS), whatever the product's default",
    "cooperative": "the Hopper int8 GEMM's cooperative 128x256 schedule for products without a gated residual "
                   "(kontext_kernels/int8_gemm_hopper.py, SCHEDULE), not ping-pong",
    "tunedplans": "each plain Hopper int8 GEMM with the fastest of PLAN_CANDIDATES for its shape, timed on the card at "
                  "its first launch (kontext_kernels/int8_gemm_hopper.py, TUNE_PLANS), whatever the product's default",
    "untunedplans": "every Hopper int8 GEMM with the default schedule and GROUP_M, not TUNE_PLANS",
    "pairedrows": "the double blocks' text and image 8-bit rows (LayerNorm + modulation, attention outputs, GELU "
                  "rows) quantized in one launch for both (kontext_core/compute/fused.py, "
                  "set_paired_row_quantizers), int8 and e4m3 alike; the product pairs int8 rows only",
    "unpairedrows": "the double blocks' text and image 8-bit rows quantized in a launch each",
    "cuteattention": "with +sage8 on Hopper: the CuTe DSL attention kernel with FlashAttention-3's in-warpgroup "
                     "overlap (kontext_kernels/sage_attention_cute.py, through cute_runtime.py), not the Gluon one",
    "sdpa": "attention through PyTorch's SDPA (cuDNN first) even where flash-attn is installed (auto takes it)",
    "graphs": "each step replayed from a CUDA graph (kontext_core/compute/cuda_graph.py)",
    "modtable": "the step's modulation vectors read from a table made before sampling (the fast preset's "
                "batched_modulation, KontextTransformer.modulation_table) for 28 steps; its one-off time is printed",
    "concat": "the single block's linear2 over a concatenation of its input's parts (not two GEMMs)",
    "cudnn": "a reference row with PyTorch's SDPA priority cuDNN first (ours always is; default: flash first)",
    "lora": "a random rank-32 LoRA on every linear of every block, merged into the weights (as the nodes "
            "apply LoRAs to bf16 models); the row reports the merge's time",
    "lorafly": "the same LoRA applied on the fly (as the nodes apply LoRAs to fp8 models): on fp8 layers fed "
               "by the fused quantizers as extra K columns of their own GEMM (kontext_core/adapters/wide_lora.py), "
               "elsewhere two thin GEMMs more; traced into compiled blocks and replayed by CUDA graphs",
    "thinlora": "with +lorafly: the LoRA as two thin GEMMs on every layer, fp8 ones too (before GEMM columns)",
    "autotune": "compiled blocks in inductor's max-autotune mode: each GEMM timed against Triton templates "
                "(persistent TMA ones too) that can take the elementwise work after it into their epilogue",
}

# The modifiers that switch our own code (kernels, attention backends, LoRA forms, presets' parts): a reference row
# (diffusers, ComfyUI, BFL) refuses them. The rest ("graphs", "concat", "cudnn", ...) name how any row is run.
OURS_ONLY = frozenset(("lora", "lorafly", "thinlora", "autotune", "sdpa", "sage8", "sage8fp16", "tritongemm",
                       "tritonattention", "modtable", "fusedqkv", "tanhgelu", "mmarowsums", "pvsoftmax", "turns",
                       "frozenstats", "chainrows", "cuteattention", "unpaired", "paired", "cooperative", "tunedplans",
                       "untunedplans", "pairedrows", "unpairedrows"))

PRODUCT_SCORES = sage_attention.SCORES_DEFAULT  # the product's, kept before a row changes it
PRODUCT_HOPPER_GEMM = int8_gemm.HOPPER_KERNEL
PRODUCT_PAIR_STREAMS = int8_gemm.PAIR_STREAMS
PRODUCT_GEMM_SCHEDULE = int8_gemm_hopper.SCHEDULE
PRODUCT_TUNE_PLANS = int8_gemm_hopper.TUNE_PLANS
PRODUCT_HOPPER_ATTENTION = sage_attention.HOPPER_KERNEL
PRODUCT_GELU = row_quant.GELU_ON_GPU
PRODUCT_ROW_SUMS = sage_attention_hopper.ROW_SUMS_ON_TENSOR_CORES
PRODUCT_PV_DURING_SOFTMAX = sage_attention_hopper.PV_DURING_SOFTMAX
PRODUCT_TURNS = sage_attention_hopper.CONSUMERS_TAKE_TURNS
PRODUCT_TREE_ROWS = sage_attention_hopper.TREE_ROWS


def _comfy_variant(impl: str) -> str:
    """The ComfyUI twin a comfyui row runs: its name without modifiers and "-compiled"."""
    return impl.split("+")[0].removesuffix("-compiled")


# The fast preset's step as a row (what `--preset fast` runs; the modifiers that are the product's defaults left
# implicit): `--impls fast` and `fast+MODIFIER` stand for it, so the device scripts name it in one place.
FAST_ROW = "ours-int8-compiled+graphs+sage8+modtable+frozenstats"


def implementation(name: str) -> str:
    if name == "fast" or name.startswith("fast+"):
        name = FAST_ROW + name.removeprefix("fast")
    base, *modifiers = name.split("+")
    if base not in IMPLS or any(m not in MODIFIERS for m in modifiers):
        raise argparse.ArgumentTypeError(f"{name!r}: choose one of {', '.join(IMPLS)}, plus any of "
                                         f"{', '.join('+' + m for m in MODIFIERS)}")
    if "cudnn" in modifiers and base.startswith("ours"):
        raise argparse.ArgumentTypeError(f"{name!r}: +cudnn is for the reference rows; ours always puts cuDNN first")
    ours_only = [m for m in modifiers if m in OURS_ONLY]
    if ours_only and not base.startswith("ours"):
        raise argparse.ArgumentTypeError(f"{name!r}: +{ours_only[0]} applies to our rows only")
    if "autotune" in modifiers and not base.endswith("-compiled"):
        raise argparse.ArgumentTypeError(f"{name!r}: +autotune is a compilation mode; use it on a -compiled row")
    if "lora" in modifiers and "lorafly" in modifiers:
        raise argparse.ArgumentTypeError(f"{name!r}: a row applies its LoRA merged (+lora) or on the fly (+lorafly)")
    return name


# A whole edit (--e2e) is named as a model and modifiers, e.g. int8+sage8+modtable+compiledae+frozenstats+graphs:
# MODIFIERS' kernel switches as configure() reads them, +graphs, +modtable and +frozenstats as the pipeline runs
# them, +compiledae, the AE compiled as the fast preset's load_pipeline does, and +fusedae, its attention on SDPA's
# fused kernels, as the same preset runs it. The row-only modifiers have no whole-edit form.
E2E_MODELS = ("bf16", "fp8", "int8")
E2E_ROW_ONLY = ("cudnn", "lora", "lorafly", "thinlora", "autotune")
FAST_EDIT = "int8+sage8+modtable+compiledae+fusedae+frozenstats"


def e2e_run(label: str) -> str:
    model, *modifiers = label.split("+")
    known = [m for m in MODIFIERS if m not in E2E_ROW_ONLY] + ["compiledae", "fusedae"]
    if model not in E2E_MODELS or any(m not in known for m in modifiers):
        raise argparse.ArgumentTypeError(f"{label!r}: a whole edit is one of {', '.join(E2E_MODELS)}, plus any of "
                                         f"{', '.join('+' + m for m in known)}")
    return label


def default_e2e_runs(impls: list[str]) -> list[str]:
    """What a bare --e2e times: each model, fp8 attention and the fast preset's edit where a row has them, and each
    again with CUDA graphs where a row has them."""
    runs = list(E2E_MODELS)
    runs += ["fp8+fp8attention"] if any("+fp8attention" in impl for impl in impls) else []
    runs += [FAST_EDIT] if any("+sage8" in impl for impl in impls) else []
    return runs + ([run + "+graphs" for run in runs] if any("+graphs" in impl for impl in impls) else [])


def _plan_name(plan: int8_gemm_hopper.Plan) -> str:
    return f"{plan.schedule} GM {plan.group_m}" + (f" {plan.stages} stages" if plan.stages else "")


def configure(impl: str) -> None:
    """The switches of one implementation row. Our Triton kernels run in the "kernels" rows (the Triton
    GEMMs too; "rowkernels": norms and RoPE fused, GEMMs by cuBLAS) and, as the product does, in compiled
    blocks; plain "ours" / "ours-fp8" rows are PyTorch alone (the int8 rows always have the kernels: without
    them int8 weights are upcast). Modifiers: MODIFIERS."""
    base, *modifiers = impl.split("+")
    kontext_kernels.set_enabled((base.endswith("kernels") or base.endswith("-compiled"))
                                and "nokernels" not in modifiers)
    fused.set_fused_gemms(base.endswith("-kernels"))
    fused.set_cublas_epilogues("noepilogues" not in modifiers)
    fused.set_linear2_parts("concat" not in modifiers)
    fused.set_paired_row_quantizers(True if "pairedrows" in modifiers else False if "unpairedrows" in modifiers
                                    else None)
    quant.set_fp8_fast_accumulation("exactaccum" not in modifiers)
    attention = {"fp8attention": "cudnn-fp8", "sage8": "sage8", "sage8fp16": "sage8-fp16", "sdpa": "sdpa"}
    set_attention_backend(next((attention[m] for m in modifiers if m in attention), "auto"))
    int8_gemm.HOPPER_KERNEL = "triton" if "tritongemm" in modifiers else PRODUCT_HOPPER_GEMM
    int8_gemm.PAIR_STREAMS = "paired" in modifiers or (PRODUCT_PAIR_STREAMS and "unpaired" not in modifiers)
    int8_gemm_hopper.SCHEDULE = "cooperative" if "cooperative" in modifiers else PRODUCT_GEMM_SCHEDULE
    int8_gemm_hopper.TUNE_PLANS = "tunedplans" in modifiers or (PRODUCT_TUNE_PLANS and "untunedplans" not in modifiers)
    sage_attention.HOPPER_KERNEL = ("triton" if "tritonattention" in modifiers else
                                    "cute" if "cuteattention" in modifiers else PRODUCT_HOPPER_ATTENTION)
    sage_attention_hopper.ROW_SUMS_ON_TENSOR_CORES = "mmarowsums" in modifiers or PRODUCT_ROW_SUMS
    sage_attention_hopper.PV_DURING_SOFTMAX = "pvsoftmax" in modifiers or PRODUCT_PV_DURING_SOFTMAX
    sage_attention_hopper.CONSUMERS_TAKE_TURNS = "turns" in modifiers or PRODUCT_TURNS
    sage_attention_hopper.TREE_ROWS = PRODUCT_TREE_ROWS and "chainrows" not in modifiers
    attention_module.FUSED_SAGE_QKV = "fusedqkv" in modifiers
    row_quant.GELU_ON_GPU = row_quant.GELU_TANH_APPROX if "tanhgelu" in modifiers else PRODUCT_GELU
    sage_attention.SCORES_DEFAULT = (sage_attention.SCORES_CONVERT if "convertedscores" in modifiers else
                                     PRODUCT_SCORES)
    import torch._inductor.config

    torch._inductor.config.triton.enable_persistent_tma_matmul = "autotune" in modifiers


def check_kernels() -> list[dict]:
    """The check step: every Triton kernel against its PyTorch reference at the edit workload's full size
    (kontext_kernels/check.py). A failure stops the run: timings of wrong kernels mean nothing."""
    from kontext_kernels import check

    kontext_kernels.set_enabled(True)
    if not kontext_kernels.enabled_for(torch.empty(1, device="cuda")):
        # Triton absent, KONTEXT_KERNELS=0 or a pre-Ampere GPU: every row runs the references, nothing to check.
        print("check step skipped: the Triton kernels are off here (every row runs the PyTorch references)", flush=True)
        return []
    results = check.run("cuda", check.FULL)
    print(f"check step: {len(results)} kernels against their references at full size", flush=True)
    for result in results:
        print(f"  {result}", flush=True)
    failed = [r.name for r in results if not r.passed]
    if failed:
        raise SystemExit(f"check step failed for {', '.join(failed)}: not timing wrong kernels (--no-check times "
                         "them anyway; KONTEXT_KERNELS=0 times every row on the PyTorch references instead)")
    return [{"name": r.name, "error": r.error, "tolerance": r.tolerance} for r in results]


def random_lora(model: KontextTransformer, rank: int = 32):
    """A LoRA in BFL's key layout on every linear of every block, deltas ~1% of the weights (LoRA-sized)."""
    from kontext_core.adapters.lora import lora_from_state_dict
    from kontext_core.compute.quant import QuantizedLinear

    generator = torch.Generator(device="cuda").manual_seed(1)
    tensors = {}
    for name, module in model.named_modules():
        if (isinstance(module, (torch.nn.Linear, QuantizedLinear))
                and name.startswith(("double_blocks.", "single_blocks."))):
            tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(
                rank, module.in_features, device="cuda", generator=generator, dtype=torch.bfloat16)
            tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(
                module.out_features, rank, device="cuda", generator=generator, dtype=torch.bfloat16) * (
                    0.01 / (module.in_features * rank) ** 0.5)
    return lora_from_state_dict(tensors, name=f"random rank-{rank}")


def apply_row_lora(model, impl: str):
    """The row's LoRA (+lora merged, +lorafly on the fly), or None; prints how long applying it took."""
    from kontext_core import apply_lora

    modifiers = impl.split("+")[1:]
    mode = "merge" if "lora" in modifiers else "on_the_fly" if "lorafly" in modifiers else None
    if mode is None:
        return None
    from kontext_core.adapters import wide_lora

    weights = random_lora(model)
    torch.cuda.synchronize()
    started = time.perf_counter()
    wide_lora.set_enabled("thinlora" not in modifiers)
    try:
        handle = apply_lora(model, weights, 1.0, mode=mode)
    finally:
        wide_lora.set_enabled(True)
    torch.cuda.synchronize()
    from kontext_core.compute.fused import lora_factors

    columns = sum(1 for layer in model.modules() if (f := lora_factors(layer)) is not None and f.wide is not None)
    print(f"  ({impl}: {len(weights.targets)} layers, LoRA applied ({mode}) in {time.perf_counter() - started:.2f} s; "
          f"{columns} as columns of their fp8 GEMM)", flush=True)
    return handle


def compile_blocks(model, impl: str) -> None:
    if impl.startswith(("comfyui", "bfl")):
        from twin_check import compile_each_block

        compile_each_block(model)
        return
    if impl.startswith("diffusers"):
        model.compile_repeated_blocks(fullgraph=True)
        return
    if "autotune" in impl.split("+"):
        model.compile_blocks(mode="max-autotune-no-cudagraphs")
        return
    model.compile_blocks()


def with_cudnn_first(fn):
    """`fn` with SDPA's priority as ours has it, cuDNN first, for its calls (and for the compiler tracing them)."""
    from kontext_core.compute.attention import cudnn_first

    def run():
        with cudnn_first():
            return fn()
    return run


def profile_step(fn, impl: str, workload: str, top: int = 12) -> None:
    """GPU time of one step grouped by kernel name: where the milliseconds above the floor go."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            totals[event.name[:70]] = totals.get(event.name[:70], 0.0) + event.device_time / 1e3
    print(f"    profile {impl} [{workload}]: {sum(totals.values()):.1f} ms of GPU time", flush=True)
    for kernel, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"      {ms:7.2f} ms  {kernel}", flush=True)
    _print_gaps(prof)


def _print_gaps(prof, top: int = 6) -> None:
    """Idle GPU time between consecutive kernels, grouped by the kernel that follows the gap."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events()
                   if e.device_type.name == "CUDA")
    if not spans:
        return
    gaps: dict[str, list[float]] = {}
    for (_, end, _), (start, _, name) in zip(spans, spans[1:]):
        if start > end:
            gaps.setdefault(name, []).append((start - end) / 1e3)
    total = sum(sum(v) for v in gaps.values())
    wall = (spans[-1][1] - spans[0][0]) / 1e3
    print(f"    GPU span {wall:.1f} ms, idle between kernels {total:.1f} ms", flush=True)
    for name, values in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"      {sum(values):7.2f} ms idle in {len(values)} gaps before {name}", flush=True)


def uncompile(model) -> None:
    if isinstance(model, KontextTransformer):
        model.uncompile_blocks()
        return
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def end_to_end(model: KontextTransformer, steps: int = 28, cuda_graphs: bool = False,
               batched_modulation: bool = False, compile_autoencoder: bool = False,
               fused_autoencoder_attention: bool = False, attention_statistics_refresh: int = 0,
               ) -> tuple[float, dict[str, float]]:
    """1024x1024 edit: AE encode of the context, `steps` steps, AE decode (prompt embeddings given). Seconds of
    the whole, and milliseconds of its parts (encode, steps, decode; CUDA events, which add no synchronisation)."""
    ae = random_autoencoder()
    if fused_autoencoder_attention:  # as the fast preset's load_pipeline does
        ae.use_fused_attention()
    if compile_autoencoder:  # as the fast preset's load_pipeline does
        ae.compile_parts()
    # The pipeline replays the model's shared graph, which a run before this one in the process may have captured
    # under other kernel settings (paired launches, GEMM plans) that its signature does not hold: capture anew.
    GraphedVelocity.release(model)
    pipe = KontextPipeline(model, ae, cuda_graphs=cuda_graphs)
    pipe.batched_modulation = batched_modulation
    pipe.attention_statistics_refresh = attention_statistics_refresh
    config = model.config
    cond = TextConditioning(torch.randn(1, 512, config.context_in_dim, device="cuda"),
                            torch.randn(1, config.vec_in_dim, device="cuda"))
    image = torch.rand(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16) * 2 - 1

    marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]

    def run():
        with torch.no_grad():
            marks[0].record()
            context = ae.encode(image).float()
            marks[1].record()
            latent = pipe.generate(cond, GenerationSettings(steps=steps), context_latents=[context])
            marks[2].record()
            decoded = ae.decode(latent.to(torch.bfloat16))
            marks[3].record()
            return decoded

    run()  # warm-up (compilation, cuDNN plans)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    parts = {name: marks[i].elapsed_time(marks[i + 1]) for i, name in enumerate(("encode", "steps", "decode"))}
    return seconds, parts


def main() -> None:
    global WEIGHT_INIT
    parser = argparse.ArgumentParser()
    parser.add_argument("--impls", nargs="+", default=["ours", "diffusers"], type=implementation,
                        help=f"each one of {', '.join(IMPLS)}, optionally with +MODIFIER suffixes, or fast "
                             f"({FAST_ROW}, the fast preset's step), also with suffixes: "
                             # argparse %-formats its help
                             f"{'; '.join(f'+{k}: {v}' for k, v in MODIFIERS.items())}".replace("%", "%%"))
    parser.add_argument("--workloads", nargs="+", default=["edit", "t2i"], choices=list(WORKLOADS))
    parser.add_argument("--e2e", nargs="*", metavar="RUN", default=None, type=e2e_run,
                        help="also time a full 28-step 1024x1024 edit, in the order named: a model (bf16, fp8, int8) "
                             "and modifiers, e.g. --e2e int8+graphs bf16; the fast preset's whole edit is "
                             f"{FAST_EDIT}+graphs (compiledae: the AE compiled, as its load_pipeline does; fusedae: "
                             "the AE's attention on SDPA's fused kernels, as that preset runs it; "
                             "frozenstats: sage8's statistics recorded every few steps, as the fast preset does, and "
                             "reused between). Alone: each model, fp8+fp8attention and the fast preset's edit where a "
                             "row has them, and each also +graphs where a row has +graphs")
    parser.add_argument("--comfyui", metavar="PATH", default=os.environ.get("COMFYUI_PATH"),
                        help="ComfyUI checkout or bench/peers/stage_comfyui.sh copy, for the comfyui rows "
                             "($COMFYUI_PATH)")
    parser.add_argument("--bfl", metavar="PATH",
                        default=os.environ.get("KONTEXT_BFL_PATH", str(Path(__file__).parents[1] / "build" / "bfl")),
                        help="BFL's code staged by bench/peers/stage_bfl.sh, for the bfl rows ($KONTEXT_BFL_PATH; "
                             "default build/bfl)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the check step (every Triton kernel against its reference at full size)")
    parser.add_argument("--init", choices=("fan-in", "std0.02"), default=WEIGHT_INIT,
                        help="random weights' scale: 1/sqrt(fan_in) (default) or 0.02 for every matrix")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="print the GPU time per kernel kind of one step")
    parser.add_argument("--profile-top", type=int, default=12, metavar="N", help="kernel kinds the profile lists")
    parser.add_argument("--append-results", metavar="MARKDOWN", default=None,
                        help="append this run's rows to a results file (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    WEIGHT_INIT = args.init

    torch.backends.cuda.matmul.allow_tf32 = True
    config = TransformerConfig()
    gpu = torch.cuda.get_device_name()
    rate = matmul_rate()
    record = {"gpu": gpu, "torch": torch.__version__, "matmul_tflops": rate / 1e12, "init": WEIGHT_INIT, "results": []}
    print(f"{gpu}, torch {torch.__version__}: bf16 matmul 8192^3 at {rate / 1e12:.0f} TFLOP/s; our rows' attention "
          f"(auto): {flash_attn_variant() or 'SDPA, cuDNN first'}", flush=True)
    if not args.no_check:
        record["check"] = check_kernels()

    model = random_transformer(config)
    twin = diffusers_twin(model) if any(i.startswith("diffusers") for i in args.impls) else None
    comfy = {}  # ComfyUI twin by row name without "-compiled"
    if any(i.startswith("comfyui") for i in args.impls):
        if args.comfyui and Path(args.comfyui).expanduser().is_dir():
            from comfyui_native import FP8_SCALED_VARIANTS, comfy_fp8_scaled_twin, comfy_step, comfy_twin, describe
            from comfyui_native import fp8_scaled_file_state

            wanted = sorted({_comfy_variant(i) for i in args.impls if i.startswith("comfyui")})
            fp8_state = fp8_scaled_file_state(model) if any(w in FP8_SCALED_VARIANTS for w in wanted) else None
            for variant in wanted:
                comfy[variant] = (comfy_fp8_scaled_twin(model, args.comfyui, state=fp8_state,
                                                        **FP8_SCALED_VARIANTS[variant])
                                  if variant in FP8_SCALED_VARIANTS else comfy_twin(model, args.comfyui))
                loaded = comfy[variant].comfy
                print(f"ComfyUI {loaded.version} at {loaded.path}, {variant}: {describe(comfy[variant])}; "
                      f"attention {loaded.attention}, RoPE {loaded.apply_rope}", flush=True)
            del fp8_state  # the twins hold the fp8 weights (one copy, shared)
        else:
            print(f"skipping the comfyui rows: no ComfyUI at {args.comfyui!r} (--comfyui PATH or $COMFYUI_PATH)",
                  flush=True)
            args.impls = [i for i in args.impls if not i.startswith("comfyui")]
    bfl = None
    if any(i.startswith("bfl") for i in args.impls):
        if (Path(args.bfl).expanduser() / "flux" / "model.py").is_file():
            from bfl_native import bfl_twin

            bfl = bfl_twin(model, args.bfl)
            print(f"BFL reference code at {bfl.bfl.path}", flush=True)
        else:
            print(f"skipping the bfl rows: no BFL code at {args.bfl!r} (bench/peers/stage_bfl.sh; --bfl PATH)",
                  flush=True)
            args.impls = [i for i in args.impls if not i.startswith("bfl")]
    fp8_model = int8_model = None
    if any(i.startswith("ours-fp8") for i in args.impls):
        from kontext_core.compute.quant import quantize_model

        fp8_model = quantize_model(random_transformer(config))  # same seed: the same weights, then e4m3
    if any(i.startswith("ours-int8") for i in args.impls):
        from kontext_core.compute.quant import quantize_model

        int8_model = quantize_model(random_transformer(config), torch.int8)  # the same weights, int8 per row
    for name in args.workloads:
        workload = WORKLOADS[name]
        x = inputs(config, workload)
        image_tokens = x["img"].shape[1] + (x["ctx"].shape[1] if x["ctx"] is not None else 0)
        flops = step_flops(config, image_tokens, workload["text"])
        floor = flops["total"] / rate
        attn_rate, default_rate, default_kernel = attention_rates(image_tokens + workload["text"], config)
        record.setdefault("default_sdpa", {})[name] = {"tflops": default_rate / 1e12, "kernel": default_kernel}
        print(f"[{name}] {image_tokens + workload['text']} tokens, {flops['total'] / 1e12:.1f} TFLOP, "
              f"floor {floor * 1e3:.1f} ms; attention alone at {attn_rate / 1e12:.0f} TFLOP/s (cuDNN first), "
              f"{default_rate / 1e12:.0f} TFLOP/s in PyTorch's default order ({default_kernel})", flush=True)
        reference = None
        for impl in args.impls:
            configure(impl)
            modifiers = impl.split("+")[1:]
            target = (fp8_model if impl.startswith("ours-fp8") else int8_model if impl.startswith("ours-int8")
                      else model if impl.startswith("ours")
                      else comfy[_comfy_variant(impl)] if impl.startswith("comfyui")
                      else bfl if impl.startswith("bfl") else twin)
            lora = apply_row_lora(target, impl) if impl.startswith("ours") else None
            if "-compiled" in impl:
                compile_blocks(target, impl)
            if impl.startswith("ours"):
                fn = ours_step(target, x, "graphs" in modifiers, "modtable" in modifiers, "frozenstats" in modifiers)
            elif impl.startswith("comfyui"):
                fn = comfy_step(target, x)
            elif impl.startswith("bfl"):
                from bfl_native import bfl_step

                fn = bfl_step(target, x)
            else:
                fn = diffusers_step(target, x)
            if "cudnn" in modifiers:
                fn = with_cudnn_first(fn)
            # Other models held for other rows are in max_memory_allocated too: the row reports its own.
            others = others_bytes(target, (model, fp8_model, int8_model, twin, *comfy.values(), bfl))
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                out = fn()
                if reference is None:
                    reference = out.float()
                error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
                l2_error = rel_l2(out, reference)
                seconds = cuda_time(fn)
                torch.cuda.synchronize()
                started = time.perf_counter()
                fn()  # host time to enqueue one step: near the GPU time means launch-bound
                host_seconds = time.perf_counter() - started
                torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - others) / 2**30
            if args.profile:
                profile_step(fn, impl, name, top=args.profile_top)
            row = {"workload": name, "impl": impl, "ms": seconds * 1e3, "floor_ms": floor * 1e3,
                   "x_floor": seconds / floor, "tflops": flops["total"] / seconds / 1e12, "peak_gib": peak,
                   "host_ms": host_seconds * 1e3, "rel_err_vs_first": error, "rel_l2_vs_first": l2_error,
                   "attention_tflops": attn_rate / 1e12}
            record["results"].append(row)
            print(f"  {impl:28s} {seconds * 1e3:8.1f} ms  {seconds / floor:5.2f}x floor  "
                  f"{row['tflops']:5.0f} TFLOP/s  host {host_seconds * 1e3:5.1f} ms  peak {peak:5.1f} GiB  "
                  f"vs {args.impls[0]}: max {error:.2e} L2 {l2_error:.2e}",
                  flush=True)
            if int8_gemm_hopper.TUNE_PLANS:
                for (_, n, k, rows, products, *_), tuning in int8_gemm_hopper.tunings().items():
                    medians = ", ".join(f"{_plan_name(plan)} {ms:.3f}" for plan, ms in tuning.medians.items())
                    print(f"    tuned plan N {n} K {k} rows <= {rows} x{products}: {_plan_name(tuning.plan)} "
                          f"(median ms: {medians})", flush=True)
            if "-compiled" in impl:
                uncompile(target)
            if lora is not None:
                started = time.perf_counter()
                lora.remove()
                torch.cuda.synchronize()
                print(f"  ({impl}: LoRA removed in {time.perf_counter() - started:.2f} s)", flush=True)
                torch._dynamo.reset()
    if args.e2e is not None:
        models = {"bf16": model, "fp8": fp8_model, "int8": int8_model}
        compiled = any("-compiled" in i for i in args.impls)
        for label in args.e2e or default_e2e_runs(args.impls):
            name, *modifiers = label.split("+")
            target = models[name]
            if target is None:
                print(f"end-to-end {label}: skipped, no row of this run uses the {name} model", flush=True)
                continue
            # The product's settings: the kernels on, cuBLAS GEMMs, blocks compiled when any row was; the run's
            # kernel switches as a row's.
            configure(("ours-compiled" if compiled else "ours-rowkernels") + "".join(f"+{m}" for m in modifiers))
            if compiled:
                compile_blocks(target, "ours-compiled")
            seconds, parts = end_to_end(
                target, cuda_graphs="graphs" in modifiers, batched_modulation="modtable" in modifiers,
                compile_autoencoder="compiledae" in modifiers, fused_autoencoder_attention="fusedae" in modifiers,
                attention_statistics_refresh=(PRESETS["fast"].attention_statistics_refresh
                                              if "frozenstats" in modifiers else 0))
            record[f"e2e_edit_28_steps_{label}_s"] = seconds
            record.setdefault("edit_parts_ms", {})[label] = parts
            print(f"end-to-end 1024x1024 edit, 28 steps, AE encode+decode, {label}: {seconds:.2f} s (encode "
                  f"{parts['encode']:.1f} ms, steps {parts['steps']:.0f} ms, {parts['steps'] / 28:.1f} a step, "
                  f"decode {parts['decode']:.1f} ms)", flush=True)
            uncompile(target)
            torch._dynamo.reset()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(json.dumps(record, indent=2))
    if args.append_results:
        with open(args.append_results, "a") as results:
            results.write(results_markdown(record, " ".join(sys.argv)))


def _commit() -> str:
    """The checkout's commit, or $KONTEXT_COMMIT where the tree was copied without its .git."""
    import subprocess

    if os.environ.get("KONTEXT_COMMIT"):
        return os.environ["KONTEXT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_markdown(record: dict, command: str) -> str:
    """One run as a RESULTS.md section: date, GPU, command, commit, then a row per measurement."""
    import datetime

    checked = record.get("check") or []
    errors = ", ".join(f"{c['name']} {c['error']:.1e}" for c in checked)
    check_line = (f"Check step: {len(checked)} kernels within tolerance of their references at full size "
                  f"(errors: {errors}).\n") if checked else ""
    lines = [f"\n## {datetime.date.today().isoformat()} — {record['gpu']}, torch {record['torch']}\n",
             f"Command: `python3 bench/{Path(command.split()[0]).name} {' '.join(command.split()[1:])}` at commit "
             f"{_commit()}; bf16 matmul {record['matmul_tflops']:.0f} TFLOP/s.\n",
             *([check_line] if check_line else []),
             *[f"Attention alone [{workload}]: {r['tflops']:.0f} TFLOP/s in PyTorch's default SDPA order "
               f"(`{r['kernel']}`), the reference rows' backend unless `+cudnn`.\n"
               for workload, r in record.get("default_sdpa", {}).items()],
             "| workload | implementation | ms / step | x floor | TFLOP/s | host enqueue ms | peak GiB "
             "| rel. error vs first (max / L2) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in record["results"]:
        lines.append(f"| {row['workload']} | {row['impl']} | {row['ms']:.1f} | {row['x_floor']:.2f} | "
                     f"{row['tflops']:.0f} | {row['host_ms']:.1f} | {row['peak_gib']:.1f} | "
                     f"{row['rel_err_vs_first']:.1e} / {row['rel_l2_vs_first']:.1e} |")
    for key, value in record.items():
        if key.startswith("e2e_"):
            lines.append(f"\n{key}: {value:.2f} s")
    for label, parts in record.get("edit_parts_ms", {}).items():
        lines.append(f"\n{label}: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in parts.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
