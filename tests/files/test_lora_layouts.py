"""Every FLUX LoRA layout that diffusers reads, read by us into the same updates; the errors for other files.

Reference: diffusers 0.42's `FluxLoraLoaderMixin.lora_state_dict`, its own conversion of each file into its
module names (lora_A / lora_B, alphas, lora_B.bias, norm weights). Its update of each diffusers module, as peft
applies it (B @ A * alpha / rank: kohya's alpha baked into A and B by the conversion, network alphas from
`.alpha` tensors, scale 1 without), is mapped to our layout through the full-weight converter's own links
(key_maps.to_ours: q / k / v -> row blocks of qkv; norm_out.linear's halves swapped) and compared with our
`LoraWeights`: ΔW of every touched layer, bias deltas, norm replacements; the two sets of touched layers equal.
Tolerance: relative error max|ours - theirs| / max|theirs| < 1e-6 in float32 (the same float32 factors, scaled
on the other side of the product).

diffusers' converters hard-code FLUX.1 [dev]'s sizes (kohya's single-block linear1 split 3x3072 + 12288; the
BFL control and fal Kontext converters read all 19 + 38 blocks), so those files are made at [dev] widths with
ranks 2-4 (no model is built: the names and shapes come from a meta-device model), and ΔW is compared through
8 random probe columns (D @ X with Gaussian X is zero only when D is); the others use the tiny config and
compare ΔW whole.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import rel_error, tiny_edit_args
from kontext_core.checkpoints.key_maps import to_ours, transformer_links
from kontext_core.model.config import TransformerConfig
from kontext_core.adapters.lora import LoraError, LoraWeights, apply_lora, load_lora, lora_from_state_dict
from kontext_core.model.transformer import KontextTransformer

TOLERANCE = 1e-6
DEV_WIDTHS = TransformerConfig(depth=2, depth_single_blocks=2)  # kohya: any blocks, [dev]'s widths
DEV = TransformerConfig()  # control and fal Kontext: every block of [dev]
TINY = TransformerConfig.tiny()
KOHYA_TEXT_ENCODER = "lora_te1_text_model_encoder_layers_0_mlp_fc1"


def _flux_lora_state_dict(path):
    """diffusers' conversion: (state dict in its names, network alphas or None)."""
    pytest.importorskip("diffusers", reason="diffusers is the reference (pip install diffusers)")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    state_dict, alphas = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True)
    return state_dict, alphas or {}


# --- shapes and random factors ---------------------------------------------------------------------

def _linear_shapes(config: TransformerConfig) -> dict[str, tuple[int, int]]:
    """Our linear layers -> (out, in), from a model on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = KontextTransformer(config)
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _norms(config: TransformerConfig) -> dict[str, int]:
    """Our q / k norms' scale parameters -> their size."""
    return {link.ours: config.head_dim for link in transformer_links(config) if link.ours.endswith(".scale")}


def _diffusers_shapes(config: TransformerConfig) -> dict[str, tuple[int, int]]:
    """diffusers' linear modules -> (out, in)."""
    ours, shapes = _linear_shapes(config), {}
    for link in transformer_links(config):
        if link.ours.endswith(".weight"):
            rows, columns = ours[link.ours.removesuffix(".weight")]
            for theirs, size in zip(link.theirs, link.split or (rows,)):
                shapes[theirs.removesuffix(".weight")] = (size, columns)
    return shapes


class Factors:
    """Random LoRA factors, reproducible from a seed; ΔW ~ 0.3 W of a unit-variance layer."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def pair(self, shape: tuple[int, int], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, columns = shape
        down = torch.randn(rank, columns, generator=self.generator) / columns**0.5
        up = 0.3 * torch.randn(rows, rank, generator=self.generator) / rank**0.5
        return down, up

    def vector(self, size: int, offset: float = 0.0) -> torch.Tensor:
        return offset + 0.1 * torch.randn(size, generator=self.generator)

    def alpha(self, rank: int) -> torch.Tensor:
        return torch.tensor(float(rank) * [0.5, 1.0, 2.0, 8.0][int(torch.randint(4, (1,), generator=self.generator))])


def _save(tmp_path, name: str, tensors: dict[str, torch.Tensor]):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# --- the files: one writer per layout, each in that layout's own names ------------------------------

def _kohya_bfl(config, seed: int, prefix: str = "lora_unet_", dotted: bool = False) -> dict[str, torch.Tensor]:
    """sd-scripts' FLUX LoRA (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`), or with
    `prefix="diffusion_model."`, `dotted=True` the same in ComfyUI's spelling: every linear, non-block layers
    too, alphas per module, a text-encoder module, and one linear1 whose up-projection is block-diagonal over
    q / k / v / mlp (diffusers then splits its down-projection instead of sharing it)."""
    factors, tensors = Factors(seed), {}
    for layer, shape in _linear_shapes(config).items():
        rank = 4
        down, up = factors.pair(shape, rank)
        if layer == "single_blocks.1.linear1":
            hidden = config.hidden_size
            rows = (0, hidden, 2 * hidden, 3 * hidden, shape[0])
            for part in range(4):
                up[rows[part]:rows[part + 1]] *= torch.nn.functional.one_hot(torch.tensor(part), 4).float()
        stem = f"{prefix}{layer if dotted else layer.replace('.', '_')}"
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        # diffusers' kohya conversion drops final_layer's alphas (its TODO), so they equal the rank here.
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank)) if "final_layer" in layer else factors.alpha(rank)
    if dotted:
        te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"
    else:
        te = KOHYA_TEXT_ENCODER
    tensors[f"{te}.lora_down.weight"], tensors[f"{te}.lora_up.weight"] = factors.pair((3072, 768), 4)
    tensors[f"{te}.alpha"] = torch.tensor(4.0)
    return tensors


def _kohya_diffusers(config, seed: int) -> dict[str, torch.Tensor]:
    """OneTrainer's kohya-style names for diffusers' modules (`lora_transformer_transformer_blocks_0_attn_to_q`),
    alphas per module, and a text-encoder module. diffusers reads this layout's attention projections and
    non-block layers (it maps a block's other modules onto the block itself), so the file holds those;
    tests/files/test_lora.py checks the layout on every layer against a hand-made reference."""
    factors, tensors = Factors(seed), {}
    for module, shape in _diffusers_shapes(config).items():
        if "blocks." in module and ".attn." not in module:
            continue
        stem = "lora_transformer_" + module.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = factors.pair(shape, 4)
        tensors[f"{stem}.alpha"] = factors.alpha(4)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    tensors[f"{te}.lora_down.weight"], tensors[f"{te}.lora_up.weight"] = factors.pair((768, 768), 4)
    tensors[f"{te}.alpha"] = torch.tensor(4.0)
    return tensors


def _xlabs(config, seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """XLabs' processor LoRAs: qkv_lora1 / proj_lora1 (image stream), qkv_lora2 / proj_lora2 (text stream) in
    double blocks, qkv_lora / proj_lora in single blocks; no alphas."""
    factors, tensors, hidden = Factors(seed), {}, config.hidden_size
    shapes = _linear_shapes(config)

    def add(stem, shape):
        down, up = factors.pair(shape, 4)
        tensors[f"{prefix}{stem}.down.weight"], tensors[f"{prefix}{stem}.up.weight"] = down, up

    for i in range(config.depth):
        for stream in "12":
            add(f"double_blocks.{i}.processor.qkv_lora{stream}", (3 * hidden, hidden))
            add(f"double_blocks.{i}.processor.proj_lora{stream}", (hidden, hidden))
    for i in range(config.depth_single_blocks):
        add(f"single_blocks.{i}.processor.qkv_lora", (3 * hidden, hidden))
        add(f"single_blocks.{i}.processor.proj_lora", shapes[f"single_blocks.{i}.linear2"])
    return tensors


def _bfl_control(config, seed: int, rank: int = 2, input_channels: int | None = None) -> dict[str, torch.Tensor]:
    """A FLUX.1 Canny / Depth [dev] LoRA as BFL ships it: every linear with lora_A / lora_B and peft's lora_B.bias,
    every q / k norm's scale whole; img_in reads `input_channels` (the image's and the control image's latents)."""
    factors, tensors = Factors(seed), {}
    for layer, (rows, columns) in _linear_shapes(config).items():
        if layer == "img_in" and input_channels is not None:
            columns = input_channels
        down, up = factors.pair((rows, columns), rank)
        tensors[f"{layer}.lora_A.weight"], tensors[f"{layer}.lora_B.weight"] = down, up
        tensors[f"{layer}.lora_B.bias"] = factors.vector(rows)
    for norm, size in _norms(config).items():
        tensors[norm] = factors.vector(size, offset=1.0)
    return tensors


def _fal_kontext(config, seed: int) -> dict[str, torch.Tensor]:
    """fal's Kontext trainer: peft's `base_model.model.` over BFL names, the blocks and final_layer.linear."""
    factors, tensors = Factors(seed), {}
    for layer, shape in _linear_shapes(config).items():
        if layer.startswith(("double_blocks.", "single_blocks.")) or layer == "final_layer.linear":
            down, up = factors.pair(shape, 2)
            tensors[f"base_model.model.{layer}.lora_A.weight"] = down
            tensors[f"base_model.model.{layer}.lora_B.weight"] = up
    return tensors


def _peft(config, seed: int) -> dict[str, torch.Tensor]:
    """ai-toolkit / diffusers / peft: `transformer.` + diffusers' module names, lora_A / lora_B on every module,
    `.alpha` on some, lora_B.bias on some (norm_out.linear's among them: its halves swap), and a control LoRA's
    norm replacements in diffusers' names."""
    factors, tensors = Factors(seed), {}
    for index, (module, shape) in enumerate(_diffusers_shapes(config).items()):
        down, up = factors.pair(shape, 4)
        tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"] = down, up
        if index % 3 == 0:
            tensors[f"transformer.{module}.alpha"] = factors.alpha(4)
        if index % 4 == 1 or module in ("norm_out.linear", "transformer_blocks.0.attn.to_k"):
            tensors[f"transformer.{module}.lora_B.bias"] = factors.vector(shape[0])
    for link in transformer_links(config):
        if link.ours.endswith(".scale") and link.ours.startswith(("double_blocks.0.", "single_blocks.1.")):
            tensors[f"transformer.{link.theirs[0]}"] = factors.vector(config.head_dim, offset=1.0)
    return tensors


# --- both sides in our layout ------------------------------------------------------------------------

class Probes:
    """What each ΔW is multiplied by, per input width: the identity for narrow layers (ΔW itself), else 8 random
    columns."""

    def __init__(self):
        self.generator, self.made = torch.Generator().manual_seed(0), {}

    def __call__(self, columns: int) -> torch.Tensor:
        if columns not in self.made:
            self.made[columns] = (torch.eye(columns, dtype=torch.float64) if columns <= 1024
                                  else torch.randn(columns, 8, generator=self.generator, dtype=torch.float64))
        return self.made[columns]


def _ours(lora, config, probes: Probes) -> dict[str, torch.Tensor]:
    """Our LoraWeights as {layer: ΔW @ X, parameter: its delta or replacement}."""
    shapes = _linear_shapes(config)
    splits = {link.ours.removesuffix(".weight"): link.split for link in transformer_links(config)
              if link.kind == "concat" and link.ours.endswith(".weight")}

    def rows(layer, part, total):
        if part is None:
            return slice(0, total)
        start = sum(splits[layer][:part])
        return slice(start, start + splits[layer][part])

    out = {}
    for layer, parts in lora.layers.items():
        probe = probes(parts[0].down.shape[1])
        delta = torch.zeros(shapes[layer][0], probe.shape[1], dtype=torch.float64)
        for part in parts:
            delta[rows(layer, part.part, delta.shape[0])] += part.up.double() @ (part.down.double() @ probe)
        out[layer] = delta
    for parameter, changes in lora.changes.items():
        layer, _, param = parameter.rpartition(".")
        total = shapes[layer][0] if param == "bias" else changes[0].value.shape[0]
        value = torch.zeros(total, dtype=torch.float64)
        for change in changes:
            value[rows(layer, change.part, total)] += change.value.double()
        out[parameter] = value
    return out


def _theirs(state_dict, alphas, config, probes: Probes) -> dict[str, torch.Tensor]:
    """diffusers' converted updates as {our layer: ΔW @ X, our parameter: delta or replacement}, mapped through
    the full-weight converter's links (zeros for a part of a fused layer that the file leaves alone)."""
    our_rows = {layer: rows for layer, (rows, _) in _linear_shapes(config).items()}
    deltas, biases, norms = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith("text_encoder."):
            continue
        # diffusers' kohya conversion names the non-block modules without `transformer.` (so that its
        # load_lora_weights, which passes `transformer.` keys on, leaves them out): compared all the same.
        prefix = "transformer." if key.startswith("transformer.") else ""
        module = key.removeprefix(prefix)
        if module.endswith(".lora_A.weight"):
            module = module.removesuffix(".lora_A.weight")
            down, up = value.double(), state_dict[f"{prefix}{module}.lora_B.weight"].double()
            alpha = alphas.get(f"{prefix}{module}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            deltas[module] = scale * up @ (down @ probes(down.shape[1]))
            bias = state_dict.get(f"{prefix}{module}.lora_B.bias")
            if bias is not None:
                biases[module] = scale * bias.double()
        elif not module.endswith((".lora_B.weight", ".lora_B.bias")):
            norms[module.removesuffix(".weight")] = value.double()
    out = {}
    for link in transformer_links(config):
        theirs = [t.rpartition(".")[0] for t in link.theirs]
        if link.ours.endswith(".scale"):
            if theirs[0] in norms:
                out[link.ours] = norms[theirs[0]]
            continue
        if not link.ours.endswith(".weight"):
            continue
        layer = link.ours.removesuffix(".weight")
        sizes = link.split or (our_rows[layer],)
        present = [deltas[t] for t in theirs if t in deltas]
        if present:
            columns = present[0].shape[1]
            out[layer] = to_ours(link, [deltas.get(t, torch.zeros(size, columns, dtype=torch.float64))
                                        for t, size in zip(theirs, sizes)], None)
        if any(t in biases for t in theirs):
            out[f"{layer}.bias"] = to_ours(link, [biases.get(t, torch.zeros(size, dtype=torch.float64))
                                                  for t, size in zip(theirs, sizes)], None)
    return out


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].shape == value.shape, name
        assert rel_error(ours[name], value) < TOLERANCE, (name, rel_error(ours[name], value))


def _compare_with_diffusers(path, config) -> tuple[LoraWeights, list[str]]:
    """Our reading of `path` equals diffusers'; returns it and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = load_lora(path)
    state_dict, alphas = _flux_lora_state_dict(path)
    probes = Probes()
    _assert_same(_ours(lora, config, probes), _theirs(state_dict, alphas, config, probes))
    return lora, [str(w.message) for w in caught]


# --- every layout against diffusers --------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["kohya", "comfyui"])
def test_kohya_bfl_names_match_diffusers(tmp_path, spelling):
    # sd-scripts' `lora_unet_double_blocks_0_...` and ComfyUI's `diffusion_model.double_blocks.0....lora_down`
    # (which diffusers reads as the same): every linear, img_in / txt_in / time_in / vector_in / guidance_in /
    # final_layer included; diffusers swaps final_layer.adaLN_modulation's halves into norm_out.linear and the
    # comparison swaps them back through key_maps.
    if spelling == "kohya":
        tensors = _kohya_bfl(DEV_WIDTHS, seed=1)
    else:
        tensors = _kohya_bfl(DEV_WIDTHS, seed=1, prefix="diffusion_model.", dotted=True)
    lora, caught = _compare_with_diffusers(_save(tmp_path, spelling, tensors), DEV_WIDTHS)
    assert set(lora.layers) == set(_linear_shapes(DEV_WIDTHS))  # every layer, none dropped
    assert lora.format == ("kohya" if spelling == "kohya" else "bfl")
    assert len(caught) == 1 and "1 text-encoder LoRA modules skipped" in caught[0]
    assert lora.skipped == [KOHYA_TEXT_ENCODER if spelling == "kohya"
                            else "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"]


def test_kohya_diffusers_names_match_diffusers(tmp_path):
    lora, _ = _compare_with_diffusers(_save(tmp_path, "onetrainer", _kohya_diffusers(TINY, seed=2)), TINY)
    assert {"final_layer.adaLN_modulation.1", "img_in", "time_in.in_layer", "guidance_in.out_layer",
            "vector_in.in_layer", "txt_in", "final_layer.linear", "single_blocks.1.linear1"} <= set(lora.layers)
    assert lora.format == "kohya" and lora.skipped == ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_matches_diffusers(tmp_path, prefix):
    lora, caught = _compare_with_diffusers(_save(tmp_path, "xlabs", _xlabs(TINY, seed=3, prefix=prefix)), TINY)
    assert lora.format == "xlabs" and not caught
    assert [p.part for p in lora.layers["single_blocks.0.linear1"]] == [0, 1, 2]  # q, k, v; not the MLP rows


def test_bfl_control_lora_matches_diffusers(tmp_path):
    # img_in reads 128 channels, as in the real files: reading them is fine, applying them to Kontext is not
    # (test_control_lora_on_kontext).
    path = _save(tmp_path, "control", _bfl_control(DEV, seed=4, input_channels=2 * DEV.in_channels))
    lora = load_lora(path)
    state_dict, alphas = _flux_lora_state_dict(path)
    # diffusers' control converter swaps the rank halves of norm_out.linear's lora_A as well as the row halves
    # of its lora_B: a permutation of the rank that B's columns do not follow, so its ΔW there is not the file's
    # (B @ A in BFL's order). Undone here, the rest of its conversion is the reference.
    down = state_dict["transformer.norm_out.linear.lora_A.weight"]
    state_dict["transformer.norm_out.linear.lora_A.weight"] = torch.cat(down.chunk(2)[::-1])
    probes = Probes()
    ours, theirs = _ours(lora, DEV, probes), _theirs(state_dict, alphas, DEV, probes)
    _assert_same(ours, theirs)
    assert len([k for k in ours if k.endswith(".scale")]) == 4 * DEV.depth + 2 * DEV.depth_single_blocks
    assert all(c.kind == "set" for name, changes in lora.changes.items() if name.endswith(".scale") for c in changes)
    assert all(c.kind == "add" for name, changes in lora.changes.items() if name.endswith(".bias") for c in changes)
    assert len(lora.layers) == len(_linear_shapes(DEV))


def test_fal_kontext_matches_diffusers(tmp_path):
    lora, caught = _compare_with_diffusers(_save(tmp_path, "fal", _fal_kontext(DEV, seed=5)), DEV)
    assert lora.format == "bfl" and not caught
    assert len(lora.layers) == 10 * DEV.depth + 3 * DEV.depth_single_blocks + 1


def test_peft_transformer_names_match_diffusers(tmp_path):
    tensors = _peft(TINY, seed=6)
    lora, _ = _compare_with_diffusers(_save(tmp_path, "peft", tensors), TINY)
    assert set(lora.layers) == set(_linear_shapes(TINY)) and lora.format == "diffusers"
    # norm_out.linear is (scale, shift) in diffusers' names, (shift, scale) in ours: the up-projection's row
    # halves swap (the rank columns and the down-projection do not), and the bias's likewise.
    (part,) = lora.layers["final_layer.adaLN_modulation.1"]
    alpha = tensors.get("transformer.norm_out.linear.alpha", torch.tensor(4.0)) / 4
    scale_rows, shift_rows = (tensors["transformer.norm_out.linear.lora_B.weight"] * alpha).chunk(2)
    assert torch.equal(part.up, torch.cat((shift_rows, scale_rows)))
    assert torch.equal(part.down, tensors["transformer.norm_out.linear.lora_A.weight"])
    (bias,) = lora.changes["final_layer.adaLN_modulation.1.bias"]
    scale_half, shift_half = (tensors["transformer.norm_out.linear.lora_B.bias"] * alpha).chunk(2)
    assert torch.equal(bias.value, torch.cat((shift_half, scale_half)))


# --- applying what is not low-rank -------------------------------------------------------------------

def _comfyui_with_differences(model, seed: int) -> dict[str, torch.Tensor]:
    """ComfyUI's layout (`diffusion_model.` + BFL names, lora_A / lora_B with alphas) with full differences:
    `.diff` of a weight and of a norm's scale, `.diff_b` of biases (one of them final_layer's), `.set_weight`."""
    factors, tensors, shapes = Factors(seed), {}, _linear_shapes(model.config)
    for layer, shape in shapes.items():
        if layer.startswith("double_blocks.0.") or not layer.startswith(("double_blocks", "single_blocks")):
            down, up = factors.pair(shape, 4)
            tensors[f"diffusion_model.{layer}.lora_A.weight"], tensors[f"diffusion_model.{layer}.lora_B.weight"] = (
                down, up)
            tensors[f"diffusion_model.{layer}.alpha"] = factors.alpha(4)
    rows, columns = shapes["double_blocks.1.txt_mlp.2"]
    tensors["diffusion_model.double_blocks.1.txt_mlp.2.diff"] = factors.vector(rows * columns).reshape(rows, columns)
    tensors["diffusion_model.single_blocks.0.norm.query_norm.scale.diff"] = factors.vector(model.config.head_dim)
    tensors["diffusion_model.double_blocks.1.img_attn.norm.key_norm.scale.set_weight"] = factors.vector(
        model.config.head_dim, offset=1.0)
    for layer in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1"):
        tensors[f"diffusion_model.{layer}.diff_b"] = factors.vector(shapes[layer][0])
    return tensors


def _by_hand(model, tensors, strength: float) -> dict[str, torch.Tensor]:
    state = {k: v.clone().double() for k, v in model.state_dict().items()}
    for key, value in tensors.items():
        value = value.double()
        name = key.removeprefix("diffusion_model.")
        if name.endswith(".lora_A.weight"):
            layer = name.removesuffix(".lora_A.weight")
            up = tensors[f"diffusion_model.{layer}.lora_B.weight"].double()
            alpha = float(tensors[f"diffusion_model.{layer}.alpha"]) / value.shape[0]
            state[f"{layer}.weight"] += strength * alpha * up @ value
        elif name.endswith(".diff_b"):
            state[name.replace(".diff_b", ".bias")] += strength * value
        elif name.endswith(".scale.diff"):
            state[name.removesuffix(".diff")] += strength * value
        elif name.endswith(".diff"):
            state[name.replace(".diff", ".weight")] += strength * value
        elif name.endswith(".set_weight"):
            parameter = name.removesuffix(".set_weight")
            state[parameter] += strength * (value - state[parameter])
    return state


@pytest.mark.parametrize("mode", ["merge", "on_the_fly"])
def test_comfyui_differences_are_applied_and_removed(tiny_transformer, mode):
    # diffusers drops `.diff_b` and norm `.diff` keys and refuses a weight's `.diff`; ComfyUI applies them, and so
    # do we: the reference is by hand, W + strength * (alpha / rank * B @ A), parameter + strength * difference.
    model = tiny_transformer
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = _comfyui_with_differences(model, seed=7)
    lora = lora_from_state_dict(tensors, "comfy")
    assert lora.format == "bfl" and not lora.unmatched
    merged = copy.deepcopy(model)
    apply_lora(merged, lora, 0.7, mode="merge")
    hand = _by_hand(model, tensors, 0.7)
    for key, value in merged.state_dict().items():
        assert rel_error(value, hand[key]) < 1e-6, key

    handle = apply_lora(model, lora, 0.3, mode=mode)
    handle.set_strength(0.7)
    if mode == "on_the_fly":  # low-rank parts stay off the weights; the differences are written into them
        state = model.state_dict()
        assert torch.equal(state["double_blocks.0.img_attn.qkv.weight"],
                           original["double_blocks.0.img_attn.qkv.weight"])
        assert rel_error(state["double_blocks.1.txt_mlp.2.weight"], hand["double_blocks.1.txt_mlp.2.weight"]) < 1e-6
        assert rel_error(state["final_layer.adaLN_modulation.1.bias"],
                         hand["final_layer.adaLN_modulation.1.bias"]) < 1e-6
    args = tiny_edit_args(1, torch.float32, "cpu")
    with torch.no_grad():
        assert rel_error(model.velocity(*args), merged.velocity(*args)) < 1e-5
    handle.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_differences_on_an_fp8_model(tiny_transformer, tmp_path):
    # On fp8 weights the low-rank parts go on the fly ("auto"); a weight's `.diff` is merged as a merge would be
    # (dequantized, added, requantized), biases and norms as in any model; removal gives back every tensor.
    from kontext_core import load_transformer, save_transformer
    from kontext_core.compute.quant import QuantizedLinear

    save_transformer(tiny_transformer, tmp_path / "fp8.safetensors", weights="fp8_e4m3fn_scaled")
    model = load_transformer(tmp_path / "fp8.safetensors", dtype="fp8")
    assert isinstance(model.double_blocks[1].txt_mlp[2], QuantizedLinear)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = _comfyui_with_differences(model, seed=12)
    handle = apply_lora(model, lora_from_state_dict(tensors, "comfy"), 1.0)
    assert handle.mode == "on_the_fly"
    state = model.state_dict()
    assert torch.equal(state["double_blocks.0.img_attn.qkv.weight"], original["double_blocks.0.img_attn.qkv.weight"])
    changed = model.double_blocks[1].txt_mlp[2].dequantized_weight(torch.float32)
    expected = tiny_transformer.state_dict()["double_blocks.1.txt_mlp.2.weight"] + tensors[
        "diffusion_model.double_blocks.1.txt_mlp.2.diff"]
    assert rel_error(changed, expected) < 0.1  # e4m3 resolution
    bias = "double_blocks.0.img_attn.qkv.bias"
    assert rel_error(state[bias].float(),
                     original[bias].float() + tensors[f"diffusion_model.{bias[:-5]}.diff_b"]) < 1e-2
    handle.set_strength(0.5)
    handle.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_control_lora_on_kontext(tiny_transformer):
    # The control LoRA's deltas, bias deltas and norm replacements apply where they fit; the norms at strength 1
    # are the file's exactly. Its real img_in, twice as wide, is refused with the reason.
    model = tiny_transformer
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = _bfl_control(model.config, seed=8)
    handle = apply_lora(model, lora_from_state_dict(tensors, "canny-shaped"), 1.0)
    state = model.state_dict()
    for norm in _norms(model.config):
        assert torch.equal(state[norm], tensors[norm]), norm
    up, down = tensors["img_in.lora_B.weight"], tensors["img_in.lora_A.weight"]
    assert rel_error(state["img_in.weight"], original["img_in.weight"] + up @ down) < 1e-6
    assert rel_error(state["img_in.bias"], original["img_in.bias"] + tensors["img_in.lora_B.bias"]) < 1e-6
    handle.set_strength(0.5)
    norm = "double_blocks.0.img_attn.norm.query_norm.scale"
    assert rel_error(model.state_dict()[norm], (original[norm] + tensors[norm]) / 2) < 1e-6
    handle.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key

    wide = _bfl_control(model.config, seed=8, input_channels=2 * model.config.in_channels)
    with pytest.raises(LoraError, match="widens img_in from 64 to 128 input channels.*Canny / Depth control LoRA"
                                        ".*context tokens"):
        apply_lora(model, lora_from_state_dict(wide, "flux1-canny-dev-lora.safetensors"))
    reshaped = {**_comfyui_with_differences(model, seed=9),
                "diffusion_model.img_in.reshape_weight": torch.tensor([model.config.hidden_size, 128])}
    with pytest.raises(LoraError, match="widens img_in from 64 to 128"):
        apply_lora(model, lora_from_state_dict(reshaped, "comfy-converted control LoRA"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


# --- what is not applied, and files for other models ----------------------------------------------------

def test_unmatched_modules_are_listed_in_one_warning(tiny_transformer):
    tensors = _peft(TINY, seed=10)
    strays = ["transformer.pos_embed.proj", "transformer.time_text_embed.extra", "transformer.custom_adapter"]
    for stray in strays:
        tensors[f"{stray}.lora_A.weight"], tensors[f"{stray}.lora_B.weight"] = torch.zeros(4, 8), torch.zeros(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = lora_from_state_dict(tensors, "with strays")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "3 modules are no part of the FLUX transformer" in messages[0]
    assert all(stray in messages[0] for stray in strays) and lora.unmatched == sorted(strays)
    apply_lora(tiny_transformer, lora)  # the rest applies


def test_text_encoder_parts_are_reported_once():
    factors, tensors = Factors(11), {}
    down, up = factors.pair((TINY.hidden_size, TINY.hidden_size), 4)
    tensors["diffusion_model.img_in.lora_A.weight"] = factors.pair((TINY.hidden_size, TINY.in_channels), 4)[0]
    tensors["diffusion_model.img_in.lora_B.weight"] = up
    for te in ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te1_text_model_encoder_layers_1_mlp_fc2",
               "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
               "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"):
        tensors[f"{te}.lora_down.weight"], tensors[f"{te}.lora_up.weight"] = down, up
    with pytest.warns(UserWarning, match="4 text-encoder LoRA modules skipped") as caught:
        lora = lora_from_state_dict(tensors, "with encoders")
    assert len(caught) == 1 and len(lora.skipped) == 4 and lora.targets == ["img_in"]


def _pair(stem: str, rows: int = 8, columns: int = 8) -> dict[str, torch.Tensor]:
    return {f"{stem}.lora_down.weight": torch.zeros(4, columns), f"{stem}.lora_up.weight": torch.zeros(rows, 4)}


OTHER_MODELS = {
    "sdxl": ({**_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
              **_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1")}, "Stable Diffusion XL"),
    "sd15": ({**_pair("lora_unet_down_blocks_0_attentions_0_proj_in"),
              **_pair("lora_te_text_model_encoder_layers_0_mlp_fc1")}, r"Stable Diffusion \(1.x / 2.x / XL\)"),
    "sd15-diffusers": (_pair("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"), "Stable Diffusion"),
    "sd3": (_pair("lora_unet_joint_blocks_0_context_block_attn_qkv"), "Stable Diffusion 3"),
    "sd3-diffusers": ({**_pair("transformer.transformer_blocks.0.attn.add_k_proj"),
                       **_pair("transformer.transformer_blocks.23.attn.add_k_proj")}, "more blocks than FLUX.1"),
    "flux2": (_pair("diffusion_model.double_stream_modulation_img.lin"), "FLUX.2"),
    "wan": (_pair("diffusion_model.blocks.0.self_attn.q"), "Wan"),
    "wan-diffusers": (_pair("transformer.blocks.0.attn1.to_q"), "Wan"),
    "hunyuan-video": ({**_pair("diffusion_model.double_blocks.0.img_attn_qkv"),
                       **_pair("diffusion_model.txt_in.individual_token_refiner.blocks.0.mlp.fc1")}, "HunyuanVideo"),
    "hunyuan-video-diffusers": (_pair("transformer.single_transformer_blocks.39.attn.to_q"), "more blocks than FLUX.1"),
    "qwen-image": ({**_pair("transformer.transformer_blocks.0.attn.to_q"),
                    **_pair("transformer.transformer_blocks.0.img_mlp.net.0.proj")}, "Qwen-Image"),
    "hidream": (_pair("diffusion_model.double_stream_blocks.0.block.attn1.to_q"), "HiDream"),
    "lumina2": (_pair("diffusion_model.layers.0.attention.qkv"), "Lumina 2"),
}


@pytest.mark.parametrize("model", OTHER_MODELS)
def test_loras_for_other_models_are_refused_by_name(tmp_path, model):
    tensors, looks_like = OTHER_MODELS[model]
    path = _save(tmp_path, model, tensors)
    with pytest.raises(LoraError, match=f"not a FLUX.1 LoRA: its modules .* look like .*{looks_like}.*"
                                        r"Use a LoRA made for FLUX.1 \(Kontext\) \[dev\]"):
        load_lora(path)


def test_lora_of_unknown_modules_only_is_refused():
    with pytest.raises(LoraError, match="none is a layer of the FLUX transformer.*another model"):
        lora_from_state_dict({**_pair("lora_unet_mystery_layer"), **_pair("adapter.proj")}, "mystery")


# The next step of a refusal for tensors no FLUX.1 LoRA has: another LoRA, the file again, or a report.
NEXT_STEP = (r"Use a LoRA made for FLUX.1 \(Kontext\) \[dev\]; if this file is one, download it again, and if it still "
             r"fails while other tools load it, report it at https://github.com/comfyui-kontext/comfyui-kontext/issues")


def test_rows_that_do_not_split_into_the_fused_parts_say_what_to_do():
    xlabs = "single_blocks.0.processor.qkv_lora"  # q, k and v of linear1 stacked: rows a multiple of 3
    tensors = {f"{xlabs}.down.weight": torch.zeros(4, 8), f"{xlabs}.up.weight": torch.zeros(8, 4)}
    with pytest.raises(LoraError, match=r"has 8 rows, which do not split into 3 equal parts \(one for each "
                                        r"projection of single_blocks.0.linear1 it updates\); the file is damaged "
                                        r"or made for another model. " + NEXT_STEP):
        lora_from_state_dict(tensors, "xlabs")


def test_an_odd_norm_out_says_what_to_do():
    # diffusers' norm_out.linear is (scale, shift): its rows swap halves, so there must be an even number.
    tensors = _pair("transformer.norm_out.linear", rows=7)
    with pytest.raises(LoraError, match=r"norm_out.linear should have an even number of rows \(scale and shift\), "
                                        r"has 7; the file is damaged or made for another model. " + NEXT_STEP):
        lora_from_state_dict(tensors, "odd")


def test_a_bias_for_a_norm_says_what_to_do():
    tensors = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff_b": torch.zeros(8)}
    with pytest.raises(LoraError, match=r"changes a bias of double_blocks.0.img_attn.norm.query_norm, a norm without "
                                        r"one; the file is not a FLUX.1 LoRA. " + NEXT_STEP):
        lora_from_state_dict(tensors, "norm bias")


def test_a_text_encoder_only_lora_says_what_to_do():
    tensors = {**_pair("lora_te1_text_model_encoder_layers_0_mlp_fc1"),
               **_pair("lora_te1_text_model_encoder_layers_1_mlp_fc1")}
    with pytest.raises(LoraError, match=r"only holds text-encoder LoRA weights \(lora_te1_\w+ and 1 more\); LoRAs "
                                        r"are applied to the transformer only, so there is nothing to apply. Use a "
                                        r"LoRA that trains the FLUX.1 \(Kontext\) \[dev\] transformer"):
        lora_from_state_dict(tensors, "text encoder only")


def test_merging_in_chunks_that_cut_through_spans_and_differences(tiny_transformer, monkeypatch):
    """At full size a merge runs a few thousand rows at a time, so fused layers' spans and `.diff` blocks are cut
    by chunk borders; the tiny model's layers fit in one chunk, so here a chunk is made a single row."""
    import kontext_core.adapters.lora as lora_module

    monkeypatch.setattr(lora_module, "MERGE_CHUNK_ELEMENTS", 1)
    tensors = _comfyui_with_differences(tiny_transformer, seed=8)
    hand = _by_hand(tiny_transformer, tensors, 0.6)
    apply_lora(tiny_transformer, lora_from_state_dict(tensors, "comfy"), 0.6, mode="merge")
    for key, value in tiny_transformer.state_dict().items():
        assert rel_error(value, hand[key]) < 1e-6, key
