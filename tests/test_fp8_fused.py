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

import copy

import pytest
import torch

from conftest import (as_float32, compiled_graphs, fp8_tensor_cores, kernels_built_for, kernels_off,
                      random_block_lora, randomize_, rel_l2, tiny_edit_args)
from kernels.runtime import launches, triton_available
from kontext_core import KontextTransformer, TransformerConfig, quant

ROW_KERNELS = ("layernorm_modulate_quantize", "gelu_quantize_rows", "concat_gelu_quantize_rows", "quantize_rows")


@pytest.fixture(params=["interpreter", "cuda"])
def device(request):
    if not triton_available():
        pytest.skip("needs Triton")
    if request.param == "cuda" and not fp8_tensor_cores():
        pytest.skip("needs a GPU with fp8 tensor cores (Ada or Hopper)")
    with kernels_built_for(request.param):
        quant.set_fp8_matmul(True, on_cpu=request.param == "interpreter")
        try:
            yield "cpu" if request.param == "interpreter" else "cuda"
        finally:
            quant.set_fp8_matmul(True)


def _models(device: str) -> tuple[KontextTransformer, KontextTransformer]:
    """(float32 model, its fp8 copy computing in bf16): one block of each kind keeps the interpreter quick."""
    config = TransformerConfig.tiny(depth=1, depth_single_blocks=1)
    model = randomize_(KontextTransformer(config), seed=11).to(device).eval()
    return model, quant.quantize_model_fp8(copy.deepcopy(model).to(torch.bfloat16))


def test_fused_quantization_is_as_accurate_as_the_plain_fp8_path(device):
    model, fp8 = _models(device)
    args = tiny_edit_args(2, torch.bfloat16, device)
    with torch.no_grad():
        exact = model.velocity(*as_float32(args))
        with kernels_off():
            plain = fp8.velocity(*args)
        before = {name: launches[name] for name in ROW_KERNELS}
        fused = fp8.velocity(*args)
    blocks = len(fp8.double_blocks), len(fp8.single_blocks)
    assert launches["layernorm_modulate_quantize"] - before["layernorm_modulate_quantize"] == 4 * blocks[0] + blocks[1]
    assert launches["gelu_quantize_rows"] - before["gelu_quantize_rows"] == 2 * blocks[0]
    assert launches["concat_gelu_quantize_rows"] - before["concat_gelu_quantize_rows"] == blocks[1]
    assert launches["quantize_rows"] - before["quantize_rows"] == 2 * blocks[0]
    plain_error, fused_error = rel_l2(plain, exact), rel_l2(fused, exact)
    assert plain_error < 0.15  # the fp8 path still computes the model
    assert fused_error <= 1.15 * plain_error
    assert rel_l2(fused, plain) <= plain_error


def test_a_lora_on_the_fly_reads_the_fused_e4m3_rows(device):
    # On-the-fly LoRAs on fp8 layers take their input from the same e4m3 rows as the layer's GEMM, so the
    # fused quantizers keep running; the result must carry the LoRA as accurately as fp8 carries the model.
    from kontext_core.lora import apply_lora

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
    assert rel_l2(fp8_lora, exact_lora) <= 1.3 * fp8_error


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
    # Regional compilation traces the row quantizers as opaque ops (their fake shapes must be right);
    # "aot_eager" traces as the compiler does without generating code, so it runs on the CPU too. The
    # compiler's own fusions round differently from eager bf16, which moves some e4m3 roundings: so, as
    # above, compiled and eager are each measured against the float32 model.
    torch._dynamo.reset()
    model, fp8 = _models(device)
    args = tiny_edit_args(1, torch.bfloat16, device)
    graphs = compiled_graphs()
    try:
        with torch.no_grad():
            exact = model.velocity(*as_float32(args))
            eager = fp8.velocity(*args)
            fp8.compile_blocks(backend="aot_eager" if device == "cpu" else "inductor")
            before = launches["concat_gelu_quantize_rows"]
            compiled = fp8.velocity(*args)
        assert compiled_graphs() - graphs == 2  # the blocks really ran compiled, the row kernels inside
        assert launches["concat_gelu_quantize_rows"] - before == len(fp8.single_blocks)
    finally:
        torch._dynamo.reset()
    eager_error = rel_l2(eager, exact)
    assert rel_l2(compiled, exact) <= 1.15 * eager_error
    assert rel_l2(compiled, eager) <= eager_error
