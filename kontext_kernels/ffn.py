"""The feed-forward GEMMs with their elementwise tails fused into the epilogue.

`linear_gelu` is the MLP's first layer (bias and tanh-GELU applied to the accumulator before it
leaves registers); `linear_gated_residual` is any output projection followed by the block's
`residual + gate * out` (the MLP's second layer, the attention projections, `linear2` of the
single blocks). Each saves one or two full reads and writes of a [tokens, hidden] activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import cdiv, enabled_for, import_triton, interpreting, last_dim_contiguous, launches
from .tiles import grouped_tile

triton, tl = import_triton()

_GELU = 0
_GATED_RESIDUAL = 1
_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] -> gelu_tanh(x @ weight.T + bias), [..., N] in x.dtype."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_gated_residual_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                    gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """x [B, L, K], weight [N, K], bias [N], gate [B or 1, 1, N], residual [B, L, N]
    -> residual + gate * (x @ weight.T + bias), in residual.dtype."""
    return (residual + gate * F.linear(x, weight, bias)).to(residual.dtype)


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (enabled_for(x) and x.dtype == weight.dtype and x.dtype in _DOT_DTYPES
            and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and x.numel() > 0 and weight.numel() > 0)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Same contract as `linear_gelu_reference`; the Triton kernel where it can run."""
    if _fusable(x, weight):
        rows = x.reshape(-1, x.shape[-1])
        out = _launch(rows, weight, bias, _GELU, out_dtype=x.dtype)
        return out.view(*x.shape[:-1], weight.shape[0])
    return linear_gelu_reference(x, weight, bias)


def linear_gated_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Same contract as `linear_gated_residual_reference`; the Triton kernel where it can run."""
    if _fusable(x, weight) and x.dim() == 3 and residual.shape == (*x.shape[:2], weight.shape[0]):
        batch, length, _ = x.shape
        out_features = weight.shape[0]
        gate = gate.expand(batch, 1, out_features)
        out = _launch(x.reshape(batch * length, -1), weight, bias, _GATED_RESIDUAL, out_dtype=residual.dtype,
                      gate=gate, residual=residual.reshape(batch * length, out_features), rows_per_batch=length)
        return out.view(batch, length, out_features)
    return linear_gated_residual_reference(x, weight, bias, gate, residual)


@triton.jit
def _linear_epilogue_kernel(
    x_ptr, weight_ptr, bias_ptr, gate_ptr, residual_ptr, out_ptr,
    M, N, K: tl.constexpr, rows_per_batch,
    stride_xm, stride_wn, stride_gate_b, stride_residual_m, stride_out_m,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # K is a compile-time constant (3072 or 12288 in FLUX): the loop's trip count is known, the
    # tail mask disappears when BLOCK_K divides it, and the interpreter gets a plain Python range.

    # Builtins only, not tl.zeros / tl.sigmoid: see the note in kontext_kernels/modulation.py.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Edge tiles read wrapped-around (valid) rows and columns instead of masking them: the loads
    # stay unmasked along M and N, and the store below drops what does not belong.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]          # [BLOCK_M, BLOCK_K]
    w_ptrs = weight_ptr + cols[None, :] * stride_wn + offs_k[:, None]     # [BLOCK_K, BLOCK_N], weight.T

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k_start in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k_start
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST_OPERANDS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    out_rows = offs_m.to(tl.int64)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 0:  # _GELU (module globals are not visible inside a kernel)
        # gelu_tanh(y) = 0.5 y (1 + tanh(u)) = y * sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3);
        # the sigmoid form saturates cleanly at both ends without a tanh intrinsic.
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(-2.0 * inner))
    else:
        batch = out_rows // rows_per_batch
        gate = tl.load(gate_ptr + batch[:, None] * stride_gate_b + offs_n[None, :], mask=inside, other=0.0)
        residual = tl.load(residual_ptr + out_rows[:, None] * stride_residual_m + offs_n[None, :],
                           mask=inside, other=0.0)
        acc = residual.to(tl.float32) + gate.to(tl.float32) * acc
    tl.store(out_ptr + out_rows[:, None] * stride_out_m + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=inside)


# Target: Hopper (H100/H200, sm_90, 228 KB shared memory per SM). Timed on an H100 on 2026-11-23
# (bench/RESULTS.md): the autotuned best of these reaches ~520 TFLOP/s on the FLUX FFN shapes, below
# cuBLAS's ~741, which is why the model uses cuBLAS GEMMs by default. A TMA / warp-specialised
# persistent kernel would be needed to beat it.
# Triton lowers tl.dot to wgmma there for 4- and 8-warp programs. The 128x256 and 256x128 tiles
# with 8 warps are the usual winners for the FLUX shapes (M ~ 4-9k tokens, N/K 3072 or 12288);
# the smaller tiles cover the 512-token text stream and Ampere/Ada (99-163 KB shared memory),
# where the big multi-stage configs do not fit and the autotuner skips them.
_HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
]

_linear_epilogue_tuned = triton.autotune(configs=_HOPPER_CONFIGS, key=["M", "N", "K", "EPILOGUE"])(
    _linear_epilogue_kernel)

# The interpreter cannot time configs; small tiles keep it quick and put edges in every test shape.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epilogue: int,
            out_dtype: torch.dtype, gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
            rows_per_batch: int = 1) -> torch.Tensor:
    """out [M, N] = epilogue(x [M, K] @ weight[N, K].T + bias)."""
    x = last_dim_contiguous(x)
    weight = weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if bias is not None:
        bias = bias.contiguous()
    if epilogue == _GATED_RESIDUAL:
        gate, residual = last_dim_contiguous(gate), last_dim_contiguous(residual)
    # Unused pointers still need a tensor to point at; the constexpr flags keep them unread.
    placeholder = out
    args = (
        x, weight, placeholder if bias is None else bias,
        placeholder if gate is None else gate, placeholder if residual is None else residual, out,
        M, N, K, rows_per_batch,
        x.stride(0), weight.stride(0),
        0 if gate is None else gate.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
    )
    flags = {"EPILOGUE": epilogue, "HAS_BIAS": bias is not None,
             # float32 inputs follow torch.backends.cuda.matmul.allow_tf32, as F.linear does.
             "IEEE_FP32": x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
             # Triton 3.6's interpreter multiplies bf16 dot operands as their raw uint16 bits. float32
             # operands give it the same products (exact for bf16) and the same float32 accumulation.
             "UPCAST_OPERANDS": interpreting() and x.dtype != torch.float32}

    if interpreting():
        config = _INTERPRETER_CONFIG
        grid = (cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]),)
        _linear_epilogue_kernel[grid](*args, **flags, **config)
    else:
        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _linear_epilogue_tuned[grid](*args, **flags)
    launches["linear_gelu" if epilogue == _GELU else "linear_gated_residual"] += 1
    return out
