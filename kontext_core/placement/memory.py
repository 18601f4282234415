"""Device memory: what each part needs, which plan fits the free VRAM, and who can give memory back.

A plan says where the transformer's weights live (resident on the GPU, or in pinned host memory with
blocks streamed), in which storage (bf16, fp8, or int8 when asked for), where the text encoders wait
between prompts, and whether the AE decodes in tiles. `choose_plan` picks the first that fits, in this order:

    resident-bf16   everything on the GPU (23.8 GB of transformer weights for [dev])
    resident-fp8    float8 weights, upcast per layer (12 GB)
    offload-bf16    only when every block can stay cached on the GPU (released for text encoding)
    offload-fp8     float8 blocks in pinned RAM; as many as fit stay cached, the rest stream with prefetch

An explicit dtype (storage) or plan name overrides the choice. Estimates are deliberately conservative;
`bench/bench_memory.py` measures the peaks they stand for.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import torch
from torch import nn

from ..model.config import AutoencoderConfig, TransformerConfig

if TYPE_CHECKING:
    from ..adapters.lora import LoraWeights

GIB = 1024**3
MIB = 1024**2

# A 1024x1024 edit: 512 T5 tokens + 64x64 target tokens + 64x64 tokens of one 1024x1024 context image.
EDIT_TOKENS = 512 + 4096 + 4096

PLAN_NAMES = ("resident-bf16", "resident-fp8", "offload-bf16", "offload-fp8")
STORAGES = ("bf16", "fp8", "fp16", "fp32", "int8")

# Activations at the peak of one block, in hidden-sized rows per token (elements of the compute dtype).
# The single-stream block holds its input, the fused linear1 output (7 rows), q and k, the attention
# output, GELU(mlp) (4 rows) and their concatenation (5 rows) at once, about 22 rows, plus the stream
# tensors the forward keeps (img, txt, joint: 2 rows) = 24; the QK-norm/RoPE float32 temporaries peak
# lower. fp8 matmuls quantize activations through float32 copies of linear2's 5-row input (+10 rows).
# Rounded up by a third for the allocator's fragmentation: 32 rows (bf16), 48 rows (fp8; int8 alike).
ACTIVATION_ROWS = {"bf16": 32, "fp16": 32, "fp32": 32, "fp8": 48, "int8": 48}
# Streaming blocks through the ring fragments the allocator's pool: on an H100 under a 12 GiB cap the
# offload-fp8 plan sized without this ran out of memory with ~3 GiB reserved but unallocated
# (bench/RESULTS.md, 2026-11-23). Offload plans keep this much more aside.
OFFLOAD_SLACK_BYTES = 3 * 1024**3
# cuBLAS/cuDNN workspaces, the RoPE tables, the sampler's latents and the allocator's slack.
WORKSPACE_BYTES = 512 * MIB

# T5-XXL v1.1 encoder (4.76 B parameters) and CLIP-L's text model (123 M) in bf16; fp8 files are upcast on load.
T5_XXL_PARAMETERS = 4_762_310_656
CLIP_L_PARAMETERS = 123_060_480
TEXT_ENCODER_BYTES = 2 * (T5_XXL_PARAMETERS + CLIP_L_PARAMETERS)
TEXT_ENCODER_ACTIVATION_BYTES = 768 * MIB  # one 512-token prompt through T5-XXL (64 heads of 512^2 scores)

# The AE's largest activations sit at full resolution, where the decoder upsamples 256 channels (ch *
# ch_mult[1]) and a res block holds input, normalised, activated and convolved copies with its shortcut:
# 6 full-resolution tensors of 256 channels (encoder: 6 of 128 channels, ch * ch_mult[0]).
AE_DECODE_TENSORS = 6
AE_ENCODE_TENSORS = 6


# --- free memory and who can give it back ------------------------------------------------------------


def free_device_memory(device: str | torch.device) -> int | None:
    """Bytes this process can still allocate on `device` (None: not limited, e.g. the CPU).

    Counts what the CUDA driver reports free plus what torch's allocator holds unused, and respects a cap
    set with torch.cuda.set_per_process_memory_fraction.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    available = free + cached
    fraction = _memory_fraction(index)
    if fraction < 1.0:
        available = min(available, int(fraction * total) - torch.cuda.memory_allocated(index))
    return max(available, 0)


def _memory_fraction(index: int) -> float:
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is None:
        return 1.0
    try:
        return float(getter(index))
    except (RuntimeError, TypeError):
        return 1.0


class Reclaimable(Protocol):
    device: torch.device

    def release(self) -> int: ...


_RECLAIMABLE: "weakref.WeakSet[Reclaimable]" = weakref.WeakSet()


def register_reclaimable(holder: Reclaimable) -> None:
    """`holder.release()` will be called when something else needs its device memory (its caches reload later)."""
    _RECLAIMABLE.add(holder)


def make_room(device: str | torch.device, needed_bytes: int) -> int | None:
    """Release reclaimable caches on `device` until `needed_bytes` are free; the bytes free afterwards."""
    device = torch.device(device)
    free = free_device_memory(device)
    if free is None or free >= needed_bytes:
        return free
    for holder in list(_RECLAIMABLE):
        if holder.device.type == device.type and (holder.device.index or 0) == (device.index or 0):
            holder.release()
            free = free_device_memory(device)
            if free >= needed_bytes:
                break
    return free


# --- estimates ---------------------------------------------------------------------------------------


EIGHT_BIT_STORAGES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def compute_bytes(storage: str) -> int:
    """Bytes per element of the compute dtype (8-bit storage computes in bf16)."""
    return 4 if storage == "fp32" else 2


@functools.lru_cache(maxsize=16)
def transformer_bytes(config: TransformerConfig, storage: str) -> tuple[int, tuple[int, ...]]:
    """(bytes outside the blocks, bytes of each block in execution order) for a storage dtype.

    8-bit storage keeps the blocks' linear weights (for int8 all but the modulation's, quant.INT8_KEPT) in one
    byte with a float32 scale per row (the loader's per-tensor fp8 scale is smaller); biases, norms and
    everything outside the blocks stay in bf16.
    """
    _check_storage(storage)
    from ..compute.quant import quantized_layers
    from ..model.transformer import KontextTransformer

    with torch.device("meta"):
        model = KontextTransformer(config)
    element = compute_bytes(storage)
    eight_bit = set(quantized_layers(model, EIGHT_BIT_STORAGES[storage])) if storage in EIGHT_BIT_STORAGES else set()
    eight_bit_modules = {id(model.get_submodule(name)) for name in eight_bit}

    def size(module: nn.Module, in_block: bool) -> int:
        total = 0
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if in_block and id(sub) in eight_bit_modules and name == "weight":
                    total += param.numel() + 4 * param.shape[0]
                else:
                    total += param.numel() * element
        return total

    blocks = [*model.double_blocks, *model.single_blocks]
    block_bytes = tuple(size(block, True) for block in blocks)
    return size(model, False) - sum(size(block, False) for block in blocks), block_bytes


def lora_bytes(config: TransformerConfig, storage: str, loras: Sequence[LoraWeights]) -> int:
    """Device bytes that `loras`, applied as the loaders apply them (mode "auto"), hold beside a transformer
    stored in `storage`: none when merged (bf16, fp16, fp32 weights), their on-the-fly factors on 8-bit weights
    and, on fp8 ones, their GEMM columns (kontext_core/adapters/lora.py; every layer that can take columns counted with
    them)."""
    _check_storage(storage)
    if storage not in EIGHT_BIT_STORAGES or not loras:
        return 0
    from ..adapters.lora import on_the_fly_bytes
    from ..compute.quant import quantized_layers, replace_linears_with_quantized
    from ..model.transformer import KontextTransformer

    weight_dtype = EIGHT_BIT_STORAGES[storage]
    with torch.device("meta"):
        model = KontextTransformer(config).to(torch.bfloat16)  # what 8-bit loading keeps outside the blocks
    names = set(quantized_layers(model, weight_dtype))
    replace_linears_with_quantized(model, names, dict.fromkeys(names, weight_dtype), torch.bfloat16)
    return on_the_fly_bytes(model, loras, columns=True)


def activation_bytes(config: TransformerConfig, tokens: int, storage: str, batch: int = 1) -> int:
    """Peak activation bytes of one forward over `tokens` (text + image) tokens: see ACTIVATION_ROWS.

    Assumes a memory-efficient attention (SDPA's flash / cuDNN / efficient kernels on CUDA, which never
    materialise the tokens x tokens scores).
    """
    return batch * tokens * config.hidden_size * compute_bytes(storage) * ACTIVATION_ROWS[storage]


def ae_weight_bytes(config: AutoencoderConfig, element_bytes: int = 2) -> int:
    return _ae_parameters(config) * element_bytes


@functools.lru_cache(maxsize=8)
def _ae_parameters(config: AutoencoderConfig) -> int:
    from ..model.autoencoder import Autoencoder

    with torch.device("meta"):
        return sum(p.numel() for p in Autoencoder(config).parameters())


def ae_decode_bytes(config: AutoencoderConfig, height: int, width: int, element_bytes: int = 2,
                    batch: int = 1) -> int:
    """Peak activation bytes of decoding to a height x width image (pixels): see AE_DECODE_TENSORS."""
    channels = config.ch * config.ch_mult[min(1, len(config.ch_mult) - 1)]
    return batch * AE_DECODE_TENSORS * channels * height * width * element_bytes


def ae_encode_bytes(config: AutoencoderConfig, height: int, width: int, element_bytes: int = 2,
                    batch: int = 1) -> int:
    """Peak activation bytes of encoding a height x width image: see AE_ENCODE_TENSORS."""
    return batch * AE_ENCODE_TENSORS * config.ch * config.ch_mult[0] * height * width * element_bytes


# --- plans -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    name: str  # resident-bf16 | resident-fp8 | offload-bf16 | offload-fp8 (or another storage)
    storage: str  # the transformer's weights: bf16 | fp8 | fp16 | fp32
    device: str
    offload: bool = False
    prefetch: int = 0  # streamed blocks copied ahead of the one computing
    resident_blocks: tuple[int, ...] = ()  # offload: blocks (execution order) that stay cached on the device
    total_blocks: int = 0
    text_encoders: str = "device"  # device (stay), offload (GPU to encode, CPU between), cpu (run there), none
    ae_tiling: bool = False  # the full-size decode is not expected to fit
    expected_peak_bytes: int = 0
    free_bytes: int | None = None
    streamed_bytes: int = 0  # copied host-to-device per transformer step
    reason: str = ""

    @property
    def expected_peak_gib(self) -> float:
        return self.expected_peak_bytes / GIB

    @property
    def streamed_blocks(self) -> int:
        return self.total_blocks - len(self.resident_blocks) if self.offload else 0

    def describe(self) -> str:
        """One line for people: what was chosen, what it costs, and why."""
        weights = {"fp8": "fp8 weights", "int8": "int8 block weights"}.get(self.storage, f"{self.storage} weights")
        if not self.offload:
            where = f"transformer resident on {self.device} in {weights}"
        elif self.streamed_blocks == 0:
            where = (f"transformer in {weights}, all {self.total_blocks} blocks cached on {self.device} "
                     "(back to pinned RAM while the text encoders or the AE need the room)")
        else:
            where = (f"transformer in {weights}, {len(self.resident_blocks)} of {self.total_blocks} blocks cached "
                     f"on {self.device}, {self.streamed_blocks} streamed from pinned RAM "
                     f"({self.streamed_bytes / GIB:.1f} GiB per step, prefetch {self.prefetch})")
        encoders = {"device": f"text encoders stay on {self.device}",
                    "offload": "text encoders move to the CPU once prompts are encoded",
                    "cpu": "text encoders run on the CPU",
                    "none": "no text encoders"}[self.text_encoders]
        ae = "AE decodes in tiles" if self.ae_tiling else "AE tiles only if a decode would not fit"
        if self.free_bytes is None:
            budget = "no device limit"
        else:
            budget = f"expected peak {self.expected_peak_gib:.1f} GiB of {self.free_bytes / GIB:.1f} GiB free"
        why = f" ({self.reason})" if self.reason else ""
        return f"memory plan {self.name}: {where}; {encoders}; {ae}; {budget}{why}"


def spread_resident(block_bytes: tuple[int, ...] | list[int], budget: int) -> tuple[int, ...]:
    """Which blocks stay cached so their bytes fit `budget`: the streamed ones evenly spaced in execution order.

    Spacing the streamed blocks lets each copy overlap the compute of the cached blocks before it.
    """
    count = len(block_bytes)
    if sum(block_bytes) <= budget:
        return tuple(range(count))
    for streamed_count in range(1, count + 1):
        streamed = {int((i + 0.5) * count / streamed_count) for i in range(streamed_count)}
        resident = tuple(i for i in range(count) if i not in streamed)
        if sum(block_bytes[i] for i in resident) <= budget:
            return resident
    return ()


def default_reserve(free_bytes: int) -> int:
    """Head room kept free: 512 MiB plus 3% (other processes, driver, fragmentation)."""
    return 512 * MIB + int(0.03 * free_bytes)


def choose_plan(free_bytes: int | None, config: TransformerConfig | None = None, tokens: int = EDIT_TOKENS, *,
                name: str = "auto", storage: str | None = None, device: str = "cuda", prefetch: int = 2,
                text_encoder_bytes: int = TEXT_ENCODER_BYTES, ae_config: AutoencoderConfig | None = None,
                image_size: tuple[int, int] = (1024, 1024), batch: int = 1,
                reserve_bytes: int | None = None, strict: bool = False,
                loras: Sequence[LoraWeights] = ()) -> MemoryPlan:
    """The plan for a workload of `tokens` (text + target + context) on a device with `free_bytes` free.

    free_bytes: None for a device without a limit (the CPU): everything resident.
    name: "auto" or one of PLAN_NAMES (also "resident-fp16" etc.) to force a plan; with `strict`, a named
        plan that does not fit raises MemoryError instead of being sized as well as it can.
    storage: None to choose, or the dtype the user asked for (bf16, fp8, fp16, fp32): only its plans.
    text_encoder_bytes: the T5 + CLIP weights on the device while encoding (0: no text encoders here).
    image_size: (height, width) of the decoded image, for the AE's needs.
    loras: LoRAs to be applied after loading: what they hold on the device counts as weights (lora_bytes).
    """
    config = config or TransformerConfig()
    ae_config = ae_config or AutoencoderConfig()
    if storage is not None:
        _check_storage(storage)
    if free_bytes is None:
        chosen = storage or "bf16"
        forced = _parse_name(name) if name != "auto" else None
        return MemoryPlan(f"resident-{forced[1] if forced else chosen}", forced[1] if forced else chosen, device,
                          text_encoders="none" if text_encoder_bytes == 0 else "device",
                          total_blocks=config.depth + config.depth_single_blocks,
                          reason="no device memory limit")
    reserve = default_reserve(free_bytes) if reserve_bytes is None else reserve_bytes
    sizing = _Sizing(config, tokens, batch, free_bytes - reserve, free_bytes, device, prefetch,
                     text_encoder_bytes, ae_config, image_size, tuple(loras))
    if name != "auto":
        mode, forced_storage = _parse_name(name)
        if storage is not None and storage != forced_storage:
            raise ValueError(f"memory plan {name!r} stores weights in {forced_storage}, but dtype {storage!r} "
                             f"was asked for; drop one of the two or choose a {mode}-{storage} plan")
        plan = sizing.plan(mode, forced_storage, forced=not strict)
        if plan is None:
            raise MemoryError(f"memory plan {name} needs about {sizing.need(mode, forced_storage) / GIB:.1f} GiB; "
                              f"{sizing.budget / GIB:.1f} GiB of the {free_bytes / GIB:.1f} GiB free are usable")
        return plan

    storages = [storage] if storage is not None else ["bf16", "fp8"]
    candidates = [("resident", s) for s in storages] + [("offload", s) for s in storages]
    attempts: list[str] = []
    for mode, candidate in candidates:
        plan = sizing.plan(mode, candidate)
        # Left to choose, bf16 offload only wins over fp8 when no block has to stream.
        if plan is not None and mode == "offload" and candidate == "bf16" and storage is None and plan.streamed_blocks:
            attempts.append(f"offload-bf16 would stream {plan.streamed_bytes / GIB:.1f} GiB per step")
            continue
        if plan is not None:
            return _with_reason(plan, attempts)
        attempts.append(f"{mode}-{candidate} needs {sizing.need(mode, candidate) / GIB:.1f} GiB")
    raise MemoryError(sizing.too_small(storages[-1]))


def _with_reason(plan: MemoryPlan, attempts: list[str]) -> MemoryPlan:
    if not attempts:
        return plan
    return MemoryPlan(**{**plan.__dict__, "reason": "; ".join(attempts)})


def _parse_name(name: str) -> tuple[str, str]:
    mode, _, storage = name.partition("-")
    if mode not in ("resident", "offload") or storage not in STORAGES:
        raise ValueError(f"unknown memory plan {name!r}; choose auto or one of {', '.join(PLAN_NAMES)} "
                         "(resident-fp16, offload-fp32, ... also work)")
    return mode, storage


def _check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise ValueError(f"unknown weight storage {storage!r}; choose one of {', '.join(STORAGES)}")


@dataclass
class _Sizing:
    """The byte arithmetic behind choose_plan, for one device and workload."""

    config: TransformerConfig
    tokens: int
    batch: int
    budget: int  # free bytes less the reserve
    free: int
    device: str
    prefetch: int
    text_encoder_bytes: int
    ae_config: AutoencoderConfig
    image_size: tuple[int, int]
    loras: tuple[LoraWeights, ...] = ()
    _lora_bytes: dict[str, int] = field(default_factory=dict)

    def _weights(self, storage: str) -> tuple[int, tuple[int, ...]]:
        """transformer_bytes, with what the LoRAs hold counted outside the blocks (on the device whatever
        the plan: an offloaded block's factors stay where it computes)."""
        outside, blocks = transformer_bytes(self.config, storage)
        if storage not in self._lora_bytes:
            self._lora_bytes[storage] = lora_bytes(self.config, storage, self.loras)
        return outside + self._lora_bytes[storage], blocks

    def need(self, mode: str, storage: str) -> int:
        """Peak bytes of the plan with every block on the device (resident) or only the minimum (offload)."""
        outside, blocks = self._weights(storage)
        sampling = activation_bytes(self.config, self.tokens, storage, self.batch) + WORKSPACE_BYTES
        if mode == "resident":
            return outside + sum(blocks) + max(sampling, self._encoding_extra())
        return outside + self._ring(blocks) + sampling + OFFLOAD_SLACK_BYTES

    def _encoding_extra(self) -> int:
        if self.text_encoder_bytes == 0:
            return 0
        return self.text_encoder_bytes + TEXT_ENCODER_ACTIVATION_BYTES

    def _ring(self, blocks: tuple[int, ...]) -> int:
        return (self.prefetch + 1) * max(blocks)

    def _ae(self) -> tuple[int, int]:
        height, width = self.image_size
        weights = ae_weight_bytes(self.ae_config)
        full = max(ae_decode_bytes(self.ae_config, height, width, batch=self.batch),
                   ae_encode_bytes(self.ae_config, height, width))
        return weights, full

    def plan(self, mode: str, storage: str, forced: bool = False) -> MemoryPlan | None:
        outside, blocks = self._weights(storage)
        sampling = activation_bytes(self.config, self.tokens, storage, self.batch) + WORKSPACE_BYTES
        if mode == "offload":
            sampling += OFFLOAD_SLACK_BYTES
        ae_weights, ae_full = self._ae()
        encoding = self._encoding_extra()
        total_blocks = len(blocks)
        common = dict(name=f"{mode}-{storage}", storage=storage, device=self.device, total_blocks=total_blocks,
                      free_bytes=self.free)
        if mode == "resident":
            weights = outside + sum(blocks) + ae_weights
            if encoding == 0:
                encoders = "none"
            elif weights + encoding + sampling <= self.budget:
                encoders = "device"
            elif weights + encoding <= self.budget:
                encoders = "offload"
            elif forced:
                encoders = "cpu"
            else:
                return None
            if weights + sampling > self.budget and not forced:
                return None
            held = weights + (encoding if encoders == "device" else 0)
            peak = held + max(sampling, encoding if encoders == "offload" else 0, ae_full)
            return MemoryPlan(**common, text_encoders=encoders, ae_tiling=held + ae_full > self.budget,
                              expected_peak_bytes=peak)

        # Offload: the blocks' caches take what the phases leave; text encoding and AE decoding release them.
        fixed = outside + ae_weights + sampling
        if fixed + sum(blocks) <= self.budget:
            resident, ring = tuple(range(total_blocks)), 0
        else:
            ring = self._ring(blocks)
            if fixed + ring > self.budget and not forced:
                return None
            resident = spread_resident(blocks, self.budget - fixed - ring)
        cached = sum(blocks[i] for i in resident)
        streamed = sum(blocks) - cached
        if encoding == 0:
            encoders = "none"
        elif outside + ae_weights + encoding <= self.budget:
            encoders = "offload"
        else:
            encoders = "cpu"
        decoding = fixed - sampling + ring + cached + ae_full  # the caches stay when the decode fits beside them
        if decoding > self.budget:
            decoding = outside + ae_weights + ae_full  # else they are released first
        peak = max(fixed + ring + cached, outside + ae_weights + (encoding if encoders == "offload" else 0), decoding)
        return MemoryPlan(**common, offload=True, prefetch=self.prefetch if streamed else 0,
                          resident_blocks=resident, text_encoders=encoders,
                          ae_tiling=outside + ae_weights + ae_full > self.budget,
                          expected_peak_bytes=peak, streamed_bytes=streamed)

    def too_small(self, storage: str) -> str:
        need = self.need("offload", storage) + (self.free - self.budget)
        return (f"{self.free / GIB:.1f} GiB of {self.device} memory is free, but even streaming the {storage} "
                f"transformer block by block needs about {need / GIB:.1f} GiB for a {self.tokens}-token step. "
                "Close other programs using the GPU, use a smaller image, or run on the CPU (device='cpu').")


# --- text encoders that visit the device -------------------------------------------------------------


class OffloadedTextEncoders:
    """Text encoders kept on the CPU that visit `device` only to encode.

    Before a prompt the cache does not hold, reclaimable caches on the device (offloaded transformer
    blocks) make room for the encoders; after encoding they go back to the CPU. Every other attribute is
    the wrapped TextEncoders'.
    """

    def __init__(self, encoders, device: str | torch.device, needed_bytes: int = TEXT_ENCODER_BYTES
                 + TEXT_ENCODER_ACTIVATION_BYTES):
        self.encoders = encoders
        self.needed_bytes = needed_bytes
        encoders.device = torch.device(device)  # where they compute; they rest on the CPU

    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        listed = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self._cached(listed):
            make_room(self.encoders.device, self.needed_bytes)
        try:
            return self.encoders.encode(listed)
        finally:
            self.encoders.offload("cpu")

    def _cached(self, prompts: list[str]) -> bool:
        # TextEncoders answers cached prompts without touching its models; nothing needs the device then.
        cache = getattr(self.encoders, "_cache", None)
        return cache is not None and all(prompt in cache for prompt in prompts)

    def __getattr__(self, name: str):
        return getattr(self.encoders, name)
