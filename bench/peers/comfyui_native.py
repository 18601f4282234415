"""ComfyUI's own FLUX model on our weights: the "ComfyUI native" rows of bench/bench_step.py.

ComfyUI is imported at runtime from a checkout (or a copy staged by bench/peers/stage_comfyui.sh); none of its
code is in this repo. Two kinds of twin, each called as ComfyUI's sampler calls the model: the unpacked
latent [B, 16, H, W], sigma as the timestep, the reference latents as `ref_latents` (ComfyUI patchifies and
places them itself).

- `comfy_twin`: as ComfyUI builds a bf16 FLUX checkpoint: `comfy.ldm.flux.model.Flux` with the operations
  class ComfyUI's own picker returns (`disable_weight_init` for bf16 weights on a bf16-capable GPU), sharing
  our model's weights.
- `comfy_fp8_scaled_twin`: as ComfyUI 0.8 loads `flux1-dev-kontext_fp8_scaled.safetensors`, the file its own
  Kontext template names. The file is our saver's ComfyUI scaled-fp8 layout of our weights (e4m3 block
  linears, a per-tensor `scale_weight` each, the `scaled_fp8` marker), and ComfyUI's own functions read it:
  the old scaled-fp8 keys become per-layer `comfy_quant` configs, the mixed-precision detection picks its
  `MixedPrecisionOps`, and its Flux module loads the state through them. On a GPU with fp8 compute (Ada,
  Hopper: `supports_fp8_compute`) each quantized linear casts its input to e4m3 (scale 1) and multiplies on
  the fp8 tensor cores through comfy-kitchen (`torch.nn.functional.scaled_mm`, or `torch._scaled_mm` before
  torch 2.10) -- by default, without any `--fast`: ComfyUI 0.8 picks the mixed-precision operations before
  it looks at `--fast fp8_matrix_mult`, which only changes files without quantization metadata. `--fast`
  with no feature named still changes the run: fp16 accumulation makes ComfyUI prefer fp16 to bf16, so the
  compute dtype becomes fp16, and cuDNN autotuning is switched on. Without fp8 compute, or when the file's
  marker asks for full-precision matmuls (two elements), each weight is dequantized per call and multiplied
  in the compute dtype. Not reproduced: ComfyUI's main.py also switches PyTorch to the cudaMallocAsync
  allocator (unless `--fast` autotunes); the bench's one process keeps PyTorch's own allocator for every row.

    python3 bench/peers/comfyui_native.py --comfyui ~/ComfyUI     # CPU self-check against our model, tiny config
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from kontext_core.checkpoints import load_transformer, save_transformer  # noqa: E402
from kontext_core.checkpoints.saving import transformer_file_state  # noqa: E402
from kontext_core.model.tokens import pack_latent, unpack_tokens  # noqa: E402
from twin_check import assign_weights, compare_with_ours, random_case, self_check_main  # noqa: E402

_FLUX_FILE = Path("comfy") / "ldm" / "flux" / "model.py"
_PREFIX = "model.diffusion_model."
# The dtypes comfy/supported_models.py lets a FLUX.1 [dev] / Kontext model run in, in its order of preference
# (read there by ComfyUI's model registry, which imports its text encoders and transformers: not staged).
_FLUX_INFERENCE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# The fp8-scaled twins of the bench, by name: ComfyUI's command line (`--fast` features) and the file's marker.
FP8_SCALED_VARIANTS = {
    "comfyui-fp8scaled": {"fast": (), "full_precision_mm": False},
    "comfyui-fp8scaled-fast": {"fast": "all", "full_precision_mm": False},
    "comfyui-fp8scaled-dequant": {"fast": (), "full_precision_mm": True},
}


def load_comfy(comfyui_path) -> types.SimpleNamespace:
    """Import the modules of ComfyUI's FLUX model from a ComfyUI checkout (or staged copy) at `comfyui_path`.

    ComfyUI parses no command line on import (comfy.options.args_parsing stays False: its defaults are used).
    Without CUDA it is put in CPU mode, with PyTorch attention: the attention function it uses on an NVIDIA GPU.
    """
    path = Path(comfyui_path).expanduser().resolve()
    if not (path / _FLUX_FILE).is_file() or not (path / "comfy" / "model_management.py").is_file():
        raise FileNotFoundError(f"{path} is not a ComfyUI checkout: it has no {_FLUX_FILE} "
                                "(give --comfyui PATH or set COMFYUI_PATH)")
    loaded = sys.modules.get("comfy.ldm.flux.model")
    if loaded is not None and Path(loaded.__file__).resolve() != (path / _FLUX_FILE):
        raise RuntimeError(f"another ComfyUI is already imported ({loaded.__file__}), not the one at {path}")
    if loaded is None:
        # Appended, not prepended: a checkout's top-level modules (nodes.py, utils/, app/) must not shadow ours.
        if str(path) not in sys.path:
            sys.path.append(str(path))
        import comfy.options  # noqa: F401  (args_parsing defaults to False: parse_args([]))
        import comfy.cli_args

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
            comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.ldm.flux.math
    import comfy.ldm.flux.model
    import comfy.ldm.modules.attention
    import comfy.model_management
    import comfy.ops
    import comfy.utils

    flux = sys.modules["comfy.ldm.flux.model"]
    if Path(flux.__file__).resolve() != (path / _FLUX_FILE):
        raise RuntimeError(f"`import comfy` found {flux.__file__}, not the ComfyUI at {path}")
    version = "unknown"
    if (path / "comfyui_version.py").is_file():
        for line in (path / "comfyui_version.py").read_text().splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    rope = comfy.ldm.flux.math.apply_rope
    return types.SimpleNamespace(
        path=path, version=version, flux=flux, ops=comfy.ops, model_management=comfy.model_management,
        utils=comfy.utils, cli_args=comfy.cli_args,
        attention=comfy.ldm.modules.attention.optimized_attention.__name__,
        apply_rope=f"{rope.__module__}.{rope.__name__}")


def _unet_config(config) -> dict:
    """What comfy/model_detection.py reads off a FLUX.1 [dev] checkpoint (patch 2: 64 token features = 16 x 2 x 2)."""
    c = config
    return dict(image_model="flux", in_channels=c.in_channels // 4, out_channels=c.out_channels // 4,
                vec_in_dim=c.vec_in_dim, context_in_dim=c.context_in_dim, hidden_size=c.hidden_size,
                mlp_ratio=c.mlp_ratio, num_heads=c.num_heads, depth=c.depth,
                depth_single_blocks=c.depth_single_blocks, axes_dim=list(c.axes_dim), theta=c.theta,
                patch_size=2, qkv_bias=c.qkv_bias, guidance_embed=c.guidance_embed, txt_ids_dims=[])


def _name(operations) -> str:
    return f"{operations.__module__}.{operations.__qualname__}"


def comfy_twin(model, comfyui_path):
    """ComfyUI's Flux with our model's config, sharing its weights (same device and dtype)."""
    comfy = load_comfy(comfyui_path)
    dtype, device = model.dtype, model.device
    # As comfy/sd.py and comfy/model_base.py do: manual cast only where the device cannot compute in the
    # weights' dtype; the operations picked without a load device (fp8 ops only with --fast or fp8 weights).
    manual_cast = comfy.model_management.unet_manual_cast(dtype, device)
    operations = comfy.ops.pick_operations(dtype, manual_cast)
    twin = comfy.flux.Flux(dtype=dtype, device="meta", operations=operations, **_unet_config(model.config))
    assign_weights(twin, model.state_dict(), "ComfyUI Flux")
    twin.comfy = comfy
    twin.comfy_operations = _name(operations)
    twin.comfy_manual_cast = manual_cast
    twin.comfy_input_dtype = manual_cast or dtype
    twin.comfy_torch_flags = {}
    return twin.eval().requires_grad_(False)


def fp8_scaled_file_state(model, full_precision_mm: bool = False) -> dict:
    """The tensors of our model saved as ComfyUI's scaled-fp8 file (`save_transformer(model, path,
    layout="comfy", weights="fp8_e4m3fn_scaled")` writes them): e4m3 block linears, a per-tensor
    `scale_weight` each, the `scaled_fp8` marker. `full_precision_mm`: the marker with two elements, the
    files that ask ComfyUI to dequantize each weight and multiply in the compute dtype."""
    state = transformer_file_state(model, layout="comfy", weights="fp8_e4m3fn_scaled")
    if full_precision_mm:
        state[_PREFIX + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return state


def _fast_features(comfy, fast) -> set:
    """`--fast` as comfy/cli_args.py parses it: "all" (the flag alone) is every feature; else the named ones."""
    feature = comfy.cli_args.PerformanceFeature
    return set(feature) if fast == "all" else {feature(name) for name in fast}


@contextlib.contextmanager
def comfy_command_line(comfy, fast=(), fp8_compute: bool | None = None):
    """ComfyUI's state after `main.py --fast FEATURES [--supports-fp8-compute]`, for building one twin.

    `--fast` is read in two places: `args.fast` by the operations picker at each call, and, once at import,
    by comfy/model_management.py, which prefers fp16 (PRIORITIZE_FP16) under fp16_accumulation on NVIDIA and
    AMD GPUs; both are set here and put back afterwards, so twins of several command lines live in one
    process. The torch switches the same import makes (fp16 accumulation, cuDNN autotuning) are returned,
    for the twin's calls to run under (`comfy_step`). `fp8_compute` stands for `--supports-fp8-compute`."""
    args, management = comfy.cli_args.args, comfy.model_management
    features = _fast_features(comfy, fast)
    saved = (args.fast, management.PRIORITIZE_FP16, management.SUPPORT_FP8_OPS)
    feature = comfy.cli_args.PerformanceFeature
    gpu = management.is_nvidia() or management.is_amd()
    torch_flags = {}
    if gpu and feature.Fp16Accumulation in features:
        torch_flags["allow_fp16_accumulation"] = True
    if torch.cuda.is_available() and torch.backends.cudnn.is_available() and feature.AutoTune in features:
        torch_flags["cudnn_benchmark"] = True
    args.fast = features
    management.PRIORITIZE_FP16 = gpu and feature.Fp16Accumulation in features
    if fp8_compute is not None:
        management.SUPPORT_FP8_OPS = fp8_compute
    try:
        yield torch_flags
    finally:
        args.fast, management.PRIORITIZE_FP16, management.SUPPORT_FP8_OPS = saved


@contextlib.contextmanager
def _torch_flags(flags: dict):
    if not flags:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_fp16_accumulation, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_fp16_accumulation = flags.get("allow_fp16_accumulation", saved[0])
    torch.backends.cudnn.benchmark = flags.get("cudnn_benchmark", saved[1])
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_fp16_accumulation, torch.backends.cudnn.benchmark = saved


def _load_like_comfy(comfy, file_state: dict, config, device):
    """comfy/sd.py's load_diffusion_model_state_dict for a FLUX file, step by step through ComfyUI's own
    functions: the prefix dropped, the old scaled-fp8 keys converted (comfy.utils.convert_old_quants), the
    mixed-precision detection (detect_layer_quantization, as comfy/model_detection.py calls it), the dtype
    choice for the load device (unet_dtype, unet_manual_cast: none of the weights' own dtype where the file is
    quantized), the operations picker (as comfy/model_base.py calls it), then the Flux module loading the
    state through those operations, which consume the scales. Only ComfyUI's model registry is stood in for
    (it imports its text encoders and transformers): FLUX's config and supported dtypes. Built on the load
    device, where ComfyUI's model management puts a model that fits."""
    utils, management = comfy.utils, comfy.model_management
    state = utils.state_dict_prefix_replace(dict(file_state), {_PREFIX: ""}, filter_keys=True)
    state, _ = utils.convert_old_quants(state, "", metadata={})
    parameters = utils.calculate_parameters(state)
    quant_config = utils.detect_layer_quantization(state, "")
    weight_dtype = None if quant_config is not None else utils.weight_dtype(state)
    unet_dtype = management.unet_dtype(model_params=parameters, supported_dtypes=_FLUX_INFERENCE_DTYPES,
                                       weight_dtype=weight_dtype)
    manual_cast = management.unet_manual_cast(unet_dtype if quant_config is None else None, device,
                                              _FLUX_INFERENCE_DTYPES)
    model_config = types.SimpleNamespace(quant_config=quant_config)
    operations = comfy.ops.pick_operations(unet_dtype, manual_cast, fp8_optimizations=False,
                                           model_config=model_config)
    twin = comfy.flux.Flux(dtype=unet_dtype, device=device, operations=operations, **_unet_config(config))
    missing, unexpected = twin.load_state_dict(state, strict=False)
    if missing or unexpected:  # ComfyUI only logs these; a bench twin must have every weight
        raise RuntimeError(f"ComfyUI Flux did not take the fp8-scaled state: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    twin.comfy_operations = _name(operations)
    twin.comfy_manual_cast = manual_cast
    twin.comfy_input_dtype = manual_cast or unet_dtype  # comfy/model_base.py casts the inputs so
    return twin


def linear_paths(twin) -> dict[str, int]:
    """How many of the twin's linears take each path: fp8 GEMM (e4m3 input x e4m3 weight), dequantized (the
    fp8 weight upcast per call), plain (weights in the compute dtype)."""
    counts = {"fp8_gemm": 0, "dequantized": 0, "plain": 0}
    for module in twin.modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or not hasattr(module, "in_features"):
            continue
        if getattr(module, "layout_type", None) is None:
            counts["plain"] += 1
        elif getattr(module, "_full_precision_mm", False) or getattr(module, "comfy_cast_weights", False):
            counts["dequantized"] += 1
        else:
            counts["fp8_gemm"] += 1
    return counts


def _gemm_function() -> str:
    """What comfy-kitchen's fp8 linear multiplies with: torch's scaled_mm API where torch has it."""
    return ("torch.nn.functional.scaled_mm" if hasattr(torch.nn.functional, "scaled_mm")
            else "torch._scaled_mm")


def _quantize_backend(device) -> str:
    """The comfy-kitchen backend that casts activations to e4m3 on `device` (eager: three PyTorch passes)."""
    try:
        from comfy_kitchen.registry import registry

        sample = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        return registry.get_capable_backend("quantize_per_tensor_fp8", dict(
            x=sample, scale=torch.ones((), device=device), output_type=torch.float8_e4m3fn))
    except Exception as error:  # an older or newer comfy-kitchen: the name only, for the report
        return f"unknown ({type(error).__name__})"


def comfy_fp8_scaled_twin(model, comfyui_path, fast=(), full_precision_mm: bool = False,
                          fp8_compute: bool | None = None, state: dict | None = None):
    """ComfyUI's Flux as ComfyUI 0.8 loads our model saved as flux1-dev-kontext_fp8_scaled.safetensors, on
    our model's device.

    fast: the `--fast` features ComfyUI was started with, by value ("fp8_matrix_mult", ...), or "all" for
    `--fast` alone; full_precision_mm: the file's marker asks for full-precision matmuls; fp8_compute: True
    for ComfyUI's `--supports-fp8-compute` (None: what the device supports); state: the file's tensors
    (`fp8_scaled_file_state`), to share one copy of the fp8 weights among several twins."""
    comfy = load_comfy(comfyui_path)
    if state is None:
        state = fp8_scaled_file_state(model, full_precision_mm)
    elif full_precision_mm:
        state = {**state, _PREFIX + "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    with comfy_command_line(comfy, fast, fp8_compute) as torch_flags:
        twin = _load_like_comfy(comfy, state, model.config, model.device)
    twin.comfy = comfy
    twin.comfy_torch_flags = torch_flags
    twin.comfy_fast = sorted(f.value for f in _fast_features(comfy, fast))
    twin.comfy_linear_paths = linear_paths(twin)
    twin.comfy_gemm = _gemm_function() if twin.comfy_linear_paths["fp8_gemm"] else "dequantized weights"
    twin.comfy_quantize_backend = _quantize_backend(model.device)
    return twin.eval().requires_grad_(False)


def describe(twin) -> str:
    """One line on how a twin computes, for the bench's log."""
    text = f"{twin.comfy_operations}, compute dtype {str(twin.comfy_input_dtype).removeprefix('torch.')}"
    if hasattr(twin, "comfy_linear_paths"):
        paths = twin.comfy_linear_paths
        text += (f"; linears: {paths['fp8_gemm']} fp8 GEMM ({twin.comfy_gemm}, e4m3 inputs cast by comfy-kitchen's "
                 f"{twin.comfy_quantize_backend} backend), {paths['dequantized']} dequantized per call, "
                 f"{paths['plain']} plain; --fast {' '.join(twin.comfy_fast) or '(none)'}")
        if twin.comfy_torch_flags:
            text += f" (torch: {', '.join(twin.comfy_torch_flags)})"
    return text


def _latent_size(ids: torch.Tensor) -> tuple[int, int]:
    """Latent height and width of a packed image from its (index, row, col) ids."""
    rows = ids[0, :, 1].max() - ids[0, :, 1].min() + 1
    cols = ids[0, :, 2].max() - ids[0, :, 2].min() + 1
    return 2 * int(rows), 2 * int(cols)


def comfy_step(twin, x: dict):
    """One forward as ComfyUI's sampler makes it; returns the velocity as packed target tokens [B, L, 64]."""
    dtype = twin.comfy_input_dtype
    height, width = _latent_size(x["img_ids"])
    latent = unpack_tokens(x["img"], height, width).to(dtype)
    refs = None
    if x["ctx"] is not None:
        ids = x["ctx_ids"]
        # ComfyUI's placement of a single reference (default "offset"): index 1, rows and columns from 0,
        # which is BFL's Kontext placement; the bench's context must be placed so for the rows to compare.
        if not (bool((ids[..., 0] == 1).all()) and int(ids[..., 1].min()) == 0 and int(ids[..., 2].min()) == 0):
            raise ValueError("comfy_step takes one context image in the 'kontext' placement")
        refs = [unpack_tokens(x["ctx"], *_latent_size(ids)).to(dtype)]
    # comfy/model_base.py _apply_model: timestep = sigma in float32 (the model multiplies it by 1000);
    # text, pooled vector, guidance and reference latents cast to the model's dtype.
    timestep = x["t"].float()
    context, y, guidance = x["txt"].to(dtype), x["y"].to(dtype), x["g"].to(dtype)
    flags = twin.comfy_torch_flags

    def run():
        with _torch_flags(flags):
            return pack_latent(twin(latent, timestep, context, y=y, guidance=guidance, ref_latents=refs,
                                    transformer_options={}))
    return run


# The fp8-scaled twin's CPU checks: ComfyUI's twin keyword arguments, and its tolerance against our model
# loaded from the same file with the weights upcast to float32 (the file's e4m3 values times their scales).
FP8_CHECKS = {
    # No fp8 compute on a CPU: ComfyUI dequantizes each weight per call; only the order of roundings differs.
    "as_here": ({}, 1e-4),
    # `--supports-fp8-compute`: the path ComfyUI takes by default on an H200. Activations cast to e4m3 with scale
    # 1 (3 mantissa bits, and the tiny model's small activations fall into e4m3's subnormals) move the output
    # (seen: 3.7e-2).
    "fp8_compute": ({"fp8_compute": True}, 0.1),
    # ... plus `--fast fp8_matrix_mult`: no change for a file with quantization metadata (same twin, same output).
    "fp8_compute+fast_fp8_matrix_mult": ({"fp8_compute": True, "fast": ("fp8_matrix_mult",)}, 0.1),
    # ... plus `--fast`: the same on a CPU too (ComfyUI prefers fp16 only on a GPU); on the H200 it computes in fp16.
    "fp8_compute+fast": ({"fp8_compute": True, "fast": "all"}, 0.1),
    # The marker asking for full-precision matmuls: dequantized even where fp8 compute is there.
    "fp8_compute+full_precision_marker": ({"fp8_compute": True, "full_precision_mm": True}, 1e-4),
}


def _upcast_from_file(folder):
    """Our model as our loader reads the file our saver writes, weights upcast to float32."""
    def reference(model):
        path = Path(folder) / "flux1-dev-kontext_fp8_scaled.safetensors"
        save_transformer(model, path, layout="comfy", weights="fp8_e4m3fn_scaled")
        return load_transformer(path, dtype="fp32")
    return reference


class _Warnings(logging.Handler):
    """comfy-kitchen's warnings while a check runs (it logs a fallback to dequantized weights where its fp8
    GEMM fails, e.g. where torch has no fp8 matmul for the CPU)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage()[:200])


def _loader_check(comfyui_path, seed: int) -> dict:
    """The fp8-scaled twin against the model ComfyUI's own loader (comfy.sd.load_diffusion_model_state_dict)
    builds from the same state, fp8 compute on: same operations, dtypes, linear paths and output.

    ComfyUI's loader reads the config off the weights with FLUX.1's fixed head count and rotary axes, so the
    model here has FLUX.1's width (3072, 24 heads of 128) with one block of each kind. comfy.sd imports all of
    ComfyUI's model registry (text encoders, transformers): where it cannot be imported (a staged copy), the
    check says why it was skipped."""
    comfy = load_comfy(comfyui_path)
    try:
        import comfy.sd as comfy_sd
    except ImportError as error:
        return {"skipped": f"comfy.sd cannot be imported here: {type(error).__name__}: {error}"}
    from kontext_core import TransformerConfig

    config = TransformerConfig.tiny(hidden_size=3072, num_heads=24, axes_dim=(16, 56, 56), depth=1,
                                    depth_single_blocks=1)
    model, cases = random_case(seed, config)
    model = model.to(torch.bfloat16)
    state = fp8_scaled_file_state(model)
    with comfy_command_line(comfy, (), True):
        theirs = comfy_sd.load_diffusion_model_state_dict(dict(state), model_options={}).model
    ours = comfy_fp8_scaled_twin(model, comfyui_path, fp8_compute=True, state=state)
    del model, state
    ours_summary = (_operations_of(ours), str(ours.comfy_input_dtype), ours.comfy_linear_paths)
    compute_dtype = theirs.manual_cast_dtype or theirs.get_dtype()
    theirs = theirs.diffusion_model
    theirs.comfy_input_dtype, theirs.comfy_torch_flags = compute_dtype, {}
    theirs_summary = (_operations_of(theirs), str(compute_dtype), linear_paths(theirs))
    difference = 0.0
    with torch.no_grad():
        for x in cases.values():
            difference = max(difference, (comfy_step(ours, x)() - comfy_step(theirs, x)()).abs().max().item())
    return {"ours_vs_comfy_sd": [ours_summary, theirs_summary], "same_build": ours_summary == theirs_summary,
            "max_abs_diff": difference}


def _operations_of(twin) -> str:
    """The operations class a ComfyUI model was built with, read off its first linear's class."""
    return type(twin.img_in).__qualname__.rsplit(".", 1)[0]


def self_check(comfyui_path, seed: int = 0) -> dict:
    """Tiny float32 model on the CPU: ComfyUI's forward vs our velocity, with and without a context image; then
    the fp8-scaled twin as ComfyUI runs it here and with the switches the H200 rows run under."""
    twin, errors = compare_with_ours(lambda model: comfy_twin(model, comfyui_path), comfy_step, seed)
    comfy = twin.comfy
    result = {"rel_err": errors, "comfyui": str(comfy.path), "comfyui_version": comfy.version,
              "operations": twin.comfy_operations, "manual_cast": str(twin.comfy_manual_cast),
              "attention": comfy.attention, "apply_rope": comfy.apply_rope, "torch": torch.__version__,
              "python": sys.executable, "fp8_scaled": {}}
    warnings = _Warnings()
    logging.getLogger("comfy_kitchen").addHandler(warnings)
    try:
        with tempfile.TemporaryDirectory() as folder:
            for case, (options, tolerance) in FP8_CHECKS.items():
                warnings.messages.clear()
                fp8_twin, fp8_errors = compare_with_ours(
                    lambda model: comfy_fp8_scaled_twin(model, comfyui_path, **options), comfy_step, seed,
                    reference=_upcast_from_file(folder))
                result["fp8_scaled"][case] = {
                    "rel_err": fp8_errors, "tolerance": tolerance, "operations": fp8_twin.comfy_operations,
                    "compute_dtype": str(fp8_twin.comfy_input_dtype), "linear_paths": fp8_twin.comfy_linear_paths,
                    "gemm": fp8_twin.comfy_gemm, "quantize_backend": fp8_twin.comfy_quantize_backend,
                    "comfy_kitchen_warnings": sorted(set(warnings.messages))}
    finally:
        logging.getLogger("comfy_kitchen").removeHandler(warnings)
    result["fp8_scaled_loader_check"] = _loader_check(comfyui_path, seed)
    return result


if __name__ == "__main__":
    # A package ComfyUI imports may be missing in this environment: exit status 3 names it.
    self_check_main(__doc__, "comfyui", "a ComfyUI checkout or a copy staged by stage_comfyui.sh", load_comfy,
                    self_check)
