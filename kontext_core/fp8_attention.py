"""FP8 (e4m3) scaled dot-product attention on Hopper through cuDNN's fp8 flash-attention graph.

`fp8_attention(q, k, v)` takes bf16 (or fp16) q, k, v of shape [B, H, L, D] and returns attention in
the convention of `F.scaled_dot_product_attention(q, k, v)`: non-causal, no mask, softmax scale
1/sqrt(D), same dtype as q, shape [B, H, Lq, Dv].

Layouts. The inputs may be any strided views, e.g. the contiguous [B, H, L, D] tensors of the
fused qkv kernel, the [B, L, H, D]-ordered views `x.view(B, L, H, D).transpose(1, 2)`, or the
gapped views of a packed qkv projection (`qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)`): they
are read once, by stride, by the quantization pass, which writes contiguous [B, H, L, D] fp8
copies. So one cuDNN graph serves every input layout of a given shape. The output is a
[B, H, L, D] view of a contiguous [B, L, H, D] buffer (`out.transpose(1, 2)` is contiguous), which
makes the model's `out.transpose(1, 2).reshape(B, L, H * D)` free.

Numerics. Per-tensor dynamic scaling: scale = 448 / amax(x) for each of q, k and v, computed on the
GPU (no host sync); cuDNN takes the descale factors amax/448 as device scalars. Inside cuDNN the
softmax numerator P = exp(S - rowmax) lies in [0, 1] and is quantized to fp8 with a fixed scale
of 256. On Hopper cuDNN's fp8 graph writes only fp8 outputs (bf16/fp16 outputs are Blackwell
only), so O is written in e4m3 with scale 448 / (amax(v) * 17/16) -- attention output is a convex
combination of v's rows, so |O| <= amax(v), and 17/16 covers P's own rounding (at most 1/16
relative) -- and a last pass converts it to bf16. Relative L2 error against exact attention is
~5.9% for unit-RMS q, k and Gaussian v (bf16 SDPA: 0.23%); see tests/test_fp8_attention.py.

Speed (H100, cuDNN 9.19, [1, 24, 8704, 128]): the cuDNN fp8 kernel runs in 0.94 ms (~990 TFLOP/s)
against 1.40 ms for bf16 SDPA on cuDNN; quantizing q, k, v (an amax pass and a cast pass each)
and converting O back add ~0.18 ms of GPU time: 1.12 ms in all (bench/fp8_attention_probe.py).

`torch.compile`: the whole thing is one opaque custom op, `torch.ops.kontext.fp8_attention`, with
a fake implementation giving the output's shape and strides.

cuDNN is reached through the cuDNN frontend's Python package (`pip install nvidia-cudnn-frontend`);
it is imported on first use only, so importing this module never needs it. `available(device)`
says whether the path can run. The frontend loads the same libcudnn that PyTorch already loaded.
"""

from __future__ import annotations

import functools
import math
import threading

import torch

__all__ = ["available", "fp8_attention", "unavailable_reason"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
P_SCALE = 256.0  # softmax numerator in [0, 1] -> [0, 256] in fp8
O_MARGIN = 17.0 / 16.0  # |O| <= amax(v) * (1 + P's worst relative rounding error)
_MIN_CUDNN = 90100  # fp8 SDPA forward: cuDNN 9.1.0 on Hopper (9.10.0 excluded by the frontend)

# Slots of the per-call float32 work buffer, each 16 bytes apart (cuDNN scalars, atomics).
_AMAX_Q, _AMAX_K, _AMAX_V = 0, 4, 8
_DESCALE_Q, _DESCALE_K, _DESCALE_V = 12, 16, 20
_SCALE_S, _DESCALE_S, _SCALE_O, _DESCALE_O = 24, 28, 32, 36
_AMAX_S_OUT, _AMAX_O_OUT = 40, 44
_WORK_FLOATS = 48


# ----------------------------------------------------------------------------------------------
# Loading the cuDNN frontend (lazily, once)
# ----------------------------------------------------------------------------------------------

_lock = threading.Lock()
_cudnn_state: dict = {}


def _loaded_libcudnn_path() -> str | None:
    """The libcudnn.so PyTorch has mapped into this process, if any (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").rsplit("/", 1)[-1].startswith("libcudnn.so"):
                    return parts[5].rstrip("\n")
    except OSError:
        pass
    return None


def _import_cudnn():
    """The `cudnn` frontend module bound to PyTorch's libcudnn, or raise with the reason."""
    with _lock:
        if "module" in _cudnn_state:
            return _cudnn_state["module"]
        if "error" in _cudnn_state:
            raise _cudnn_state["error"]
        try:
            if torch.cuda.is_available():
                torch.backends.cudnn.version()  # makes PyTorch load its libcudnn
            import ctypes

            import cudnn  # type: ignore[import-not-found]

            # The frontend dlopens libcudnn from site-packages or the loader path on import; make
            # sure it talks to the very library PyTorch uses (one cuDNN per process).
            path = _loaded_libcudnn_path()
            pybind = getattr(cudnn, "_pybind_module", None)
            if path is not None and pybind is not None and hasattr(pybind, "_set_dlhandle_cudnn"):
                lib = ctypes.CDLL(path)
                pybind._set_dlhandle_cudnn(ctypes.cast(lib._handle, ctypes.c_void_p).value)
                _cudnn_state["lib"] = lib
            _cudnn_state["libpath"] = path
            cudnn.backend_version()  # raises if no libcudnn could be bound
        except BaseException as error:  # ImportError, OSError, RuntimeError from the binding...
            wrapped = RuntimeError(f"cuDNN frontend unavailable: {type(error).__name__}: {error}")
            _cudnn_state["error"] = wrapped
            raise wrapped from error
        _cudnn_state["module"] = cudnn
        return cudnn


@functools.cache
def _device_reason(index: int) -> str | None:
    if torch.version.hip is not None:
        return "ROCm build"
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        return f"GPU capability {major}.{minor} < 9.0 (fp8 SDPA needs Hopper or newer)"
    try:
        cudnn = _import_cudnn()
    except RuntimeError as error:
        return str(error)
    version = cudnn.backend_version()
    if version < _MIN_CUDNN or version == 91000:
        return f"cuDNN {cudnn.backend_version_string()} has no fp8 SDPA forward (needs >= 9.1.0, not 9.10.0)"
    return None


def unavailable_reason(device: torch.device | str | int | None = None) -> str | None:
    """None when `fp8_attention` can run on `device`, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_reason(index)


def available(device: torch.device | str | int | None = None) -> bool:
    """True when the cuDNN frontend imports, cuDNN has fp8 SDPA and the GPU is Hopper or newer."""
    return unavailable_reason(device) is None


# ----------------------------------------------------------------------------------------------
# Quantization: amax, scale and cast (Triton when importable, PyTorch otherwise)
# ----------------------------------------------------------------------------------------------

@functools.cache
def _triton_kernels():
    """(amax, quantize, dequantize) Triton kernels, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def amax_kernel(x_ptr, work_ptr, slot, n_rows, heads, length, stride_b, stride_h, stride_l, stride_d,
                    head_dim, tiles_per_program, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # Grid-stride over row tiles: one atomic per program, not one per tile.
        cols = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        first = tl.program_id(0).to(tl.int64)
        for i in tl.range(0, tiles_per_program):
            tile = first + i * tl.num_programs(0)
            rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
            pos = rows % length
            bh = rows // length
            offsets = (bh // heads) * stride_b + (bh % heads) * stride_h + pos * stride_l
            mask = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
            x = tl.load(x_ptr + offsets[:, None] + cols[None, :] * stride_d, mask=mask, other=0.0)
            acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
        tl.atomic_max(work_ptr + slot, tl.max(tl.max(acc, axis=1), axis=0))

    @triton.jit
    def quantize_kernel(x_ptr, y_ptr, work_ptr, amax_slot, descale_slot, n_rows, heads, length,
                        stride_b, stride_h, stride_l, stride_d, head_dim,
                        IS_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        amax = tl.maximum(tl.load(work_ptr + amax_slot), 1e-30)
        scale = 448.0 / amax
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        pos = rows % length
        bh = rows // length
        offsets = (bh // heads) * stride_b + (bh % heads) * stride_h + pos * stride_l
        mask = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
        x = tl.load(x_ptr + offsets[:, None] + cols[None, :] * stride_d, mask=mask, other=0.0)
        y = tl.minimum(tl.maximum(x.to(tl.float32) * scale, -448.0), 448.0)
        tl.store(y_ptr + rows[:, None] * head_dim + cols[None, :], y.to(tl.float8e4nv), mask=mask)
        if pid == 0:
            tl.store(work_ptr + descale_slot, amax / 448.0)
            if IS_V:
                o_range = amax * (17.0 / 16.0)
                tl.store(work_ptr + 32, 448.0 / o_range)  # _SCALE_O
                tl.store(work_ptr + 36, o_range / 448.0)  # _DESCALE_O
                tl.store(work_ptr + 24, 256.0)  # _SCALE_S
                tl.store(work_ptr + 28, 1.0 / 256.0)  # _DESCALE_S

    @triton.jit
    def dequantize_kernel(o_ptr, out_ptr, work_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        descale = tl.load(work_ptr + 36)
        o = tl.load(o_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (o * descale).to(out_ptr.dtype.element_ty), mask=mask)

    return amax_kernel, quantize_kernel, dequantize_kernel


# Tiles of 16 rows of D, 4 warps, at most 8 amax programs per SM: measured best on an H100 at
# [1, 24, 8704, 128] (per tensor: amax 24 us, cast 26 us; 32- to 128-row tiles, 8 warps or more
# amax programs were slower).
_BLOCK_ROWS = 16
_QUANT_WARPS = 4
_AMAX_PROGRAMS_PER_SM = 8
_DEQUANT_BLOCK = 4096


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q8, k8, v8, work): contiguous [B, H, L, D] float8_e4m3fn copies and the float32 work buffer
    holding amaxes and every scale cuDNN needs (no host sync)."""
    work = torch.zeros(_WORK_FLOATS, dtype=torch.float32, device=q.device)
    kernels = _triton_kernels()
    if kernels is None:
        return (*_quantize_torch(q, k, v, work), work)
    amax_kernel, quantize_kernel, _ = kernels
    outputs = []
    for x, amax_slot in ((q, _AMAX_Q), (k, _AMAX_K), (v, _AMAX_V)):
        batch, heads, length, head_dim = x.shape
        n_rows = batch * heads * length
        block_d = _next_pow2(head_dim)
        grid = (_cdiv(n_rows, _BLOCK_ROWS),)
        amax_grid = (min(grid[0], _AMAX_PROGRAMS_PER_SM * _sm_count(x.device.index)),)
        amax_kernel[amax_grid](x, work, amax_slot, n_rows, heads, length, *x.stride(), head_dim,
                               _cdiv(grid[0], amax_grid[0]),
                               BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d, num_warps=_QUANT_WARPS)
        outputs.append((x, amax_slot, n_rows, block_d, grid))
    quantized = []
    for (x, amax_slot, n_rows, block_d, grid), descale_slot in zip(outputs, (_DESCALE_Q, _DESCALE_K, _DESCALE_V)):
        y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        quantize_kernel[grid](x, y, work, amax_slot, descale_slot, n_rows, x.shape[1], x.shape[2], *x.stride(),
                              x.shape[3], IS_V=amax_slot == _AMAX_V, BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d,
                              num_warps=_QUANT_WARPS)
        quantized.append(y)
    return (*quantized, work)


@functools.cache
def _sm_count(index: int | None) -> int:
    if index is None:  # CPU tensors under TRITON_INTERPRET (testing the kernels without a GPU)
        return 4
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _quantize_torch(q, k, v, work):
    """The same quantization in plain PyTorch ops (slower: used only when Triton is missing)."""
    quantized = []
    for x, amax_slot, descale_slot in ((q, _AMAX_Q, _DESCALE_Q), (k, _AMAX_K, _DESCALE_K), (v, _AMAX_V, _DESCALE_V)):
        amax = torch.linalg.vector_norm(x, ord=math.inf, dtype=torch.float32).clamp_min(1e-30)
        work[amax_slot] = amax
        work[descale_slot] = amax / FP8_MAX
        # |x * 448 / amax| <= 448 up to rounding, and the cast rounds anything below 464 to 448.
        quantized.append(torch.mul(x, FP8_MAX / amax).to(torch.float8_e4m3fn).contiguous())
    o_range = work[_AMAX_V] * O_MARGIN
    work[_SCALE_O] = FP8_MAX / o_range
    work[_DESCALE_O] = o_range / FP8_MAX
    work[_SCALE_S] = P_SCALE
    work[_DESCALE_S] = 1.0 / P_SCALE
    return quantized


def dequantize_output(o8: torch.Tensor, work: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 O (any dense layout) -> `dtype`, same strides, times O's descale factor."""
    out = torch.empty_strided(o8.shape, o8.stride(), dtype=dtype, device=o8.device)
    kernels = _triton_kernels()
    if kernels is None:
        return out.copy_(o8.float() * work[_DESCALE_O])
    n = o8.numel()
    kernels[2][(_cdiv(n, _DEQUANT_BLOCK),)](o8, out, work, n, BLOCK=_DEQUANT_BLOCK, num_warps=8)
    return out


# ----------------------------------------------------------------------------------------------
# The cuDNN graph: built once per (device, shapes, strides), then executed on PyTorch's stream
# ----------------------------------------------------------------------------------------------

class _Uid:
    Q, K, V, O = 1, 2, 3, 4
    DESCALE_Q, DESCALE_K, DESCALE_V = 5, 6, 7
    DESCALE_S, SCALE_S, SCALE_O = 8, 9, 10
    AMAX_S, AMAX_O, STATS = 11, 12, 13


class _Fp8Graph:
    def __init__(self, graph, workspace_size: int, generate_stats: bool, stats_shape):
        self.graph = graph
        self.workspace_size = workspace_size
        self.generate_stats = generate_stats
        self.stats_shape = stats_shape


_graphs: dict = {}
_handles: dict = {}


def _handle(cudnn, device: torch.device):
    """One cuDNN handle per device, created on that device."""
    entry = _handles.get(device.index)
    if entry is None:
        with torch.cuda.device(device):
            entry = [cudnn.create_handle(), None]
        _handles[device.index] = entry
    return entry


def _output_strides(batch: int, heads: int, length: int, head_dim: int) -> tuple[int, ...]:
    """[B, H, L, D] strides of a contiguous [B, L, H, D] buffer."""
    return (length * heads * head_dim, head_dim, heads * head_dim, 1)


def _build_graph(cudnn, handle: int, q8, k8, v8, generate_stats: bool) -> _Fp8Graph:
    batch, heads, length_q, head_dim = q8.shape
    head_dim_v = v8.shape[3]
    fp8 = cudnn.data_type.FP8_E4M3
    f32 = cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

    def scalar(uid):
        return graph.tensor(uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)

    q = graph.tensor(uid=_Uid.Q, dim=tuple(q8.shape), stride=tuple(q8.stride()), data_type=fp8)
    k = graph.tensor(uid=_Uid.K, dim=tuple(k8.shape), stride=tuple(k8.stride()), data_type=fp8)
    v = graph.tensor(uid=_Uid.V, dim=tuple(v8.shape), stride=tuple(v8.stride()), data_type=fp8)
    o, stats, amax_s, amax_o = graph.sdpa_fp8(
        q=q, k=k, v=v,
        descale_q=scalar(_Uid.DESCALE_Q), descale_k=scalar(_Uid.DESCALE_K), descale_v=scalar(_Uid.DESCALE_V),
        descale_s=scalar(_Uid.DESCALE_S), scale_s=scalar(_Uid.SCALE_S), scale_o=scalar(_Uid.SCALE_O),
        generate_stats=generate_stats, attn_scale=1.0 / math.sqrt(head_dim), use_causal_mask=False,
        name="fp8_sdpa",
    )
    o.set_uid(_Uid.O).set_output(True).set_dim((batch, heads, length_q, head_dim_v)) \
        .set_stride(_output_strides(batch, heads, length_q, head_dim_v)).set_data_type(fp8)
    for tensor, uid in ((amax_s, _Uid.AMAX_S), (amax_o, _Uid.AMAX_O)):
        tensor.set_uid(uid).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
    stats_shape = None
    if generate_stats:
        stats_shape = (batch, heads, length_q, 1)
        stats.set_uid(_Uid.STATS).set_output(True).set_dim(stats_shape) \
            .set_stride((heads * length_q, length_q, 1, 1)).set_data_type(f32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return _Fp8Graph(graph, graph.get_workspace_size(), generate_stats, stats_shape)


def _graph_for(cudnn, handle: int, q8, k8, v8) -> _Fp8Graph:
    key = (q8.device.index, tuple(q8.shape), q8.stride(), tuple(k8.shape), k8.stride(), tuple(v8.shape), v8.stride())
    entry = _graphs.get(key)
    if entry is None:
        with _lock:
            entry = _graphs.get(key)
            if entry is None:
                try:  # inference needs no softmax statistics; older cuDNN may insist on writing them
                    entry = _build_graph(cudnn, handle, q8, k8, v8, generate_stats=False)
                except cudnn.cudnnGraphNotSupportedError:
                    entry = _build_graph(cudnn, handle, q8, k8, v8, generate_stats=True)
                _graphs[key] = entry
    return entry


def sdpa_fp8_graph(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """cuDNN's fp8 attention on quantized q8, k8, v8 [B, H, L, D] with the scales in `work`
    (from `quantize_qkv`): fp8 O, [B, H, L, D] view of a contiguous [B, L, H, D] buffer."""
    cudnn = _import_cudnn()
    device = q8.device
    handle_entry = _handle(cudnn, device)
    handle = handle_entry[0]
    entry = _graph_for(cudnn, handle, q8, k8, v8)
    batch, heads, length_q, _ = q8.shape
    head_dim_v = v8.shape[3]
    o8 = torch.empty((batch, length_q, heads, head_dim_v), dtype=torch.float8_e4m3fn, device=device).transpose(1, 2)
    base = work.data_ptr()
    pack = {
        _Uid.Q: q8.data_ptr(), _Uid.K: k8.data_ptr(), _Uid.V: v8.data_ptr(), _Uid.O: o8.data_ptr(),
        _Uid.DESCALE_Q: base + 4 * _DESCALE_Q, _Uid.DESCALE_K: base + 4 * _DESCALE_K,
        _Uid.DESCALE_V: base + 4 * _DESCALE_V, _Uid.DESCALE_S: base + 4 * _DESCALE_S,
        _Uid.SCALE_S: base + 4 * _SCALE_S, _Uid.SCALE_O: base + 4 * _SCALE_O,
        _Uid.AMAX_S: base + 4 * _AMAX_S_OUT, _Uid.AMAX_O: base + 4 * _AMAX_O_OUT,
    }
    stats = None
    if entry.generate_stats:
        stats = torch.empty(entry.stats_shape, dtype=torch.float32, device=device)
        pack[_Uid.STATS] = stats.data_ptr()
    workspace = torch.empty(max(entry.workspace_size, 1), dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream
    if handle_entry[1] != stream:
        cudnn.set_stream(handle=handle, stream=stream)
        handle_entry[1] = stream
    entry.graph.execute(pack, workspace.data_ptr(), handle=handle)
    return o8


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fp8_attention wants [B, H, L, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"fp8_attention: mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] % 16 or v.shape[3] % 16 or q.shape[3] > 256:
        raise ValueError(f"fp8_attention: head dims must be multiples of 16 and at most 256, got {q.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_attention takes bf16/fp16 inputs of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.is_cuda and q.device == k.device == v.device):
        raise ValueError("fp8_attention needs q, k, v on one CUDA device")


def _fp8_attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    _check(q, k, v)
    with torch.cuda.device(q.device):
        q8, k8, v8, work = quantize_qkv(q, k, v)
        o8 = sdpa_fp8_graph(q8, k8, v8, work)
        return dequantize_output(o8, work, q.dtype)


def _fake_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    batch, heads, length_q, _ = q.shape
    return q.new_empty((batch, length_q, heads, v.shape[3])).transpose(1, 2)


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("kontext::fp8_attention", mutates_args=())
    def _fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _fp8_attention_eager(q, k, v)

    @_fp8_attention_op.register_fake
    def _(q, k, v):
        return _fake_output(q, k, v)

    _entry = _fp8_attention_op
else:  # PyTorch < 2.4: no custom ops; eager only
    _entry = _fp8_attention_eager


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on fp8 tensor cores: q, k, v [B, H, L, D] bf16/fp16 (any strides),
    returns [B, H, Lq, Dv] in q's dtype, as `F.scaled_dot_product_attention(q, k, v)` would.
    Check `available(q.device)` first. Inference only (no backward)."""
    _check(q, k, v)
    return _entry(q, k, v)
