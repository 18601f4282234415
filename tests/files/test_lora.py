"""LoRA files in every key format, merged or on the fly, stacked and removed; parity with diffusers + peft.

References: the hand-computed weight W + strength * alpha / rank * B @ A (float32, rel < 1e-6), and
diffusers' FluxTransformer2DModel with the same LoRA loaded by peft (float32, rel < 1e-5).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import compiled_graphs, rel_error
from kontext_core import CheckpointError, load_transformer, pack_latent, position_ids, save_transformer
from kontext_core.checkpoints.key_maps import transformer_links
from kontext_core.adapters.lora import (
    LoraError,
    active_loras,
    apply_lora,
    factor_bytes,
    load_lora,
    lora_from_state_dict,
    on_the_fly_bytes,
    preferred_mode,
    remove_all_loras,
)
from kontext_core.compute.quant import QuantizedLinear

RANK, ALPHA = 4, 6.0  # scale alpha / rank = 1.5


def _inputs(config, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    img = pack_latent(torch.randn(1, 16, 4, 6, generator=generator))
    txt = torch.randn(1, 5, config.context_in_dim, generator=generator)
    y = torch.randn(1, config.vec_in_dim, generator=generator)
    return img, position_ids(4, 6), txt, torch.zeros(1, 5, 3), torch.tensor([0.6]), y, torch.tensor([2.5])


def _velocity(model, seed: int = 0) -> torch.Tensor:
    img, img_ids, txt, txt_ids, t, y, g = _inputs(model.config, seed)
    dtype = model.dtype
    with torch.no_grad():
        return model(img.to(dtype), img_ids, txt.to(dtype), txt_ids, t, y.to(dtype), g).float()


def _random_lora(model: nn.Module, seed: int, rank: int = RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A [rank, in], B [out, rank]) for every linear layer, in our fused layout; delta ~ 0.45 W."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantizedLinear)):
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            up = 0.3 * torch.randn(module.out_features, rank, generator=generator) / rank**0.5
            lora[name] = (down, up)
    return lora


def _hand_merged(model: nn.Module, lora, strength: float) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, (down, up) in lora.items():
        state[f"{name}.weight"] += strength * (ALPHA / RANK) * (up @ down)
    return state


# --- writers: one LoRA, every key format --------------------------------------------------------

def _bfl(lora, prefix: str = "diffusion_model.", names=("lora_A", "lora_B")) -> dict[str, torch.Tensor]:
    out = {}
    for layer, (down, up) in lora.items():
        out[f"{prefix}{layer}.{names[0]}.weight"] = down
        out[f"{prefix}{layer}.{names[1]}.weight"] = up
        out[f"{prefix}{layer}.alpha"] = torch.tensor(ALPHA)
    return out


def _kohya(lora) -> dict[str, torch.Tensor]:
    out = {}
    for layer, (down, up) in lora.items():
        stem = "lora_unet_" + layer.replace(".", "_")
        out.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(ALPHA)})
    return out


def _diffusers_modules(lora, config, fold_alpha: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our fused LoRA in diffusers' module names: A shared by q/k/v, B split; norm_out halves swapped."""
    links = {link.ours: link for link in transformer_links(config)}
    out = {}
    for layer, (down, up) in lora.items():
        link = links[f"{layer}.weight"]
        up = up * (ALPHA / RANK) if fold_alpha else up
        theirs = [t.removesuffix(".weight") for t in link.theirs]
        if link.kind == "concat":
            out.update({t: (down, part) for t, part in zip(theirs, up.split(list(link.split)))})
        elif link.kind == "swap_halves":
            shift, scale = up.chunk(2)
            out[theirs[0]] = (down, torch.cat((scale, shift)))
        else:
            out[theirs[0]] = (down, up)
    return out


def _diffusers(lora, config, fold_alpha: bool = True) -> dict[str, torch.Tensor]:
    """PEFT/diffusers keys; alpha folded into the weights, or left to the file's metadata (`fold_alpha=False`)."""
    out = {}
    for module, (down, up) in _diffusers_modules(lora, config, fold_alpha=fold_alpha).items():
        out[f"transformer.{module}.lora_A.weight"] = down
        out[f"transformer.{module}.lora_B.weight"] = up
    return out


def _peft_metadata(lora, config) -> dict[str, str]:
    modules = sorted(_diffusers_modules(lora, config, fold_alpha=False))
    adapter = {"r": RANK, "lora_alpha": ALPHA, "target_modules": modules, "lora_dropout": 0.0,
               "init_lora_weights": True, "use_dora": False, "use_rslora": False, "bias": "none"}
    return {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in adapter.items()})}


def _kohya_diffusers(lora, config) -> dict[str, torch.Tensor]:
    out = {}
    for module, (down, up) in _diffusers_modules(lora, config, fold_alpha=False).items():
        stem = "lora_transformer_" + module.replace(".", "_")
        out.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(ALPHA)})
    return out


FORMATS = {
    "bfl": lambda lora, config: _bfl(lora),
    "comfy": lambda lora, config: _bfl(lora, "model.diffusion_model.", ("lora_down", "lora_up")),
    "bfl_transformer_prefix": lambda lora, config: _bfl(lora, "transformer."),
    "bfl_no_prefix": lambda lora, config: _bfl(lora, ""),
    "kohya": lambda lora, config: _kohya(lora),
    "diffusers": _diffusers,
    "diffusers_alpha_metadata": lambda lora, config: _diffusers(lora, config, fold_alpha=False),
    "kohya_diffusers": _kohya_diffusers,
}


def _write(tmp_path, fmt: str, lora, config, name: str = "lora") -> str:
    path = tmp_path / f"{name}_{fmt}.safetensors"
    metadata = _peft_metadata(lora, config) if fmt == "diffusers_alpha_metadata" else None
    save_file({k: v.clone().contiguous() for k, v in FORMATS[fmt](lora, config).items()}, str(path), metadata=metadata)
    return str(path)


# --- (a) every format, one merged model --------------------------------------------------------

def test_every_format_gives_the_same_merged_weights(tiny_transformer, tmp_path):
    lora = _random_lora(tiny_transformer, seed=3)
    hand = _hand_merged(tiny_transformer, lora, strength=0.8)
    merged = {}
    for fmt in FORMATS:
        loaded = load_lora(_write(tmp_path, fmt, lora, tiny_transformer.config))
        assert set(loaded.targets) == set(lora), fmt
        model = copy.deepcopy(tiny_transformer)
        apply_lora(model, loaded, strength=0.8)
        merged[fmt] = model.state_dict()
    for fmt, state in merged.items():
        for key, value in state.items():
            assert torch.equal(value, merged["bfl"][key]), (fmt, key)
            assert rel_error(value, hand[key]) < 1e-6, (fmt, key)


# --- (b) merged == on the fly == by hand ----------------------------------------------------------

def test_merged_equals_on_the_fly_and_hand_reference(tiny_transformer, tmp_path):
    lora = _random_lora(tiny_transformer, seed=4)
    loaded = load_lora(_write(tmp_path, "diffusers", lora, tiny_transformer.config))
    base = _velocity(tiny_transformer)

    merged = copy.deepcopy(tiny_transformer)
    apply_lora(merged, loaded, strength=0.8, mode="merge")
    on_the_fly = copy.deepcopy(tiny_transformer)
    handle = apply_lora(on_the_fly, loaded, strength=0.8, mode="on_the_fly")
    by_hand = copy.deepcopy(tiny_transformer)
    by_hand.load_state_dict(_hand_merged(tiny_transformer, lora, strength=0.8))

    reference = _velocity(by_hand)
    assert rel_error(reference, base) > 0.05  # the LoRA changes the output visibly
    assert rel_error(_velocity(merged), reference) < 1e-5
    assert rel_error(_velocity(on_the_fly), reference) < 1e-5
    assert handle.mode == "on_the_fly" and active_loras(on_the_fly) == [handle]
    for key, value in on_the_fly.state_dict().items():
        assert torch.equal(value, tiny_transformer.state_dict()[key])  # on the fly never touches weights


def test_compiled_blocks_apply_loras_on_the_fly_and_merged(tiny_transformer, tmp_path):
    # An on-the-fly LoRA added after compilation must reach the compiled blocks, traced into their graphs
    # (not run around them eagerly), and a strength change must not recompile. "aot_eager" traces as the
    # compiler does, on the CPU.
    lora = load_lora(_write(tmp_path, "diffusers", _random_lora(tiny_transformer, seed=5), tiny_transformer.config))
    base = _velocity(tiny_transformer)
    reference = copy.deepcopy(tiny_transformer)
    handle = apply_lora(reference, lora, strength=0.7, mode="merge")
    expected = _velocity(reference)
    handle.set_strength(-0.3)
    expected_weaker = _velocity(reference)
    assert rel_error(expected, base) > 0.05 and rel_error(expected_weaker, expected) > 0.05

    torch._dynamo.reset()
    graphs = compiled_graphs()
    try:
        compiled = copy.deepcopy(tiny_transformer).compile_blocks(backend="aot_eager")
        assert rel_error(_velocity(compiled), base) < 1e-5
        assert compiled_graphs() - graphs == 2  # really compiled
        with apply_lora(compiled, lora, strength=0.7, mode="on_the_fly") as on_the_fly:
            assert rel_error(_velocity(compiled), expected) < 1e-5
            assert compiled_graphs() - graphs == 4  # each block kind traced once more, with the LoRA inside
            on_the_fly.set_strength(-0.3)
            assert rel_error(_velocity(compiled), expected_weaker) < 1e-5
            assert compiled_graphs() - graphs == 4  # the factors were rewritten in place: no recompilation
        assert rel_error(_velocity(compiled), base) < 1e-5
        other_rank = load_lora(_write(tmp_path, "bfl", _random_lora(tiny_transformer, seed=6, rank=2),
                                      tiny_transformer.config))
        with apply_lora(compiled, other_rank, strength=0.7, mode="on_the_fly"):
            by_hand = copy.deepcopy(tiny_transformer)
            by_hand.load_state_dict(_hand_merged(tiny_transformer, _random_lora(tiny_transformer, seed=6, rank=2),
                                                 strength=0.7 * RANK / 2))
            assert rel_error(_velocity(compiled), _velocity(by_hand)) < 1e-5
        assert compiled_graphs() - graphs == 4  # ranks 4 and 2 both padded to 16: the same compiled blocks
        with apply_lora(compiled, lora, strength=0.7, mode="merge"):
            assert rel_error(_velocity(compiled), expected) < 1e-5
        assert rel_error(_velocity(compiled), base) < 1e-5
    finally:
        torch._dynamo.reset()


def test_on_the_fly_factors_follow_the_model_to_another_dtype_and_device(tiny_transformer, tmp_path):
    # ComfyUI moves a model off the GPU and back with .to(); the factors must go with the weights.
    from kontext_core.compute.fused import lora_factors

    lora = load_lora(_write(tmp_path, "diffusers", _random_lora(tiny_transformer, seed=12), tiny_transformer.config))
    reference = copy.deepcopy(tiny_transformer).double()
    apply_lora(reference, lora, strength=0.6, mode="on_the_fly")
    apply_lora(tiny_transformer, lora, strength=0.6, mode="on_the_fly")
    expected = _velocity(tiny_transformer)
    moved = tiny_transformer.double()
    layer = moved.single_blocks[0].linear1
    assert lora_factors(layer).down.dtype == torch.float64 and lora_factors(layer).up.dtype == torch.float64
    assert rel_error(_velocity(moved), _velocity(reference)) < 1e-6  # factors made in float32, then cast
    assert rel_error(_velocity(moved), expected) < 1e-5
    second = load_lora(_write(tmp_path, "bfl", _random_lora(tiny_transformer, seed=13, rank=20),
                              tiny_transformer.config))
    apply_lora(moved, second, strength=0.5, mode="on_the_fly")  # new shapes: re-stacked from parts kept in float32
    assert lora_factors(layer).down.dtype == torch.float64 and lora_factors(layer).down.shape[0] == 64
    apply_lora(reference, second, strength=0.5, mode="on_the_fly")
    assert rel_error(_velocity(moved), _velocity(reference)) < 1e-6
    moved.to("meta")
    assert lora_factors(layer).down.device.type == "meta"


def test_the_lora_is_added_from_every_input_form_of_a_layer(tiny_transformer, tmp_path):
    # The blocks hand a layer its input as a tensor, as e4m3 rows with per-row scales (fp8 layers) or as two
    # column parts never concatenated (the single block's linear2); the LoRA's delta, accumulated into the
    # layer's output in place, must be the same from each.
    from kontext_core.compute.fused import ColumnParts, _plus_lora, lora_factors
    from kontext_core.compute.quant import quantize_rows

    model = tiny_transformer
    lora = load_lora(_write(tmp_path, "diffusers", _random_lora(model, seed=8), model.config))
    layer = model.single_blocks[0].linear2
    x = torch.randn(2, 7, layer.in_features)
    out = torch.randn(2, 7, layer.out_features)

    def delta(layer_input) -> torch.Tensor:
        return _plus_lora(out.clone(), lora_factors(layer), layer_input) - out

    assert torch.equal(delta(x), torch.zeros_like(out))  # no LoRA: the output untouched
    apply_lora(model, lora, strength=0.9, mode="on_the_fly")
    down, up = lora_factors(layer)[:2]
    expected = x.double() @ down.double().t() @ up.double().t()
    assert rel_error(delta(x), expected) < 1e-4
    split = 5
    assert rel_error(delta(ColumnParts(x[..., :split], x[..., split:])), expected) < 1e-4
    rows = quantize_rows(x)
    dequantized = (rows.data.double().reshape(-1, x.shape[-1]) * rows.scale.double()).view(x.shape)
    from_rows = dequantized @ down.double().t() @ up.double().t()
    assert rel_error(delta(rows), from_rows) < 1e-4  # from the same e4m3 values the layer's GEMM reads
    assert rel_error(from_rows, expected) < 0.1  # and those are x within e4m3 rounding


def test_on_the_fly_factors_stack_part_loras_and_change_in_place(tiny_transformer, tmp_path):
    # diffusers LoRAs on to_q / to_k / to_v are row ranges of our fused qkv: stacked into one pair of
    # factors, zero outside each part's rows; a strength change rewrites them in place (what keeps a
    # compiled graph and a captured CUDA graph valid), a removal drops them.
    from kontext_core.compute.fused import lora_factors

    lora = load_lora(_write(tmp_path, "diffusers", _random_lora(tiny_transformer, seed=9), tiny_transformer.config))
    second = load_lora(_write(tmp_path, "bfl", _random_lora(tiny_transformer, seed=10, rank=2),
                              tiny_transformer.config))
    layer = tiny_transformer.double_blocks[0].img_attn.qkv
    first_handle = apply_lora(tiny_transformer, lora, strength=0.5, mode="on_the_fly")
    down, up = lora_factors(layer)[:2]
    parts = len(lora.layers["double_blocks.0.img_attn.qkv"])
    # 3 parts of rank 4: 12, padded with zeros to 16 (ranks share a compilation up to a power of two)
    assert parts == 3 and down.shape == (16, layer.in_features) and up.shape == (layer.out_features, 16)
    assert not down[3 * RANK:].any() and not up[:, 3 * RANK:].any()
    hidden = layer.in_features
    for index, part in enumerate(lora.layers["double_blocks.0.img_attn.qkv"]):
        columns = slice(index * RANK, (index + 1) * RANK)
        rows = slice(part.part * hidden, (part.part + 1) * hidden)
        assert torch.equal(up[rows, columns], part.up * 0.5)
        assert torch.count_nonzero(up[:, columns]) == torch.count_nonzero(up[rows, columns])
    first_handle.set_strength(-1.5)
    down_after, up_after = lora_factors(layer)[:2]
    assert up_after is up and down_after is down  # the same tensors, rewritten
    first_part = lora.layers["double_blocks.0.img_attn.qkv"][0]
    rows = slice(first_part.part * hidden, (first_part.part + 1) * hidden)
    assert torch.equal(up[rows, :RANK], first_part.up * -1.5)
    second_handle = apply_lora(tiny_transformer, second, strength=1.0, mode="on_the_fly")
    assert lora_factors(layer)[0].shape == (16, layer.in_features)  # 3 * 4 + 2 = 14 -> 16
    first_handle.remove()
    assert lora_factors(layer)[0].shape == (16, layer.in_features)  # 2 -> 16
    second_handle.set_strength(0.0)
    assert lora_factors(layer) is None  # nothing to add: no thin GEMMs at all
    second_handle.remove()
    assert lora_factors(layer) is None and active_loras(tiny_transformer) == []


# --- (c) parity with diffusers + peft ------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["diffusers", "diffusers_alpha_metadata"])
def test_matches_diffusers_with_peft(tiny_transformer, tmp_path, fmt):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference (pip install diffusers)")
    pytest.importorskip("peft", reason="peft loads the LoRA into diffusers (pip install peft)")
    lora = _random_lora(tiny_transformer, seed=5)
    path = _write(tmp_path, fmt, lora, tiny_transformer.config)
    save_transformer(tiny_transformer, tmp_path / "transformer", layout="diffusers")
    theirs_model = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    # Folder + weight_name: the way diffusers reads the file's adapter metadata (lora_alpha).
    theirs_model.load_lora_adapter(str(tmp_path), weight_name=f"lora_{fmt}.safetensors", prefix="transformer",
                                   adapter_name="edit")
    assert theirs_model.peft_config["edit"].lora_alpha == (ALPHA if fmt == "diffusers_alpha_metadata" else RANK)
    theirs_model.set_adapters(["edit"], weights=[0.7])

    ours_model = copy.deepcopy(tiny_transformer)
    apply_lora(ours_model, path, strength=0.7)
    img, img_ids, txt, txt_ids, t, y, g = _inputs(tiny_transformer.config)
    with torch.no_grad():
        ours = ours_model(img, img_ids, txt, txt_ids, t, y, g)
        theirs = theirs_model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                              img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=g).sample
    assert rel_error(ours, _velocity(tiny_transformer)) > 0.05
    assert rel_error(ours, theirs) < 1e-5


# --- (d) stacking and removal --------------------------------------------------------------------

def test_stacked_merges_unmerge_to_the_exact_original(tiny_transformer, tmp_path):
    original = {k: v.clone() for k, v in tiny_transformer.state_dict().items()}
    base = _velocity(tiny_transformer)
    first = load_lora(_write(tmp_path, "kohya", _random_lora(tiny_transformer, seed=6), tiny_transformer.config))
    second = load_lora(_write(tmp_path, "diffusers", _random_lora(tiny_transformer, seed=7, rank=2),
                              tiny_transformer.config))

    stacked_on_the_fly = copy.deepcopy(tiny_transformer)
    apply_lora(stacked_on_the_fly, first, 0.6, mode="on_the_fly")
    apply_lora(stacked_on_the_fly, second, -0.4, mode="on_the_fly")

    model = tiny_transformer
    only_second = copy.deepcopy(model)
    a = apply_lora(model, first, 0.6)
    b = apply_lora(model, second, -0.4)
    assert rel_error(_velocity(model), _velocity(stacked_on_the_fly)) < 1e-5
    remove_all_loras(stacked_on_the_fly)
    assert active_loras(stacked_on_the_fly) == [] and torch.equal(_velocity(stacked_on_the_fly), base)

    a.remove()  # not the last one applied: the second must stay, alone, as if merged by itself
    apply_lora(only_second, second, -0.4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, only_second.state_dict()[key]), key

    b.remove()  # removing twice is harmless
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert torch.equal(_velocity(model), base)


def test_on_the_fly_removal_and_context_manager_restore_outputs(tiny_transformer, tmp_path):
    base = _velocity(tiny_transformer)
    lora = load_lora(_write(tmp_path, "bfl", _random_lora(tiny_transformer, seed=8), tiny_transformer.config))
    with apply_lora(tiny_transformer, lora, mode="on_the_fly"):
        assert rel_error(_velocity(tiny_transformer), base) > 0.05
    assert torch.equal(_velocity(tiny_transformer), base)


# --- (e) strength ----------------------------------------------------------------------------------

def test_half_strength_halves_the_delta(tiny_transformer, tmp_path):
    lora = load_lora(_write(tmp_path, "comfy", _random_lora(tiny_transformer, seed=9), tiny_transformer.config))
    original = {k: v.clone() for k, v in tiny_transformer.state_dict().items()}
    full, half = copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_transformer)
    apply_lora(full, lora, 1.0)
    handle = apply_lora(half, lora, 1.0)
    handle.set_strength(0.5)
    for key in original:
        full_delta = full.state_dict()[key] - original[key]
        half_delta = half.state_dict()[key] - original[key]
        if full_delta.abs().max() > 0:
            assert rel_error(half_delta, 0.5 * full_delta) < 1e-5, key

    on_the_fly = copy.deepcopy(tiny_transformer)
    apply_lora(on_the_fly, lora, 2.0, mode="on_the_fly").set_strength(0.5)
    assert rel_error(_velocity(on_the_fly), _velocity(half)) < 1e-5


# --- (f) fp8 models ------------------------------------------------------------------------------

def test_fp8_model_on_the_fly_and_merged(tiny_transformer, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "fp8.safetensors", weights="fp8_e4m3fn_scaled")
    kept = load_transformer(tmp_path / "fp8.safetensors", dtype="fp8")
    upcast = load_transformer(tmp_path / "fp8.safetensors", dtype="bf16")  # the same fp8 values, in bf16
    assert isinstance(kept.double_blocks[0].img_attn.qkv, QuantizedLinear)
    original = {k: v.clone() for k, v in kept.state_dict().items()}
    base = _velocity(kept)
    lora = load_lora(_write(tmp_path, "diffusers", _random_lora(tiny_transformer, seed=10), tiny_transformer.config))

    handle = apply_lora(kept, lora, mode="on_the_fly")
    apply_lora(upcast, lora, mode="on_the_fly")
    with_lora = _velocity(kept)
    assert rel_error(with_lora, base) > 0.05
    # Both compute in bf16 from the same fp8 values and LoRA; only the order of bf16 roundings differs.
    assert rel_error(with_lora, _velocity(upcast)) < 2e-2
    handle.remove()
    assert torch.equal(_velocity(kept), base)

    # The default ("auto") keeps fp8 weights untouched and merges into others.
    handle = apply_lora(kept, lora)
    assert handle.mode == "on_the_fly" and preferred_mode(kept) == "on_the_fly"
    assert rel_error(_velocity(kept), with_lora) < 1e-6
    handle.remove()
    merged_upcast = load_transformer(tmp_path / "fp8.safetensors", dtype="bf16")
    assert apply_lora(merged_upcast, lora).mode == "merge" and preferred_mode(merged_upcast) == "merge"

    # Merged into fp8 on request: dequantize, add, requantize; close to on the fly within fp8 resolution.
    handle = apply_lora(kept, lora, mode="merge")
    assert kept.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert rel_error(_velocity(kept), with_lora) < 0.1
    handle.remove()
    for key, value in kept.state_dict().items():
        assert torch.equal(value, original[key]), key


@pytest.mark.parametrize("fp8_gemms", [False, True], ids=["upcast", "fp8-gemms"])
def test_on_the_fly_bytes_foretells_the_factors_memory(tiny_transformer, tmp_path, fp8_gemms, monkeypatch):
    # The nodes make room for on-the-fly factors before making them (ComfyUI counts them with the model):
    # the estimate must equal what is then allocated, in bf16 and fp8, for part LoRAs and stacked ones; with
    # fp8 GEMMs (here through PyTorch's CPU _scaled_mm) fp8 layers take them as GEMM columns.
    from kontext_core.placement import memory
    from kontext_core.compute import quant
    from kontext_core.adapters import wide_lora
    from kontext_core.compute.fused import lora_factors

    monkeypatch.setattr(quant, "_fp8_matmul_on_cpu", fp8_gemms)
    save_transformer(tiny_transformer, tmp_path / "fp8.safetensors", weights="fp8_e4m3fn_scaled")
    parts = load_lora(_write(tmp_path, "diffusers", _random_lora(tiny_transformer, seed=11), tiny_transformer.config))
    whole = load_lora(_write(tmp_path, "bfl", _random_lora(tiny_transformer, seed=12, rank=24),
                             tiny_transformer.config, name="whole"))
    for dtype in ("bf16", "fp8"):
        model = load_transformer(tmp_path / "fp8.safetensors", dtype=dtype)
        assert factor_bytes(model) == 0
        handles = []
        for applied in ([parts], [parts, whole]):
            handles.append(apply_lora(model, applied[-1], mode="on_the_fly"))
            measured = factor_bytes(model)
            # Layers whose LoRAs are too strong for GEMM columns keep thin GEMMs: the estimate counted columns.
            kept_thin = sum(wide_lora.column_bytes(layer, factors.down.shape[0])
                            for name, layer in model.named_modules()
                            if (factors := lora_factors(layer)) is not None and factors.wide is None
                            and wide_lora.eligible(model, name))
            assert measured > 0 and on_the_fly_bytes(model, applied) == measured + kept_thin, (dtype, len(applied))
            assert kept_thin == 0 or len(applied) == 2  # the two together are strong (~0.9x the weights)
        wide = lora_factors(model.double_blocks[0].img_attn.qkv).wide is not None
        assert wide == (fp8_gemms and dtype == "fp8")
        if wide:  # the memory plan's estimate from the config alone (a meta model) counts the same bytes
            assert memory.lora_bytes(model.config, "fp8", [parts, whole]) == on_the_fly_bytes(model, [parts, whole])
        if not wide:  # (as GEMM columns both stacks pad to one 128-wide tile)
            assert on_the_fly_bytes(model, [whole]) < factor_bytes(model)
        remove_all_loras(model)
        assert factor_bytes(model) == 0
        apply_lora(model, whole, mode="merge")
        assert factor_bytes(model) == 0  # merged: nothing beside the weights


# --- (g) bad files and skipped keys ------------------------------------------------------------

def _expect(pattern: str, path, error: type = LoraError):
    with pytest.raises(error, match=pattern):
        load_lora(path)


def test_bad_files_are_explained(tiny_transformer, tmp_path):
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    _expect("pickled PyTorch file.*only .safetensors", pickle, CheckpointError)

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 4),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, str(sdxl))
    _expect("input_blocks_4_1.*Stable Diffusion XL LoRA", sdxl)

    model_file = tmp_path / "flux1-kontext-dev.safetensors"
    save_transformer(tiny_transformer, model_file)
    _expect("looks like a FLUX transformer, not a LoRA.*load_transformer", model_file)

    lora = _random_lora(tiny_transformer, seed=11)
    tensors = _bfl(lora)
    del tensors["diffusion_model.img_in.lora_B.weight"]
    save_file(tensors, str(tmp_path / "half.safetensors"))
    _expect("img_in has no up weight.*incomplete", tmp_path / "half.safetensors")

    loha = {f"diffusion_model.img_in.hada_w1_{n}": torch.zeros(4, 4) for n in "ab"}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    _expect("LyCORIS LoHa.*plain LoRA", tmp_path / "loha.safetensors")

    # A LoRA for the full-size model (or another model) does not fit the tiny one.
    wide = {f"transformer.transformer_blocks.0.attn.to_q.lora_{n}.weight": torch.zeros(s) for n, s in
            (("A", (4, 3072)), ("B", (3072, 4)))}
    with pytest.raises(LoraError, match="does not fit this model.*hidden size is 128.*Use a LoRA made for this model"):
        apply_lora(tiny_transformer, lora_from_state_dict(wide, "wide"))
    deep = {f"transformer.single_transformer_blocks.30.proj_out.lora_{n}.weight": torch.zeros(4, 4) for n in "AB"}
    with pytest.raises(LoraError, match="layers this model does not have.*single_blocks.30.linear2"):
        apply_lora(tiny_transformer, lora_from_state_dict(deep, "deep"))
    with pytest.raises(ValueError, match="unknown LoRA mode"):
        apply_lora(tiny_transformer, lora_from_state_dict(deep, "deep"), mode="patch")


def test_text_encoder_keys_are_skipped_with_a_warning(tiny_transformer, tmp_path):
    tensors = _kohya(_random_lora(tiny_transformer, seed=12))
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(tmp_path / "with_te.safetensors"))
    with pytest.warns(UserWarning, match="1 text-encoder LoRA modules skipped"):
        lora = load_lora(tmp_path / "with_te.safetensors")
    assert lora.skipped == ["lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    assert lora.format == "kohya" and lora.rank == RANK


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU <-> CPU copies need a CUDA GPU")
def test_merges_on_the_gpu_back_up_and_restore_through_the_staging_buffer_exactly(tiny_transformer, tmp_path,
                                                                                  monkeypatch):
    from kontext_core.adapters import lora as lora_module

    # A staging buffer smaller than most weights, of an odd size: every copy takes several chunks and a remainder.
    monkeypatch.setattr(lora_module, "_STAGING_BYTES", 1000)
    model = tiny_transformer.to("cuda", torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_lora(model, load_lora(_write(tmp_path, "kohya", _random_lora(model, seed=6), model.config)), 0.7)
    backups = [record.weight for record in lora_module._MERGED.values()]
    assert backups and all(b.device.type == "cpu" for b in backups)
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    handle.set_strength(0.3)
    handle.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
