"""ComfyUI's own FLUX model on our weights: the "ComfyUI native" row of bench/bench_step.py.

ComfyUI is imported at runtime from a checkout (or a copy staged by bench/stage_comfyui.sh); none of its
code is in this repo. The twin is built as ComfyUI builds a bf16 FLUX checkpoint: `comfy.ldm.flux.model.Flux`
with the operations class ComfyUI's own picker returns (`disable_weight_init` for bf16 weights on a
bf16-capable GPU), and it is called as ComfyUI's sampler calls it: the unpacked latent [B, 16, H, W], sigma as
the timestep, the reference latents as `ref_latents` (ComfyUI patchifies and places them itself).

    python3 bench/comfyui_native.py --comfyui ~/ComfyUI     # CPU self-check against our model, tiny config
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kontext_core.tokens import pack_latent, unpack_tokens  # noqa: E402
from twin_check import assign_weights, compare_with_ours, self_check_main  # noqa: E402

_FLUX_FILE = Path("comfy") / "ldm" / "flux" / "model.py"


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
        attention=comfy.ldm.modules.attention.optimized_attention.__name__,
        apply_rope=f"{rope.__module__}.{rope.__name__}")


def comfy_twin(model, comfyui_path):
    """ComfyUI's Flux with our model's config, sharing its weights (same device and dtype)."""
    comfy = load_comfy(comfyui_path)
    c = model.config
    dtype, device = model.dtype, model.device
    # What comfy/model_detection.py reads off a FLUX.1 [dev] checkpoint (patch 2: 64 token features = 16 x 2 x 2).
    unet_config = dict(image_model="flux", in_channels=c.in_channels // 4, out_channels=c.out_channels // 4,
                       vec_in_dim=c.vec_in_dim, context_in_dim=c.context_in_dim, hidden_size=c.hidden_size,
                       mlp_ratio=c.mlp_ratio, num_heads=c.num_heads, depth=c.depth,
                       depth_single_blocks=c.depth_single_blocks, axes_dim=list(c.axes_dim), theta=c.theta,
                       patch_size=2, qkv_bias=c.qkv_bias, guidance_embed=c.guidance_embed, txt_ids_dims=[])
    # As comfy/sd.py and comfy/model_base.py do: manual cast only where the device cannot compute in the
    # weights' dtype; the operations picked without a load device (fp8 ops only with --fast or fp8 weights).
    manual_cast = comfy.model_management.unet_manual_cast(dtype, device)
    operations = comfy.ops.pick_operations(dtype, manual_cast)
    twin = comfy.flux.Flux(dtype=dtype, device="meta", operations=operations, **unet_config)
    assign_weights(twin, model.state_dict(), "ComfyUI Flux")
    twin.comfy = comfy
    twin.comfy_operations = f"{operations.__module__}.{operations.__qualname__}"
    twin.comfy_manual_cast = manual_cast
    return twin.eval().requires_grad_(False)


def _latent_size(ids: torch.Tensor) -> tuple[int, int]:
    """Latent height and width of a packed image from its (index, row, col) ids."""
    rows = ids[0, :, 1].max() - ids[0, :, 1].min() + 1
    cols = ids[0, :, 2].max() - ids[0, :, 2].min() + 1
    return 2 * int(rows), 2 * int(cols)


def comfy_step(twin, x: dict):
    """One forward as ComfyUI's sampler makes it; returns the velocity as packed target tokens [B, L, 64]."""
    dtype = twin.dtype
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
    return lambda: pack_latent(twin(latent, timestep, context, y=y, guidance=guidance, ref_latents=refs,
                                    transformer_options={}))


def self_check(comfyui_path, seed: int = 0) -> dict:
    """Tiny float32 model on the CPU: ComfyUI's forward vs our velocity, with and without a context image."""
    twin, errors = compare_with_ours(lambda model: comfy_twin(model, comfyui_path), comfy_step, seed)
    comfy = twin.comfy
    return {"rel_err": errors, "comfyui": str(comfy.path), "comfyui_version": comfy.version,
            "operations": twin.comfy_operations, "manual_cast": str(twin.comfy_manual_cast),
            "attention": comfy.attention, "apply_rope": comfy.apply_rope, "torch": torch.__version__,
            "python": sys.executable}


if __name__ == "__main__":
    # A package ComfyUI imports may be missing in this environment: exit status 3 names it.
    self_check_main(__doc__, "comfyui", "a ComfyUI checkout or a copy staged by stage_comfyui.sh", load_comfy,
                    self_check)
