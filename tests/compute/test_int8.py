"""The int8 path: int8 block weights (per row) and int8 activation rows (per token) through our int8 GEMM.

On the CPU the kernels (row quantizers and the int8 GEMM) run under Triton's interpreter; on a CUDA GPU
(compute capability 8.0+) compiled. References: the float32 model (accuracy), the fp8 (e4m3) path on the
same weights (int8 must round less), the upcast int8 path with kernels off (same weights, float activations).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import (as_float32, check_compiled_blocks, eight_bit_kernels, kernels_off, random_block_lora, rel_l2,
                      tiny_edit_args, tiny_quantized_pair, velocity_apart_and_paired)
from kontext_kernels.runtime import launches, triton_available
from kontext_core import KontextTransformer, TransformerConfig, load_transformer, save_transformer
from kontext_core.compute import quant
from kontext_core.compute.quant import INT8_KEPT, QuantizedLinear

INT8_ROW_KERNELS = ("layernorm_modulate_quantize", "gelu_quantize_rows", "concat_gelu_quantize_rows", "quantize_rows")


@pytest.fixture(params=["interpreter", "cuda"])
def device(request):
    if not triton_available():
        pytest.skip("needs Triton (pip install triton==3.6.0)")
    if request.param == "cuda" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)):
        pytest.skip("needs a CUDA GPU with int8 tensor cores (Ampere or newer)")
    with eight_bit_kernels(request.param) as device:  # the fp8 path too: the int8 one is measured against it
        yield device


def _models(device: str) -> tuple[KontextTransformer, KontextTransformer]:
    """(float32 model, its int8 copy computing in bf16)."""
    return tiny_quantized_pair(device, torch.int8)


def _int8_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, QuantizedLinear) and m.weight.dtype == torch.int8]


def test_int8_model_keeps_modulation_and_scales_rows(tiny_transformer):
    int8 = quant.quantize_model(copy.deepcopy(tiny_transformer).to(torch.bfloat16), torch.int8)
    for name, module in int8.named_modules():
        in_block = name.startswith(("double_blocks.", "single_blocks."))
        if in_block and name.endswith(INT8_KEPT):
            assert type(module) is nn.Linear and module.weight.dtype == torch.bfloat16, name
        elif in_block and isinstance(module, (nn.Linear, QuantizedLinear)):
            assert isinstance(module, QuantizedLinear) and module.weight.dtype == torch.int8, name
            assert module.weight_scale.shape == (module.out_features,), name
            original = tiny_transformer.get_submodule(name).weight.detach().bfloat16().float()
            # Round to nearest: within half a step (the row's amax / 127) of the bf16 weight.
            step = original.abs().amax(dim=1, keepdim=True) / 127
            assert bool(((module.dequantized_weight(torch.float32) - original).abs() <= 0.501 * step).all()), name
    assert not any(isinstance(m, QuantizedLinear) for n, m in int8.named_modules()
                   if not n.startswith(("double_blocks.", "single_blocks.")))


def test_int8_path_rounds_less_than_fp8(device):
    model, int8 = _models(device)
    fp8 = quant.quantize_model(copy.deepcopy(model).to(torch.bfloat16))
    args = tiny_edit_args(2, torch.bfloat16, device)
    with torch.no_grad():
        exact = model.velocity(*as_float32(args))
        before = launches["int8_linear"]
        rows_before = {name: launches[name] for name in INT8_ROW_KERNELS}
        int8_velocity = int8.velocity(*args)
        gemms = launches["int8_linear"] - before
        fp8_velocity = fp8.velocity(*args)
    # Every int8 layer ran on the int8 GEMM, its input rows from the fused quantizers.
    assert gemms == len(_int8_layers(int8))
    assert all(launches[name] > rows_before[name] for name in INT8_ROW_KERNELS)
    int8_error, fp8_error = rel_l2(int8_velocity, exact), rel_l2(fp8_velocity, exact)
    # Gaussian-like operands: int8's uniform steps round ~3x less than e4m3's 3 mantissa bits (seen 0.3-0.4x).
    assert int8_error < 0.03
    assert int8_error < 0.6 * fp8_error


def test_int8_weights_upcast_without_the_kernels(device):
    # Kernels off: the int8 weights are dequantized per call and the activations stay in bf16, so only the
    # weights' rounding is left: closer to float32 than the full int8 path, and no int8 GEMM runs.
    model, int8 = _models(device)
    args = tiny_edit_args(1, torch.bfloat16, device)
    with torch.no_grad():
        exact = model.velocity(*as_float32(args))
        fused = int8.velocity(*args)
        before = launches["int8_linear"]
        with kernels_off():
            upcast = int8.velocity(*args)
        assert launches["int8_linear"] == before
    assert rel_l2(upcast, exact) < rel_l2(fused, exact) < 0.03


def test_hooked_int8_layers_get_bf16_inputs(device):
    _, int8 = _models(device)
    seen = []
    layer = int8.single_blocks[0].linear1
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].dtype))
    with torch.no_grad():
        int8.velocity(*tiny_edit_args(1, torch.bfloat16, device))
    handle.remove()
    assert seen == [torch.bfloat16]


def test_a_lora_on_int8_weights_runs_on_the_fly(device):
    from kontext_core.adapters.lora import apply_lora

    model, int8 = _models(device)
    lora = random_block_lora(model, seed=21)
    args = tiny_edit_args(2, torch.bfloat16, device)
    with torch.no_grad():
        exact = model.velocity(*as_float32(args))
        plain = int8.velocity(*args)
        with apply_lora(model, lora, 0.8, mode="merge"):
            exact_lora = model.velocity(*as_float32(args))
        weights = {name: p.clone() for name, p in int8.state_dict().items()}
        with apply_lora(int8, lora, 0.8) as handle:  # "auto": on the fly into 8-bit weights
            assert handle.mode == "on_the_fly"
            before = launches["int8_linear"]
            with_lora = int8.velocity(*args)
            assert launches["int8_linear"] - before == len(_int8_layers(int8))
        after = int8.state_dict()
    assert all(torch.equal(after[name], value) for name, value in weights.items())
    int8_error = rel_l2(plain, exact)
    assert rel_l2(exact_lora, exact) > 5 * int8_error  # the LoRA's effect stands well above int8's noise
    assert rel_l2(with_lora, exact_lora) <= 1.5 * int8_error


def test_compiled_blocks_trace_the_int8_gemm(device):
    # The int8 GEMM enters compiled blocks as the opaque kontext::int8_linear (its fake shape must be right).
    model, int8 = _models(device)
    check_compiled_blocks(model, int8, device, "int8_linear", len(_int8_layers(int8)))


@pytest.mark.parametrize("batch", [1, 2])
def test_double_blocks_give_both_streams_one_launch_with_the_same_result(device, batch, monkeypatch):
    # On Hopper the double block's text and image GEMMs share a launch (int8_gemm.int8_linear_pair); each
    # product is computed as its own launch computes it, so the velocity is the same bit for bit. Elsewhere (the
    # interpreter here) the pair falls back to two launches. Two batches: the gated residuals keep two launches.
    from kontext_kernels import int8_gemm, int8_gemm_hopper

    _, int8 = _models(device)
    args = tiny_edit_args(batch, torch.bfloat16, device)
    hopper = device == "cuda" and torch.cuda.get_device_capability() >= (9, 0) and int8_gemm_hopper.gluon_available()
    monkeypatch.setattr(int8_gemm, "PAIR_STREAMS", True)
    with torch.no_grad():
        before = launches["int8_linear_pair"]
        paired = int8.velocity(*args)
        pairs = launches["int8_linear_pair"] - before
        monkeypatch.setattr(int8_gemm, "PAIR_STREAMS", False)
        apart = int8.velocity(*args)
    assert launches["int8_linear_pair"] - before == pairs
    # One double block: qkv and mlp up always paired on Hopper, proj and mlp down (gated residuals) for one batch.
    assert pairs == ((4 if batch == 1 else 2) if hopper else 0)
    assert torch.equal(paired, apart)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_double_blocks_quantize_both_streams_rows_in_one_launch_with_the_same_result(device, compiled, batch):
    # The double block's 8-bit rows of both streams (LayerNorm + modulation, attention, GELU rows), each kind in
    # one launch of the row kernel (fused.set_paired_row_quantizers): the velocity equal bit for bit to a launch
    # per stream, eager and in compiled blocks (where the pair ops' fake shapes must be right), for one image and
    # for two (each with its own modulation rows).
    _, int8 = _models(device)
    apart, paired, pairs = velocity_apart_and_paired(int8, tiny_edit_args(batch, torch.bfloat16, device), compiled,
                                                     device)
    # Each double block: the two LayerNorm + modulation inputs, the attention rows and the GELU rows.
    assert pairs == 4 * len(int8.double_blocks)
    assert torch.equal(paired, apart)


def test_by_default_the_int8_rows_are_paired_and_the_e4m3_rows_are_not(device, monkeypatch):
    # The fp8 path's paired rows wait for their model tests on a GPU (fused.PAIRED_ROW_FORMATS_DEFAULT).
    from kontext_core.compute import fused

    monkeypatch.setattr(fused, "_paired_row_formats", fused._paired_row_formats)  # restored after the test
    fused.set_paired_row_quantizers(None)
    args = tiny_edit_args(1, torch.bfloat16, device)
    pairs = {}
    for dtype in (torch.int8, torch.float8_e4m3fn):
        _, quantized = tiny_quantized_pair(device, dtype)
        before = launches["row_quantizer_pair"]
        with torch.no_grad():
            quantized.velocity(*args)
        pairs[dtype] = launches["row_quantizer_pair"] - before
    assert pairs == {torch.int8: 4 * len(quantized.double_blocks), torch.float8_e4m3fn: 0}


def test_load_int8_from_a_bf16_file(tiny_transformer, tmp_path):
    bf16 = copy.deepcopy(tiny_transformer).to(torch.bfloat16)
    save_transformer(bf16, tmp_path / "flux1-kontext-dev.safetensors")
    loaded = load_transformer(tmp_path / "flux1-kontext-dev.safetensors", dtype="int8")
    expected = quant.quantize_model(copy.deepcopy(bf16), torch.int8)
    assert _int8_layers(loaded) == _int8_layers(expected) and _int8_layers(loaded)
    loaded_state, expected_state = loaded.state_dict(), expected.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert loaded_state[name].dtype == tensor.dtype and torch.equal(loaded_state[name], tensor), name


def test_load_int8_from_an_fp8_file(tiny_transformer, tmp_path):
    # ComfyUI's scaled-fp8 file: its e4m3 weights dequantized, then each row quantized to int8; the modulation
    # linears come out in bf16 (their e4m3 values exactly).
    path = tmp_path / "flux1-kontext-dev-fp8.safetensors"
    save_transformer(tiny_transformer, path, layout="comfy", weights="fp8_e4m3fn_scaled")
    fp8 = load_transformer(path, dtype="fp8")
    int8 = load_transformer(path, dtype="int8")
    assert _int8_layers(int8) == [n for n in _int8_layers(quant.quantize_model(
        copy.deepcopy(tiny_transformer).to(torch.bfloat16), torch.int8))]
    for name, module in int8.named_modules():
        if name.endswith(INT8_KEPT) and name.startswith(("double_blocks.", "single_blocks.")):
            stored = fp8.get_submodule(name)
            assert torch.equal(module.weight, stored.dequantized_weight(torch.bfloat16)), name
        elif isinstance(module, QuantizedLinear):
            stored = fp8.get_submodule(name).dequantized_weight(torch.float32)
            step = stored.abs().amax(dim=1, keepdim=True) / 127
            assert bool(((module.dequantized_weight(torch.float32) - stored).abs() <= 0.501 * step).all()), name


def test_saving_an_int8_model_writes_its_weights_dequantized(tiny_transformer, tmp_path):
    int8 = quant.quantize_model(copy.deepcopy(tiny_transformer).to(torch.bfloat16), torch.int8)
    save_transformer(int8, tmp_path / "saved.safetensors")
    back = load_transformer(tmp_path / "saved.safetensors", dtype="bf16")
    for name in _int8_layers(int8):
        assert torch.equal(back.get_submodule(name).weight, int8.get_submodule(name).dequantized_weight()), name
    # Loaded as int8 again, each row requantizes to the same int8 values (its amax is a grid point).
    again = load_transformer(tmp_path / "saved.safetensors", dtype="int8")
    for name in _int8_layers(int8):
        assert torch.equal(again.get_submodule(name).weight, int8.get_submodule(name).weight), name


def test_memory_estimate_counts_modulation_in_bf16():
    from kontext_core.placement.memory import transformer_bytes

    dev = TransformerConfig()
    outside, int8_blocks = transformer_bytes(dev, "int8")
    fp8_outside, fp8_blocks = transformer_bytes(dev, "fp8")
    assert outside == fp8_outside
    # The modulation linears (img_mod and txt_mod of each double block, one per single block; no bias in
    # these sums) at 2 bytes a weight instead of 1 byte and a float32 scale per row.
    h = dev.hidden_size
    modulation = [(6 * h, h)] * 2 * dev.depth + [(3 * h, h)] * dev.depth_single_blocks
    extra = sum(rows * columns - 4 * rows for rows, columns in modulation)
    assert sum(int8_blocks) - sum(fp8_blocks) == extra


def test_int8_weights_upcast_on_an_accelerator_say_why_once(monkeypatch):
    # Where the int8 GEMM cannot run (no Triton, a pre-Ampere GPU, kernels off), an accelerator upcasts the int8
    # weights per layer, slower than bf16 weights: the first such call warns with the fix, later ones are quiet.
    # The meta device stands in for the accelerator (no CUDA here, and nothing to compute).
    monkeypatch.setattr(quant, "_int8_upcast_warned", False)
    layer = QuantizedLinear(64, 32, weight_dtype=torch.int8, device="meta")
    x = torch.empty(2, 64, dtype=torch.bfloat16, device="meta")
    with pytest.warns(RuntimeWarning, match="int8 weights are upcast.*install Triton, or load the model in bf16"):
        assert layer(x).shape == (2, 32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
