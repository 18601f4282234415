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

Numerics. Per-tensor dynamic scales computed on the GPU (no host sync) by kontext_kernels/fp8_qkv.py, which
documents them; on Hopper cuDNN's fp8 graph writes O only in fp8, so a last pass converts it back.
Relative L2 error against exact attention is ~5.9% for unit-RMS q, k and Gaussian v (bf16 SDPA:
0.23%); see tests/compute/test_fp8_attention.py.

Speed (H100, cuDNN 9.19, [1, 24, 8704, 128]): the cuDNN fp8 kernel runs in 0.94 ms (~990 TFLOP/s)
against 1.40 ms for bf16 SDPA on cuDNN; quantizing q, k, v (an amax pass and a cast pass each)
and converting O back add ~0.18 ms of GPU time: 1.12 ms in all (bench/attention/fp8_attention_probe.py).
The model's blocks call `fp8_joint_attention` instead, from their qkv projections: the QK-norm + RoPE
kernel writes q and k in fp8 at static scales and takes v's amax, leaving a v cast and O's conversion,
~0.05 ms a call (bench/RESULTS.md).

`torch.compile`: each entry point is one opaque operator (kontext_core/compute/ops.py),
`torch.ops.kontext.fp8_attention` and `torch.ops.kontext.fp8_joint_attention`, with fake implementations giving the
output's shape and strides.

cuDNN is reached through the cuDNN frontend's Python package (`pip install nvidia-cudnn-frontend`);
it is imported on first use only, so importing this module never needs it. `available(device)`
says whether the path can run. The frontend loads the same libcudnn that PyTorch already loaded.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import torch

from . import ops

try:  # kontext_kernels/ may be missing or broken (then fp8_qkv is unavailable and says why)
    from kontext_kernels import fp8_qkv as _qkv
    _QKV_IMPORT_ERROR = None
except Exception as error:  # pragma: no cover
    _qkv = None
    _QKV_IMPORT_ERROR = f"{type(error).__name__}: {error}"

__all__ = ["available", "fp8_attention", "fp8_joint_attention", "unavailable_reason"]

_MIN_CUDNN = 90100  # fp8 SDPA forward: cuDNN 9.1.0 on Hopper (9.10.0 excluded by the frontend)


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
    module = _cudnn_state.get("module")
    if module is not None:  # every attention call asks: no lock once loaded
        return module
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


def describe() -> dict:
    """What this process runs fp8 attention with, for reports: the frontend's version and location, the
    cuDNN backend and library, and each graph built so far (raises where the frontend cannot load)."""
    cudnn = _import_cudnn()
    return {
        "frontend": getattr(cudnn, "__version__", "?"),
        "frontend_path": os.path.dirname(cudnn.__file__),
        "backend": f"{cudnn.backend_version()} ({cudnn.backend_version_string()})",
        "libcudnn": _cudnn_state.get("libpath"),
        "graphs": [{"generate_stats": entry.generate_stats, "workspace_bytes": entry.workspace_size,
                    "plans": entry.graph.get_execution_plan_count()} for entry in list(_graphs.values())],
    }


@functools.cache
def _device_reason(index: int) -> str | None:
    if torch.version.hip is not None:
        return "this is a ROCm build of PyTorch; cuDNN's fp8 attention needs an NVIDIA Hopper GPU"
    if _qkv is None:
        return (f"this project's kontext_kernels/ package cannot be imported ({_QKV_IMPORT_ERROR}); reinstall "
                "comfyui-kontext (pip install -e . in its folder) so that its Triton kernels import")
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        return f"this GPU is compute capability {major}.{minor}; fp8 attention needs a Hopper (9.0) or newer GPU"
    try:
        cudnn = _import_cudnn()
    except RuntimeError as error:
        return f"{error}; install it with `pip install nvidia-cudnn-frontend==1.23.0`"
    version = cudnn.backend_version()
    if version < _MIN_CUDNN or version == 91000:
        return (f"PyTorch's cuDNN {cudnn.backend_version_string()} has no fp8 attention (it needs >= 9.1.0, not "
                "9.10.0); a newer PyTorch brings a newer cuDNN")
    return None


def unavailable_reason(device: torch.device | str | int | None = None) -> str | None:
    """None when `fp8_attention` can run on `device`, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here; fp8 attention needs an NVIDIA Hopper GPU"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_reason(index)


def available(device: torch.device | str | int | None = None) -> bool:
    """True when the cuDNN frontend imports, cuDNN has fp8 SDPA and the GPU is Hopper or newer."""
    return unavailable_reason(device) is None


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


# The graph's scalar tensors: which slot of the work buffer (kontext_kernels/fp8_qkv.py) each one is.
_SCALAR_SLOTS = {} if _qkv is None else {
    _Uid.DESCALE_Q: _qkv.DESCALE_Q, _Uid.DESCALE_K: _qkv.DESCALE_K, _Uid.DESCALE_V: _qkv.DESCALE_V,
    _Uid.DESCALE_S: _qkv.DESCALE_S, _Uid.SCALE_S: _qkv.SCALE_S, _Uid.SCALE_O: _qkv.SCALE_O,
    _Uid.AMAX_S: _qkv.AMAX_S_OUT, _Uid.AMAX_O: _qkv.AMAX_O_OUT}


def _variant_pack(q8, k8, v8, o8, work: torch.Tensor) -> dict[int, int]:
    """Device addresses of the graph's tensors: q, k, v, O and the scalars in `work`'s slots."""
    base, size = work.data_ptr(), work.element_size()
    pack = {uid: base + size * slot for uid, slot in _SCALAR_SLOTS.items()}
    pack.update({_Uid.Q: q8.data_ptr(), _Uid.K: k8.data_ptr(), _Uid.V: v8.data_ptr(), _Uid.O: o8.data_ptr()})
    return pack


def sdpa_fp8_graph(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """cuDNN's fp8 attention on quantized q8, k8, v8 [B, H, L, D] with the scales in `work`
    (kontext_kernels.fp8_qkv.quantize_qkv): fp8 O, [B, H, L, D] view of a contiguous [B, L, H, D] buffer."""
    cudnn = _import_cudnn()
    device = q8.device
    handle_entry = _handle(cudnn, device)
    handle = handle_entry[0]
    entry = _graph_for(cudnn, handle, q8, k8, v8)
    batch, heads, length_q, _ = q8.shape
    o8 = torch.empty((batch, length_q, heads, v8.shape[3]), dtype=torch.float8_e4m3fn, device=device).transpose(1, 2)
    pack = _variant_pack(q8, k8, v8, o8, work)
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
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"fp8_attention takes q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_supported("fp8_attention", q.shape[3], v.shape[3], q.dtype)
    if not (q.is_cuda and q.device == k.device == v.device):
        raise ValueError("fp8_attention needs q, k, v on one CUDA device; run the model on a CUDA GPU, or choose "
                         "attention backend 'auto'")


def _check_supported(caller: str, head_dim_qk: int, head_dim_v: int, dtype: torch.dtype) -> None:
    """What cuDNN's fp8 graph takes: head dims multiples of 16 (q/k at most 256), bf16/fp16 inputs."""
    if head_dim_qk % 16 or head_dim_v % 16 or head_dim_qk > 256:
        raise ValueError(f"{caller}: head dims must be multiples of 16 and at most 256, got q/k {head_dim_qk}, "
                         f"v {head_dim_v}; choose attention backend 'auto' for this model")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{caller} takes bf16/fp16 inputs, got {dtype}; run the model in bf16 or fp16, or choose "
                         "attention backend 'auto'")


def _fake_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    batch, heads, length_q, _ = q.shape
    return q.new_empty((batch, length_q, heads, v.shape[3])).transpose(1, 2)


def _fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with torch.cuda.device(q.device):
        q8, k8, v8, work = _qkv.quantize_qkv(q, k, v)
        return _qkv.dequantize_output(sdpa_fp8_graph(q8, k8, v8, work), work, q.dtype)


ops.define("fp8_attention(Tensor q, Tensor k, Tensor v) -> Tensor", _fp8_attention_op, _fake_output)


def _fp8_joint_attention_op(qkvs: list[torch.Tensor], query_scales: list[torch.Tensor], key_scales: list[torch.Tensor],
                            cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    with torch.cuda.device(qkvs[0].device):
        q8, k8, v8, work = _qkv.joint_qkv_norm_rope_fp8(list(zip(qkvs, query_scales, key_scales)), cos, sin,
                                                        num_heads)
        return _qkv.dequantize_output(sdpa_fp8_graph(q8, k8, v8, work), work, qkvs[0].dtype)


def _fake_joint_output(qkvs, query_scales, key_scales, cos, sin, num_heads):
    first = qkvs[0]
    length, head_dim = sum(qkv.shape[1] for qkv in qkvs), first.shape[-1] // (3 * num_heads)
    return first.new_empty((first.shape[0], length, num_heads, head_dim)).transpose(1, 2)


ops.define("fp8_joint_attention(Tensor[] qkvs, Tensor[] query_scales, Tensor[] key_scales, Tensor cos, Tensor sin, "
           "int num_heads) -> Tensor", _fp8_joint_attention_op, _fake_joint_output)


def fp8_joint_attention(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                        sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """fp8 attention over the joint sequence of several streams' (qkv [B, L_i, 3*H*D], q_scale, k_scale), their
    q and k RMS-normalised and rotated as kontext_kernels/qk_norm_rope.py does, quantized in that same pass
    (kontext_kernels.fp8_qkv.joint_qkv_norm_rope_fp8): [B, H, sum L_i, D] in qkv's dtype, laid out as `fp8_attention`'s
    output. Needs the Triton kernels and a CUDA device where `available()` holds."""
    head_dim = streams[0][0].shape[-1] // (3 * num_heads)
    _check_supported("fp8_joint_attention", head_dim, head_dim, streams[0][0].dtype)
    return torch.ops.kontext.fp8_joint_attention([qkv for qkv, _, _ in streams], [q for _, q, _ in streams],
                                                 [k for _, _, k in streams], cos, sin, num_heads)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on fp8 tensor cores: q, k, v [B, H, L, D] bf16/fp16 (any strides),
    returns [B, H, Lq, Dv] in q's dtype, as `F.scaled_dot_product_attention(q, k, v)` would.
    Check `available(q.device)` first. Inference only (no backward)."""
    _check(q, k, v)
    return torch.ops.kontext.fp8_attention(q, k, v)  # the registered op: opaque inside compiled blocks
