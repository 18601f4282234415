"""The fp8 model with its activations quantized by the fused row kernels against the plain fp8 path.

Runs on the CPU: the kernels through Triton's interpreter, the fp8 GEMMs through PyTorch's CPU
`torch._scaled_mm` (`set_fp8_matmul(True, on_cpu=True)`); and on a CUDA GPU with fp8 tensor cores
with the compiled kernels. The plain path (kernels off) quantizes each layer's bf16 input in
PyTorch; the fused one quantizes float32 values straight from LayerNorm+modulation and GELU, so some
elements round to the neighbouring e4m3 value and the two paths carry different fp8 noise (each
~4-6% from the float32 model here, ~3% from each other). The tests therefore measure both against
the float32 model: the fused path must be as accurate as the plain one (15% margin), and the two
must agree better than either agrees with float32.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (as_float32, check_compiled_blocks, compiled_graphs, eight_bit_kernels, fp8_tensor_cores,
                      kernels_off, random_block_lora, rel_l2, tiny_edit_args, tiny_quantized_pair,
                      velocity_apart_and_paired)
from kontext_kernels.runtime import launches, triton_available
from kontext_core import KontextTransformer
from kontext_core.compute import fused as fused_ops

ROW_KERNELS = ("layernorm_modulate_quantize", "gelu_quantize_rows", "concat_gelu_quantize_rows", "quantize_rows")


@pytest.fixture(params=["interpreter", "cuda"])
def device(request):
    if not triton_available():
        pytest.skip("needs Triton")
    if request.param == "cuda" and not fp8_tensor_cores():
        pytest.skip("needs a GPU with fp8 tensor cores (Ada or Hopper)")
    with eight_bit_kernels(request.param) as device:
        yield device


def _models(device: str) -> tuple[KontextTransformer, KontextTransformer]:
    """(float32 model, its fp8 copy computing in bf16)."""
    return tiny_quantized_pair(device)


@pytest.mark.parametrize("paired", [False, True], ids=["a_launch_a_stream", "paired_streams"])
def test_fused_quantization_is_as_accurate_as_the_plain_fp8_path(device, paired, monkeypatch):
    monkeypatch.setattr(fused_ops, "_paired_row_formats", fused_ops._paired_row_formats)  # restored after the test
    fused_ops.set_paired_row_quantizers(paired)
    model, fp8 = _models(device)
    args = tiny_edit_args(2, torch.bfloat16, device)
    with torch.no_grad():
        exact = model.velocity(*as_float32(args))
        with kernels_off():
            plain = fp8.velocity(*args)
        before = {name: launches[name] for name in ROW_KERNELS}
        fused = fp8.velocity(*args)
    double, single = len(fp8.double_blocks), len(fp8.single_blocks)
    # A double block quantizes each kind of row for its two streams in one launch where they are paired.
    streams_a_launch = 2 if paired else 1
    made = {name: launches[name] - before[name] for name in ROW_KERNELS}
    assert made["layernorm_modulate_quantize"] == 4 * double // streams_a_launch + single
    assert made["gelu_quantize_rows"] == 2 * double // streams_a_launch
    assert made["concat_gelu_quantize_rows"] == single
    assert made["quantize_rows"] == 2 * double // streams_a_launch
    plain_error, fused_error = rel_l2(plain, exact), rel_l2(fused, exact)
    assert plain_error < 0.15  # the fp8 path still computes the model
    assert fused_error <= 1.15 * plain_error
    assert rel_l2(fused, plain) <= plain_error


def test_a_lora_on_the_fly_reads_the_fused_e4m3_rows(device):
    # On-the-fly LoRAs on fp8 layers take their input from the same e4m3 rows as the layer's GEMM, so the
    # fused quantizers keep running; the result must carry the LoRA as accurately as fp8 carries the model.
    from kontext_core.adapters.lora import apply_lora

    model, fp8 = _models(device)
    lora = random_block_lora(model, seed=21)
    args = tiny_edit_args(2, torch.bfloat16, device)
    with torch.no_grad():
        exact = model.velocity(*as_float32(args))
        fp8_plain = fp8.velocity(*args)
        with apply_lora(model, lora, 0.8, mode="merge"):
            exact_lora = model.velocity(*as_float32(args))
        before = {name: launches[name] for name in ROW_KERNELS}
        with apply_lora(fp8, lora, 0.8, mode="on_the_fly"):
            fp8_lora = fp8.velocity(*args)
        during = {name: launches[name] - before[name] for name in ROW_KERNELS}
        fp8.velocity(*args)
    assert during == {name: launches[name] - before[name] - during[name] for name in ROW_KERNELS}
    assert all(during.values())  # the fused quantizers ran with the LoRA as without it
    fp8_error = rel_l2(fp8_plain, exact)
    assert rel_l2(exact_lora, exact) > 5 * fp8_error  # the LoRA's effect stands well above fp8's noise
    # The LoRA's own e4m3 rounding adds to the model's: 1.12-1.33x over fresh inputs (timesteps vary most).
    assert rel_l2(fp8_lora, exact_lora) <= 1.5 * fp8_error


def test_hooked_fp8_layers_get_bf16_inputs(device):
    # A forward hook may read its layer's input: that layer must be called with bf16 activations.
    _, fp8 = _models(device)
    seen = []
    layer = fp8.single_blocks[0].linear1
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append((type(inputs[0]),
                                                                                      inputs[0].dtype)))
    with torch.no_grad():
        fp8.velocity(*tiny_edit_args(1, torch.bfloat16, device))
    handle.remove()
    assert seen == [(torch.Tensor, torch.bfloat16)]


def test_compiled_blocks_trace_the_row_kernels(device):
    # Regional compilation traces the row quantizers as opaque ops (their fake shapes must be right).
    model, fp8 = _models(device)
    check_compiled_blocks(model, fp8, device, "concat_gelu_quantize_rows", len(fp8.single_blocks))


def _row_fed_layers(model) -> list:
    from kontext_core.adapters.wide_lora import ROW_FED

    return [(name, layer) for name, layer in model.named_modules() if name.endswith(ROW_FED)]


def test_loras_as_columns_of_the_fp8_gemm(device, monkeypatch):
    # fp8 layers fed by the fused quantizers take their on-the-fly LoRAs as extra K columns of their own GEMM
    # (kontext_core/adapters/wide_lora.py): one GEMM, the weight a view of the wide buffer, the result as accurate as
    # the two thin GEMMs'; strength changes rewrite the columns in place; removal restores the weights.
    from kontext_core.compute import fused
    from kontext_core.adapters import wide_lora
    from kontext_core.compute.fused import lora_factors
    from kontext_core.adapters.lora import apply_lora

    model, fp8 = _models(device)
    original = {k: v.clone() for k, v in fp8.state_dict().items()}
    lora = random_block_lora(model, seed=23)
    args = tiny_edit_args(2, torch.bfloat16, device)
    filled = []
    real_fill = fused._fill_lora_columns
    monkeypatch.setattr(fused, "_fill_lora_columns", lambda *a: (filled.append(a[0].shape), real_fill(*a))[1])
    with torch.no_grad():
        with apply_lora(model, lora, 0.8, mode="merge"):
            exact_lora = model.velocity(*as_float32(args))
        handle = apply_lora(fp8, lora, 0.8, mode="on_the_fly")
        layers = _row_fed_layers(fp8)
        for name, layer in layers:
            factors = lora_factors(layer)
            assert factors.wide is not None, name
            assert (layer.weight.data_ptr() == factors.wide.data_ptr()
                    and layer.weight.stride(0) == factors.wide.shape[1])
            assert factors.wide.shape[1] == layer.in_features + wide_lora.TILE  # rank 8 -> one 128-wide tile
        assert lora_factors(fp8.double_blocks[0].img_mod.lin).wide is None  # one row: the thin GEMMs
        wide = fp8.velocity(*args)
        assert len(filled) == len(layers)  # every row-fed layer ran its LoRA as columns
        wide_lora.narrow_all(fp8)  # the same factors as two thin GEMMs
        filled.clear()
        narrow = fp8.velocity(*args)
        assert not filled
        narrow_error, wide_error = rel_l2(narrow, exact_lora), rel_l2(wide, exact_lora)
        assert wide_error <= 1.15 * narrow_error, (wide_error, narrow_error)

        wide_lora.widen_all(fp8)
        buffers = {name: lora_factors(layer).wide for name, layer in layers}
        handle.set_strength(-0.5)  # in place: the same buffers, new columns
        assert all(lora_factors(layer).wide is buffers[name] for name, layer in layers)
        changed = fp8.velocity(*args)
        with apply_lora(model, lora, -0.5, mode="merge"):
            exact_changed = model.velocity(*as_float32(args))
        assert rel_l2(changed, exact_changed) <= 1.15 * narrow_error
        handle.remove()
    for name, layer in layers:
        assert lora_factors(layer) is None and layer.weight.is_contiguous(), name
    for key, value in fp8.state_dict().items():
        assert torch.equal(value, original[key]), key


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_lora_columns_carry_a_strong_lora_without_clamping(device, scale):
    # A LoRA whose rank columns each carry more than the weight's range could: the columns' copies share
    # the product (each up divided by their count), so neither side of the columns saturates e4m3. One far
    # stronger than its layer (delta 6x the weight) stays in the two thin GEMMs.
    from kontext_core.compute.fused import lora_factors
    from kontext_core.adapters.lora import apply_lora

    model, fp8 = _models(device)
    lora = random_block_lora(model, seed=24, rank=8, scale=scale)  # delta ~scale x the layer's weight
    with torch.no_grad(), apply_lora(fp8, lora, 1.0, mode="on_the_fly"):
        layer = fp8.double_blocks[0].img_mlp[2]
        factors = lora_factors(layer)
        if scale > 2:
            assert factors.wide is None and layer.weight.is_contiguous()
            return
        inputs = torch.randn(96, layer.in_features,
                             generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
        inputs[3] *= 30  # an outlier row
        ours, exact, columns, lora_part = _columns_output(layer, inputs)
        tail = factors.wide[:, layer.in_features:].float()
    assert columns.abs().max() < 448 and tail.abs().max() <= 448 and columns.abs().max() > 4
    assert lora_part.norm() > 0.5 * (exact - lora_part).norm()  # strong indeed
    assert rel_l2(ours, exact) < 0.05  # e4m3's rounding of the columns, nothing clamped


def fused_linear(layer, x):
    from kontext_core.compute.fused import linear

    return linear(layer, x)


def test_lora_columns_follow_moves_and_give_way_to_the_block_offloader(device):
    # A move narrows the layout and rebuilds it where the model lands (a no-op move keeps the buffers); the
    # block offloader packs weights into its own buffers, so it narrows them first and LoRAs applied to
    # streamed blocks keep thin GEMMs.
    from kontext_core.compute.fused import lora_factors
    from kontext_core.adapters.lora import apply_lora
    from kontext_core.placement.offload import BlockOffloader

    model, fp8 = _models(device)
    original = {k: v.clone() for k, v in fp8.state_dict().items()}
    args = tiny_edit_args(1, torch.bfloat16, device)
    handle = apply_lora(fp8, random_block_lora(model, seed=25), 0.7, mode="on_the_fly")
    layers = _row_fed_layers(fp8)
    buffers = [lora_factors(layer).wide for _, layer in layers]
    with torch.no_grad():
        before = fp8.velocity(*args)
        fp8.to(device)
        assert [lora_factors(layer).wide for _, layer in layers] == buffers  # the same tensors
        if device == "cuda":
            fp8.cpu()
            assert all(lora_factors(layer).wide is None and layer.weight.is_contiguous() for _, layer in layers)
            fp8.cuda()
            assert all(lora_factors(layer).wide is not None for _, layer in layers)
            assert torch.equal(fp8.velocity(*args), before)
            # ComfyUI freeing part of a model moves single layers, then brings the whole model back.
            for _, layer in layers[:3]:
                layer.cpu()
            fp8.cuda()
            assert all(layer.weight.data_ptr() == lora_factors(layer).wide.data_ptr() for _, layer in layers)
            assert torch.equal(fp8.velocity(*args), before)
        offloader = BlockOffloader(fp8, device, prefetch=1)
        assert all(lora_factors(layer).wide is None for _, layer in layers)
        handle.set_strength(0.9)  # restacked on streamed blocks: thin GEMMs still
        assert all(lora_factors(layer).wide is None for _, layer in layers)
        handle.set_strength(0.7)
        offloaded = fp8.velocity(*args)
        offloader.detach(device)
    assert rel_l2(offloaded, before) < 0.05  # the same LoRA through the thin GEMMs' roundings
    handle.remove()
    for key, value in fp8.state_dict().items():
        assert torch.equal(value.to(original[key].device), original[key]), key


def test_compiled_blocks_trace_the_lora_columns(device):
    # The columns' fill is an opaque mutating op on the e4m3 rows; a new strength rewrites the columns in
    # place and needs no recompilation.
    from kontext_core.adapters.lora import apply_lora

    torch._dynamo.reset()
    model, fp8 = _models(device)
    args = tiny_edit_args(1, torch.bfloat16, device)
    handle = apply_lora(fp8, random_block_lora(model, seed=26), 0.6, mode="on_the_fly")
    try:
        with torch.no_grad():
            eager = fp8.velocity(*args)
            handle.set_strength(0.3)
            eager_changed = fp8.velocity(*args)
            handle.set_strength(0.6)
            fp8.compile_blocks(backend="aot_eager" if device == "cpu" else "inductor")
            graphs = compiled_graphs()
            compiled = fp8.velocity(*args)
            assert compiled_graphs() - graphs == 2
            handle.set_strength(0.3)
            compiled_changed = fp8.velocity(*args)
            assert compiled_graphs() - graphs == 2  # no recompilation for a new strength
    finally:
        torch._dynamo.reset()
    assert rel_l2(compiled, eager) < 0.03 and rel_l2(compiled_changed, eager_changed) < 0.03
    assert rel_l2(compiled_changed, compiled) > 0.05


def _columns_output(layer, inputs):
    """`layer`'s output for `inputs` through its LoRA columns, the same in float32 from its factors, the
    columns the fill wrote, and the LoRA's part of the float32 output."""
    from kontext_core.compute.fused import _fill_lora_columns, lora_factors
    from kontext_core.compute.quant import QuantizedRows, quantize_rows

    factors = lora_factors(layer)
    rows = quantize_rows(inputs)
    data = torch.zeros((inputs.shape[0], factors.wide.shape[1]), dtype=torch.float8_e4m3fn, device=inputs.device)
    data[:, :layer.in_features] = rows.data
    _fill_lora_columns(data, rows.scale, factors.column_down, factors.column_scale)
    values = rows.data.float() * rows.scale
    lora_part = (values @ factors.down.float().t()) @ factors.up.float().t()
    exact = values @ layer.dequantized_weight(torch.float32).t() + layer.bias.float() + lora_part
    ours = fused_linear(layer, QuantizedRows(data, rows.scale)).float()
    return ours, exact, data[:, layer.in_features:].float(), lora_part


def test_lora_columns_follow_a_lora_merged_into_the_same_fp8_layers(device):
    # Merging into fp8 weights requantizes them with new row scales; the columns of a LoRA on the fly on the
    # same layers are made against those scales, so they are made again.
    from kontext_core.adapters.lora import apply_lora

    model, fp8 = _models(device)
    on_the_fly, merged = random_block_lora(model, seed=27, scale=0.3), random_block_lora(model, seed=28, scale=1.0)
    layer = fp8.double_blocks[0].img_mlp[0]
    inputs = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(6)).to(device, torch.bfloat16)
    with torch.no_grad(), apply_lora(fp8, on_the_fly, 1.0, mode="on_the_fly"):
        before = rel_l2(*_columns_output(layer, inputs)[:2])
        with apply_lora(fp8, merged, 1.0, mode="merge"):
            merged_error = rel_l2(*_columns_output(layer, inputs)[:2])
        after = rel_l2(*_columns_output(layer, inputs)[:2])
    # e4m3 rounding of the columns (~1%); made against stale scales they were off by ~11% here
    assert before < 0.03 and merged_error < 0.03 and after < 0.03, (before, merged_error, after)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_paired_row_quantizers_carry_the_lora_columns(device, compiled):
    # Both streams' e4m3 rows in one launch (fused.set_paired_row_quantizers) with the spare columns of a LoRA in
    # the wide layout: each stream's columns are filled in place on its view of the stacked buffer, in compiled
    # blocks too, and the velocity equals a launch per stream bit for bit.
    from kontext_core.adapters.lora import apply_lora
    from kontext_core.compute import fused

    model, fp8 = _models(device)
    with torch.no_grad(), apply_lora(fp8, random_block_lora(model, seed=25), 0.8, mode="on_the_fly"):
        assert fused.lora_columns(fp8.double_blocks[0].img_attn.qkv) > 0  # the rows carry spare columns
        apart, paired, pairs = velocity_apart_and_paired(fp8, tiny_edit_args(1, torch.bfloat16, device), compiled,
                                                         device)
    # Each double block: the two LayerNorm + modulation inputs, the attention rows and the GELU rows.
    assert pairs == 4 * len(fp8.double_blocks)
    assert torch.equal(paired, apart)
