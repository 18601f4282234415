"""The int8 GEMM of the int8 path: int8 activation rows times int8 weight rows, the scales and the bias
applied to the int32 accumulator before it leaves registers.

    out[m, n] = (sum_k data[m, k] * weight[n, k]) * scale[m] * weight_scale[n] + bias[n]

Activations come quantized per row (per token, `scale` [M, 1], kontext_kernels/row_quant.py), weights per output
row (`weight_scale` [N]); the products are exact in the int32 accumulator, so the only rounding is the
quantization itself and the final cast. On the roughly Gaussian activations and weights of FLUX's blocks
int8 with per-row scales rounds ~3x less than e4m3 (3 mantissa bits), on tensor cores of the same 8-bit
rate (bench/RESULTS.md, "An int8 path").

cuBLAS's int8 GEMM (`torch._int_mm`) writes the int32 accumulator out and leaves the scaling to a second
pass, and on an H200 it ran at 580-790 TOP/s, under bf16's rate: hence kernels of our own. On Hopper the
warp-specialised Gluon kernel of int8_gemm_hopper.py takes the product where it can (94-103% of cuBLAS's fp8
rate at FLUX's shapes); this module's Triton kernels are the others: a persistent one reading its tiles through
the tensor memory accelerator (TMA) on Hopper, a pointer-based one elsewhere (Ampere, Ada, Triton's interpreter).
"""

from __future__ import annotations

import torch

from .runtime import (cdiv, enabled_for, hopper, import_triton, interpreting, last_dim_contiguous, launches,
                      multiprocessors, row_bucket)
from . import int8_gemm_hopper
from .tiles import grouped_tile

triton, tl = import_triton()


def int8_linear_reference(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """data int8 [..., K], scale float32 [rows, 1], weight int8 [N, K], weight_scale float32 [N] (or a scalar),
    bias [N] -> data @ weight.T * scale * weight_scale + bias [..., N] in out_dtype."""
    rows = data.reshape(-1, data.shape[-1])
    # float64 holds every int8 dot product of K < 2**38 terms exactly, as the int32 accumulator does.
    sums = rows.double() @ weight.double().t()
    out = sums.float() * scale.float().reshape(-1, 1) * weight_scale.float().reshape(1, -1).expand(1, weight.shape[0])
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*data.shape[:-1], weight.shape[0])


def int8_linear_gated_residual_reference(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                                         weight_scale: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                                         residual: torch.Tensor) -> torch.Tensor:
    """residual [B, L, N] + gate [B, 1, N] * the product of `int8_linear_reference` (not rounded between), in
    residual's dtype: the block's gated add taken into the GEMM."""
    product = int8_linear_reference(data, scale, weight, weight_scale, bias, torch.float32)
    return (residual.float() + gate.float() * product.reshape(residual.shape)).to(residual.dtype)


def int8_linear_gated_residual(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                               weight_scale: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                               residual: torch.Tensor) -> torch.Tensor:
    """Same contract as `int8_linear_gated_residual_reference`. The add happens in the GEMM's epilogue where the
    Hopper kernel takes the product (a contiguous residual, a [B, 1, N] gate); elsewhere the product is rounded to
    residual's dtype and added after it, as an unfused block does."""
    batch, length, n = residual.shape
    if (_runs(data, weight) and HOPPER_KERNEL == "gluon" and gate.shape[0] == batch and residual.is_contiguous()):
        operands = _kernel_operands(data, scale, weight, weight_scale, bias)
        flat_residual, gate_rows = residual.view(batch * length, n), gate.reshape(batch, n)
        if (int8_gemm_hopper.ready_for(operands[0], weight, residual.dtype)
                and int8_gemm_hopper.gated_residual_fits(batch * length, n, flat_residual, gate_rows)):
            out = int8_gemm_hopper.launch(*operands, residual.dtype, residual=flat_residual, gate=gate_rows)
            launches["int8_linear"] += 1  # an int8 GEMM like any other, counted as one
            launches["int8_linear_gated_residual"] += 1
            return out.view(batch, length, n)
    return residual + gate * int8_linear(data, scale, weight, weight_scale, bias, residual.dtype)


# Whether `int8_linear_pair` and `int8_linear_gated_residual_pair` give a pair one launch where the Hopper kernel
# takes it (False: a launch each; bench_step's +paired and +unpaired choose). On: in two runs of the fast step on an
# H200 it took 1.2 and 1.5 ms off a step with the same velocity bit for bit, and its GPU tests passed
# (bench/RESULTS.md, 2026-12-07, third session).
PAIR_STREAMS = True


def _may_pair(first: tuple, second: tuple) -> bool:
    # Checked before any operand is prepared: with pairing off, or off Hopper, a pair costs the host nothing more
    # than its two single calls.
    return (PAIR_STREAMS and HOPPER_KERNEL == "gluon"
            and all(_runs(operands[0], operands[2]) for operands in (first, second)))


def _paired(products: list[int8_gemm_hopper.Product], out_dtype: torch.dtype) -> tuple | None:
    """Both products from one launch of the Hopper kernel, or None where it does not take them together."""
    if not (int8_gemm_hopper.pair_fits(*products)
            and all(int8_gemm_hopper.ready_for(product.data, product.weight, out_dtype)
                    and (product.residual is None or int8_gemm_hopper.gated_residual_fits(
                        product.data.shape[0], product.weight.shape[0], product.residual, product.gate))
                    for product in products)):
        return None
    launches["int8_linear"] += 2  # two int8 GEMMs, as unpaired calls count them
    launches["int8_linear_pair"] += 1
    return int8_gemm_hopper.launch_pair(*products, out_dtype)


def int8_linear_pair(first: tuple, second: tuple, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two products of the same N and K, each (data, scale, weight, weight_scale, bias) as `int8_linear` takes them
    and its result: the double block's text and image streams, each with its own weights. One launch of the Hopper
    kernel where it takes both (the text stream's 512 rows then fill the image stream's last round of tiles
    instead of leaving most of the GPU idle for a launch of their own); two calls of `int8_linear` elsewhere."""
    if _may_pair(first, second):
        products = [int8_gemm_hopper.Product(*_kernel_operands(*operands)) for operands in (first, second)]
        outs = _paired(products, out_dtype)
        if outs is not None:
            return tuple(out.view(*operands[0].shape[:-1], out.shape[1])
                         for out, operands in zip(outs, (first, second)))
    return int8_linear(*first, out_dtype), int8_linear(*second, out_dtype)


def int8_linear_gated_residual_pair(first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`int8_linear_gated_residual` of two operand tuples (data, scale, weight, weight_scale, bias, gate, residual)
    of the same N and K: one launch of the Hopper kernel where it takes both, as `int8_linear_pair`."""
    if _may_pair(first, second) and all(operands[5].shape[0] == operands[6].shape[0] and operands[6].is_contiguous()
                                        for operands in (first, second)):
        products = []
        for data, scale, weight, weight_scale, bias, gate, residual in (first, second):
            batch, length, n = residual.shape
            products.append(int8_gemm_hopper.Product(*_kernel_operands(data, scale, weight, weight_scale, bias),
                                                     residual.view(batch * length, n), gate.reshape(batch, n)))
        outs = _paired(products, first[6].dtype)
        if outs is not None:
            launches["int8_linear_gated_residual"] += 2
            return tuple(out.view(operands[6].shape) for out, operands in zip(outs, (first, second)))
    return int8_linear_gated_residual(*first), int8_linear_gated_residual(*second)


def _runs(data: torch.Tensor, weight: torch.Tensor) -> bool:
    return (enabled_for(data) and data.dtype == torch.int8 and weight.dtype == torch.int8 and weight.dim() == 2
            and data.shape[-1] == weight.shape[1] and data.numel() > 0 and weight.numel() > 0)


def int8_linear(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as `int8_linear_reference`; the Triton kernel where it can run."""
    if not _runs(data, weight):
        return int8_linear_reference(data, scale, weight, weight_scale, bias, out_dtype)
    out = _launch(*_kernel_operands(data, scale, weight, weight_scale, bias), out_dtype)
    return out.view(*data.shape[:-1], weight.shape[0])


def _kernel_operands(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> tuple:
    """The product's operands as the kernels take them: data [M, K] rows with unit column stride, scale [M] and
    weight_scale [N] float32, weight and bias contiguous."""
    rows = last_dim_contiguous(data.reshape(-1, data.shape[-1]))
    return (rows, scale.reshape(-1).float().contiguous(), weight.contiguous(),
            weight_scale.float().reshape(-1).expand(weight.shape[0]).contiguous(),
            None if bias is None else bias.contiguous())


@triton.jit
def _scaled_tile(acc, offs_m, offs_n, M, N, scale_ptr, weight_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """The int32 accumulator tile as float32 with the row, column and bias terms applied."""
    row_scale = tl.load(scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    column_scale = tl.load(weight_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * row_scale[:, None] * column_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _int8_linear_kernel(
    data_ptr, weight_ptr, scale_ptr, weight_scale_ptr, bias_ptr, out_ptr,
    M, N, K: tl.constexpr, stride_data, stride_weight, stride_out, M_BUCKET,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # M_BUCKET is only the autotuner's key (see runtime.row_bucket). Edge tiles read wrapped-around valid rows and
    # columns, and the store drops them.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    data_ptrs = data_ptr + rows[:, None] * stride_data + offs_k[None, :]          # [BLOCK_M, BLOCK_K]
    weight_ptrs = weight_ptr + cols[None, :] * stride_weight + offs_k[:, None]    # [BLOCK_K, BLOCK_N], K-major

    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k_start in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:
            a = tl.load(data_ptrs)
            b = tl.load(weight_ptrs)
        else:
            k_left = K - k_start
            a = tl.load(data_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(weight_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        data_ptrs += BLOCK_K
        weight_ptrs += BLOCK_K

    out = _scaled_tile(acc, offs_m, offs_n, M, N, scale_ptr, weight_scale_ptr, bias_ptr, HAS_BIAS)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _int8_linear_tma_kernel(
    data_desc, weight_desc, out_desc, scale_ptr, weight_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_out, M_BUCKET,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, STORE: tl.constexpr,
):
    # Persistent: one program per SM walks the output tiles, so a tile's epilogue overlaps the next tile's
    # first loads; the TMA engine fetches the tiles (out-of-range parts as zeros). STORE (_STORE_*) says how the
    # output tile leaves: by pointer, or through the TMA engine (asynchronously: it overlaps the next tile's
    # loop), whole or in two halves along N (half the shared memory, which leaves room for a 4th stage).
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = data_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = weight_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out = _scaled_tile(acc, offs_m, offs_n, M, N, scale_ptr, weight_scale_ptr, bias_ptr, HAS_BIAS)
        if STORE == 0:
            inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=inside)
        elif STORE == 1:
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(out_desc.dtype))
        else:
            left, right = tl.split(tl.permute(tl.reshape(out.to(out_desc.dtype), (BLOCK_M, 2, BLOCK_N // 2)),
                                              (0, 2, 1)))
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], left)
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], right)


# Ampere / Ada (99-163 KB of shared memory; configs that do not fit are skipped by the autotuner) and
# Hopper without TMA. Not yet timed on those GPUs (the device tool lends H200s only).
_POINTER_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
]


_STORE_POINTER, _STORE_TMA, _STORE_TMA_HALVES = 0, 1, 2


def _tma_block_shapes(nargs: dict) -> None:
    # The descriptors are made before a config is chosen; each config sets the tiles it loads and stores.
    nargs["data_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["weight_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    halves = nargs["STORE"] == _STORE_TMA_HALVES
    nargs["out_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"] // 2 if halves else nargs["BLOCK_N"]]


def _tma_config(block_m: int, block_n: int, stages: int, store: int):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "GROUP_M": 8, "STORE": store},
                         num_stages=stages, num_warps=8, pre_hook=_tma_block_shapes)


# Hopper (sm_90: 228 KB of shared memory, 8-bit wgmma taking K in steps of 32). Timed on an H200 on
# 2026-12-03 with bench/linear/int8_probe.py at FLUX's shapes (8704 tokens): the three pointer-store configs were the
# fastest of nine (1040-1215 TOP/s; cuBLAS's fp8 GEMM 1270-1440 TFLOP/s on the same shapes); stores through
# TMA then took 0-6% off qkv, proj, the MLP and linear1 (best 1100-1240 TOP/s), not off linear2 or every MLP
# down. A whole 256x128 output tile through TMA needs 263 KB with 4 stages: in halves it fits.
_TMA_CONFIGS = [
    _tma_config(256, 128, 4, _STORE_POINTER),
    _tma_config(128, 256, 4, _STORE_POINTER),
    _tma_config(128, 256, 3, _STORE_POINTER),
    _tma_config(256, 128, 4, _STORE_TMA_HALVES),
    _tma_config(128, 256, 4, _STORE_TMA_HALVES),
    _tma_config(256, 128, 3, _STORE_TMA),
    _tma_config(128, 256, 3, _STORE_TMA),
]

# Keyed on a bucket of the row count, not the count itself: a new resolution (or batch) reuses the configs tuned
# for the nearest power of two instead of tuning again mid-run.
_int8_linear_tuned = triton.autotune(configs=_POINTER_CONFIGS, key=["M_BUCKET", "N", "K"])(_int8_linear_kernel)
_int8_linear_tma_tuned = triton.autotune(configs=_TMA_CONFIGS, key=["M_BUCKET", "N", "K"])(_int8_linear_tma_kernel)

_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


_TMA_MIN_K = 128  # the configs' K tile


def _tma_ready(data: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    # TMA descriptors need 16-byte aligned bases and row strides. Rows narrower than the K tile (no FLUX
    # layer has them) failed on an H200 (tiles wider than the tensor), and the configs' shared memory is sized
    # for 2-byte outputs (float32 ones, which only tests ask for, need more than an SM has): the pointer
    # kernel takes those.
    # The output's rows must be 16-byte aligned too, for the stores through TMA (N a multiple of 8).
    return (hopper(data.device) and out_dtype.itemsize == 2 and data.shape[1] >= _TMA_MIN_K and data.stride(0) % 16 == 0
            and weight.stride(0) % 16 == 0 and data.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and weight.shape[0] % 8 == 0)


# Which kernel takes a product on Hopper: "gluon" (the warp-specialised kernel of int8_gemm_hopper.py, where it
# can run) or "triton" (this module's persistent TMA kernel).
HOPPER_KERNEL = "gluon"


def _launch(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None, out_dtype: torch.dtype, kernel: str | None = None) -> torch.Tensor:
    if (kernel or HOPPER_KERNEL) == "gluon" and int8_gemm_hopper.ready_for(data, weight, out_dtype):
        out = int8_gemm_hopper.launch(data, scale, weight, weight_scale, bias, out_dtype)
        launches["int8_linear"] += 1
        return out
    M, K = data.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=data.device)
    bias_arg = out if bias is None else bias  # unread when HAS_BIAS is False
    has_bias = bias is not None
    bucket = row_bucket(M)
    if interpreting():
        config = _INTERPRETER_CONFIG
        _int8_linear_kernel[(cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]),)](
            data, weight, scale, weight_scale, bias_arg, out, M, N, K, data.stride(0), weight.stride(0), out.stride(0),
            bucket, HAS_BIAS=has_bias, **config)
    elif _tma_ready(data, weight, out_dtype):
        from triton.tools.tensor_descriptor import TensorDescriptor

        programs = multiprocessors(data.device)

        def grid(meta):
            return (min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)
        _int8_linear_tma_tuned[grid](
            TensorDescriptor.from_tensor(data, [128, 128]), TensorDescriptor.from_tensor(weight, [128, 128]),
            TensorDescriptor.from_tensor(out, [128, 128]), scale, weight_scale, bias_arg, out, M, N, K, out.stride(0),
            bucket, HAS_BIAS=has_bias)
    else:
        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _int8_linear_tuned[grid](data, weight, scale, weight_scale, bias_arg, out, M, N, K, data.stride(0),
                                 weight.stride(0), out.stride(0), bucket, HAS_BIAS=has_bias)
    launches["int8_linear"] += 1
    return out
