"""Every `kontext::` operator against torch.compile's contract (`torch.library.opcheck`): a schema that declares
what the operator mutates, no output aliasing an input or another output (an error where CI is set, and in a later
torch everywhere: the paired row quantizers once broke it), a fake with the real output's shapes, and the same
values when traced. Tiny random inputs, on Triton's CPU interpreter and on a GPU. Operators that run only on a GPU
are listed apart, and every registered operator must be in one list or the other, so a new one is not missed."""

from __future__ import annotations

import pytest
import torch

from conftest import kernel_device
from kontext_core.compute import ops
from kontext_kernels.runtime import triton_available

# cuDNN's fp8 attention and FlashAttention-4 run only on their GPUs (tests/compute/test_fp8_attention.py and
# test_flash_attention.py run them in compiled blocks there).
GPU_ONLY = {"fp8_attention", "fp8_joint_attention", "flash_attention_4"}

# The 8-bit row operators, whose calls end in (spare columns, int8).
ROW_OPERATORS = ("quantize_rows", "gelu_quantize_rows", "concat_gelu_quantize_rows", "layernorm_modulate_quantize",
                 "quantize_rows_stacked", "gelu_quantize_rows_stacked", "layernorm_modulate_quantize_stacked")
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# opcheck's schema check compares the mutated input by arithmetic torch lacks for e4m3; the op returns nothing, so
# no output can alias, and its schema's write to `data` is asserted below instead.
SKIPPED_CHECKS = {"lora_columns_": {"test_schema"}}


@pytest.fixture(scope="module", params=["interpreter", "cuda"])
def device(request) -> str:
    with kernel_device(request.param) as device:
        yield device


def _randn(*shape: int, device: str, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


def _int8(*shape: int, device: str) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8).to(device)


def _cases(device: str) -> dict[str, list[tuple]]:
    """Arguments for each operator that runs here; no spare (LoRA) columns, which the row ops leave unwritten."""
    x, x2 = _randn(2, 5, 64, device=device, scale=3.0), _randn(1, 3, 64, device=device)
    shift, scale, _ = _randn(2, 1, 192, device=device).chunk(3, dim=-1)
    shift2, scale2, _ = _randn(1, 1, 192, device=device).chunk(3, dim=-1)
    data, data2 = _int8(2, 5, 64, device=device), _int8(1, 3, 64, device=device)
    row_scale, row_scale2 = (torch.rand(rows, 1, device=device) / 100 + 1e-3 for rows in (10, 3))
    weight, weight2 = _int8(32, 64, device=device), _int8(32, 64, device=device)
    weight_scale, weight_scale2 = (torch.rand(32, device=device) / 100 + 1e-3 for _ in range(2))
    bias, bias2 = _randn(32, device=device), _randn(32, device=device)
    gate, gate2 = _randn(2, 1, 32, device=device), _randn(1, 1, 32, device=device)
    residual, residual2 = _randn(2, 5, 32, device=device), _randn(1, 3, 32, device=device)
    heads, head_dim, lengths = 2, 16, (3, 6)
    qkvs = [_randn(2, length, 3 * heads * head_dim, device=device) for length in lengths]
    query_scales = [_randn(head_dim, device=device, scale=0.2) + 1 for _ in lengths]
    key_scales = [_randn(head_dim, device=device, scale=0.2) + 1 for _ in lengths]
    angle = torch.randn(1, 1, sum(lengths), head_dim // 2, device=device) * 3
    rope = (torch.cos(angle), torch.sin(angle))
    q, k, v = (_randn(2, heads, 37, 64, device=device) for _ in range(3))
    # sage8's fused passes tile head dims of 32 and more; the frozen one whole 128-token tiles but in the last stream.
    sage_dim, sage_lengths = 32, (128, 5)
    sage_qkvs = [_randn(1, length, 3 * heads * sage_dim, device=device) for length in sage_lengths]
    sage_scales = [[_randn(sage_dim, device=device, scale=0.2) + 1 for _ in sage_lengths] for _ in range(2)]
    sage_angle = torch.randn(1, 1, sum(sage_lengths), sage_dim // 2, device=device) * 3
    sage = (sage_qkvs, *sage_scales, torch.cos(sage_angle), torch.sin(sage_angle), heads)
    # e4m3 rows [16, 64] with 16 spare columns (sizes cuBLAS's fp8 GEMM takes, for the GPU's form of the op).
    e4m3_rows = torch.cat((_randn(16, 64, device=device, dtype=torch.float32).to(torch.float8_e4m3fn),
                           torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)), dim=1)
    cases = {
        "quantize_rows": [(x, 0, int8) for int8 in (True, False)],
        "gelu_quantize_rows": [(x, 0, int8) for int8 in (True, False)],
        "concat_gelu_quantize_rows": [(x2, x[:1, :3], 0, int8) for int8 in (True, False)],
        "layernorm_modulate_quantize": [(x, shift, scale, 0, int8) for int8 in (True, False)],
        # Stacked: one launch, and (other dtypes) each stream quantized alone then copied into one buffer.
        "quantize_rows_stacked": [(x, other, 0, int8) for other in (x2, x2.float()) for int8 in (True, False)],
        "gelu_quantize_rows_stacked": [(x, other, 0, int8) for other in (x2, x2.float()) for int8 in (True, False)],
        "layernorm_modulate_quantize_stacked": [(x, shift, scale, other, shift2, scale2, 0, int8)
                                                for other in (x2, x2.float()) for int8 in (True, False)],
        "int8_linear": [(data, row_scale, weight, weight_scale, bias, torch.bfloat16)],
        "int8_linear_gated_residual": [(data, row_scale, weight, weight_scale, bias, gate, residual)],
        "int8_linear_pair": [(data, row_scale, weight, weight_scale, bias, data2, row_scale2, weight2,
                              weight_scale2, None, torch.bfloat16)],
        "int8_linear_gated_residual_pair": [(data, row_scale, weight, weight_scale, bias, gate, residual,
                                             data2, row_scale2, weight2, weight_scale2, bias2, gate2, residual2)],
        "linear_over_parts": [(x[..., :24], x[..., 24:], _randn(32, 64, device=device), bias)],
        "add_low_rank_": [(_randn(10, 32, device=device, dtype=torch.float32),
                           _randn(10, 4, device=device, dtype=torch.float32),
                           _randn(32, 4, device=device, dtype=torch.float32))],
        "lora_columns_": [(e4m3_rows, torch.rand(16, 1, device=device) + 0.5,
                           _randn(16, 64, device=device, dtype=torch.float32).to(torch.float8_e4m3fn),
                           torch.rand(1, 16, device=device) + 0.5)],
        "joint_qkv_norm_rope": [(qkvs, query_scales, key_scales, *rope, heads)],
        "sage_attention": [(q, k, v, True)],
        "sage_joint_attention": [(*sage, True)],
        "sage_frozen_attention": [(*sage, record) for record in (True, False)],  # records, then reuses
    }
    if device == "cuda":
        cases["sage_attention"].append((q, k, v, False))
        cases["sage_joint_attention"].append((*sage, False))
    return cases


def test_every_operator_is_checked_or_named_gpu_only():
    import kontext_core.compute.attention  # noqa: F401  (registers the attention operators)
    import kontext_core.compute.fused  # noqa: F401

    registered, checked = set(ops.REGISTERED), set(_cases("cpu"))
    unaccounted = registered - checked - GPU_ONLY
    assert not unaccounted, f"operators neither opcheck'd here nor named GPU_ONLY: {sorted(unaccounted)}"
    if triton_available():  # every kernel operator registers: the names above are real ones
        assert checked <= registered, sorted(checked - registered)


def test_operators_keep_torch_compiles_contract(device):
    import kontext_core.compute.attention  # noqa: F401
    import kontext_core.compute.fused  # noqa: F401

    try:
        for name, calls in _cases(device).items():
            if name not in ops.REGISTERED:
                continue  # not registered where its kernels cannot import
            operator = getattr(torch.ops.kontext, name).default
            checks = tuple(check for check in ALL_CHECKS if check not in SKIPPED_CHECKS.get(name, ()))
            for args in calls:
                _opcheck(name, operator, args, checks)
    finally:
        kontext_core.compute.attention.forget_frozen_statistics()  # sage_frozen_attention's records, by address


def _opcheck(name: str, operator, args: tuple, checks: tuple[str, ...]) -> None:
    try:
        torch.library.opcheck(operator, args, test_utils=checks)
    except Exception as error:
        raise AssertionError(f"kontext::{name}: {error}") from error


def test_row_operators_fakes_count_the_spare_columns(device):
    # The row operators' cases above again with 3 spare (LoRA) columns, which the operators leave unwritten: the
    # schema and the fakes' shapes only (the traced-values check would compare the unwritten bytes).
    import kontext_core.compute.fused  # noqa: F401

    cases = _cases(device)
    for name in ROW_OPERATORS:
        if name in ops.REGISTERED:
            for *operands, _spare, int8 in cases[name]:
                _opcheck(name, getattr(torch.ops.kontext, name).default, (*operands, 3, int8),
                         ("test_schema", "test_faketensor"))


def test_in_place_operators_declare_what_they_write():
    import kontext_core.compute.fused  # noqa: F401

    for name, written in (("lora_columns_", "data"), ("add_low_rank_", "out")):
        if name not in ops.REGISTERED:
            continue
        schema = getattr(torch.ops.kontext, name).default._schema
        assert not schema.returns, f"{name} returns tensors: an in-place operator here returns nothing"
        for argument in schema.arguments:
            writes = argument.alias_info is not None and argument.alias_info.is_write
            assert writes == (argument.name == written), f"{name}: {argument.name} written: {writes}"
