"""Block-wise offload: the transformer's blocks live in pinned host memory and stream to the device.

Before a block runs its weights are on the device; the next `prefetch` streamed blocks are already being
copied on a side CUDA stream (non_blocking, from pinned memory), and events make compute wait only for the
block it needs and a copy wait only for the block that last used its buffer. Streamed blocks share a ring
of `prefetch + 1` device buffers, each the size of the largest block, so steps allocate nothing. Blocks
named `resident` keep a device copy of their own between forwards (a cache: `release()` gives that memory
back, for the text encoders or the AE, and the next forward copies them again). The ring wraps around:
the last blocks of one forward prefetch the first blocks of the next, so a sampling step starts loaded.

The host copy is the model. Outside a block's forward its parameters point into the host buffer, so
state_dict(), LoRA merges and saving see and change the host weights; a change is noticed through the
parameters' version counters and copied again. Embedders and the final layer move to the device and stay.
The transformer's code is untouched: forward pre/post hooks swap each block's parameters.

Without CUDA (tests, or `streams=False`) the same bookkeeping runs with synchronous copies, and `trace=True`
records every load, compute and release so the order can be checked.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from ..adapters.wide_lora import narrow_all

_ALIGN = 256  # bytes; every tensor in a block buffer starts on this boundary (cuBLAS, _scaled_mm, CPU SIMD)


@dataclass
class _Entry:
    """One parameter or buffer of a block, and where it sits in the block's byte buffer."""

    owner: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype
    tensor: torch.Tensor  # the Parameter object (or buffer) the block had when attached

    def current(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_param else self.owner._buffers)[self.name]


@dataclass
class _Slot:
    """Device memory holding one block's weights: a ring buffer or a resident block's own."""

    buffer: torch.Tensor  # uint8 [nbytes] on the device
    ready: torch.cuda.Event | None  # recorded on the copy stream when the copy has landed
    free: torch.cuda.Event | None  # recorded on the compute stream when the last block using it has run
    block: int | None = None  # whose weights it holds or is receiving
    versions: tuple[int, ...] | None = None  # that block's parameter versions when it was copied
    claimed: bool = False  # a streamed block is queued on it or running from it
    views: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)  # per block layout


@dataclass
class _Block:
    index: int  # execution order: double blocks, then single blocks
    module: nn.Module
    entries: list[_Entry]
    nbytes: int
    layout: tuple  # blocks of the same kind share it (and their views of a slot)
    home: torch.Tensor  # uint8 [nbytes] host buffer (pinned for CUDA)
    home_views: list[torch.Tensor]
    resident: bool = False
    slot: _Slot | None = None  # the slot it is loaded (or loading) into

    def versions(self) -> tuple[int, ...]:
        return tuple(entry.tensor._version for entry in self.entries)


class BlockOffloader:
    """Keep `model`'s blocks on the host and run each on `device` with its weights copied just in time.

    model: a KontextTransformer (its double_blocks then single_blocks are streamed) or any module when
        `blocks` lists the modules to stream, in the order they run.
    prefetch: how many streamed blocks ahead are copied while one computes (0: copy when needed).
    resident: execution-order indexes of blocks that keep a device copy between forwards.
    streams: copy on a side CUDA stream (default: when `device` is CUDA); False copies synchronously.
    pin_memory: page-lock the host copy (default: when `device` is CUDA); needed for copies to overlap.
    trace: record ("load" | "compute" | "release", block index) events in `self.events`.

    `attach()` (done by the constructor) moves everything; `detach(device)` puts the blocks back on one
    device and removes the hooks. Do not call `model.to()` while attached.
    """

    def __init__(self, model: nn.Module, device: str | torch.device, *, prefetch: int = 1,
                 resident: Iterable[int] = (), streams: bool | None = None, pin_memory: bool | None = None,
                 blocks: Sequence[nn.Module] | None = None, trace: bool = False):
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.prefetch = int(prefetch)
        is_cuda = self.device.type == "cuda"
        self.streams = is_cuda if streams is None else bool(streams)
        if self.streams and not is_cuda:
            raise ValueError(f"side-stream copies need a CUDA device, got {self.device}; pass streams=False")
        self.pin_memory = is_cuda if pin_memory is None else bool(pin_memory)
        self.trace = trace
        self.events: list[tuple[str, int]] = []
        self.bytes_copied = 0  # host-to-device bytes since attach
        self.max_streamed_loaded = 0  # most streamed blocks holding ring slots at once
        modules = list(blocks) if blocks is not None else [*model.double_blocks, *model.single_blocks]
        resident = set(int(i) for i in resident)
        if resident - set(range(len(modules))):
            raise ValueError(f"resident block indexes {sorted(resident - set(range(len(modules))))} are out of "
                             f"range; the model has {len(modules)} blocks (0..{len(modules) - 1})")
        self._modules = modules
        self._resident = resident
        self.blocks: list[_Block] = []
        self._ring: list[_Slot] = []
        self._next_ring = 0
        self._queue: list[int] = []  # streamed blocks issued ahead, in the order they will run
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._copy_stream = torch.cuda.Stream(self.device) if self.streams else None
        self._attached = False
        self.attach()

    # --- setup ---------------------------------------------------------------------------------------

    def attach(self) -> "BlockOffloader":
        if self._attached:
            return self
        for module in self._modules:
            if getattr(module, "_compiled_call_impl", None) is not None:
                raise RuntimeError(
                    "a block was compiled with Module.compile() before offloading, which would trace the offload "
                    "hooks; use KontextTransformer.compile_blocks(), which compiles the blocks' forward only"
                )
        for module in self._modules:  # packed weights are copies: a wide LoRA layout's views would be stale
            narrow_all(module)
        self.blocks = [self._pack(index, module) for index, module in enumerate(self._modules)]
        for block in self.blocks:
            block.resident = block.index in self._resident
        self._move_rest_to_device()
        for block in self.blocks:
            self._hooks.append(block.module.register_forward_pre_hook(self._make_pre_hook(block)))
            self._hooks.append(block.module.register_forward_hook(self._make_post_hook(block), always_call=True))
        self._attached = True
        from .memory import register_reclaimable

        register_reclaimable(self)
        return self

    def _pack(self, index: int, module: nn.Module) -> _Block:
        """Copy a block's tensors into one aligned host buffer and point the block at views of it."""
        entries, seen, offset = [], set(), 0
        for owner in module.modules():
            for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
                for name, tensor in table.items():
                    if tensor is None or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    nbytes = tensor.numel() * tensor.element_size()
                    entries.append(_Entry(owner, name, is_param, offset, nbytes, tensor.shape, tensor.dtype, tensor))
                    offset += -(-nbytes // _ALIGN) * _ALIGN
        home = _host_buffer(max(offset, 1), self.pin_memory)
        views = _views(home, entries)
        with torch.no_grad():
            for entry, view in zip(entries, views):
                view.copy_(entry.tensor)
                self._point(entry, view)
        layout = tuple((e.offset, tuple(e.shape), e.dtype) for e in entries)
        return _Block(index, module, entries, offset, layout, home, views)

    def _move_rest_to_device(self) -> None:
        in_blocks = {id(m) for block in self._modules for m in block.modules()}
        with torch.no_grad():
            for module in self.model.modules():
                if id(module) in in_blocks:
                    continue
                for name, param in module._parameters.items():
                    if param is not None and param.device != self.device:
                        param.data = param.data.to(self.device)
                for name, buffer in module._buffers.items():
                    if buffer is not None and buffer.device != self.device:
                        module._buffers[name] = buffer.to(self.device)

    def detach(self, device: str | torch.device | None = None) -> nn.Module:
        """Remove the hooks and free the device copies; the blocks stay in host memory unless `device` is given."""
        if not self._attached:
            return self.model
        self.release()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if device is not None:
            with torch.no_grad():
                for block in self.blocks:
                    for entry in block.entries:
                        tensor = entry.current()
                        if entry.is_param:
                            tensor.data = tensor.data.to(device)
                        else:
                            entry.owner._buffers[entry.name] = tensor.to(device)
            self.model.to(device)
        self._attached = False
        return self.model

    # --- device memory -------------------------------------------------------------------------------

    @property
    def block_bytes(self) -> list[int]:
        return [block.nbytes for block in self.blocks]

    def device_bytes(self) -> int:
        """Bytes the offloader holds on the device now (ring and resident copies)."""
        held = sum(slot.buffer.numel() for slot in self._ring)
        return held + sum(b.slot.buffer.numel() for b in self.blocks if b.resident and b.slot is not None)

    def release(self) -> int:
        """Give back every device copy (ring and resident); the next forward loads what it needs. Bytes freed."""
        freed = self.device_bytes()
        if self.streams:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        for block in self.blocks:
            block.slot = None
        self._ring = []
        self._next_ring = 0
        self._queue = []
        return freed

    def loaded_blocks(self) -> list[int]:
        """Blocks whose device copy is current or on its way (resident ones and the queued streamed ones)."""
        return [b.index for b in self.blocks if b.slot is not None and b.slot.block == b.index]

    # --- the hooks -----------------------------------------------------------------------------------

    def _make_pre_hook(self, block: _Block):
        @torch.compiler.disable
        def before_block(module: nn.Module, args: tuple) -> None:
            self._before(block)

        return before_block

    def _make_post_hook(self, block: _Block):
        @torch.compiler.disable
        def after_block(module: nn.Module, args: tuple, output) -> None:
            self._after(block)

        return after_block

    def _before(self, block: _Block) -> None:
        self._adopt_replaced(block)
        if not block.resident:
            if self._queue and self._queue[0] == block.index:
                self._queue.pop(0)
            else:
                self._reset_queue()  # not the block the queue expected (or none queued): start again here
        slot = block.slot
        if slot is None or slot.block != block.index or slot.versions != block.versions():
            slot = self._issue(block)
        if self.streams:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self._point_block(block, self._slot_views(slot, block))
        self._prefetch_after(block.index)
        if self.trace:
            self.events.append(("compute", block.index))

    def _after(self, block: _Block) -> None:
        self._point_block(block, block.home_views)
        slot = block.slot
        if slot is None:
            return
        if self.streams:
            slot.free.record(torch.cuda.current_stream(self.device))
        if not block.resident:
            slot.claimed = False
            block.slot = None
        if self.trace:
            self.events.append(("release", block.index))

    # --- copies --------------------------------------------------------------------------------------

    def _prefetch_after(self, index: int) -> None:
        """Issue the loads of the next `prefetch` streamed blocks (and stale resident ones before them)."""
        wanted = self.prefetch
        count = len(self.blocks)
        for step in range(1, count):
            block = self.blocks[(index + step) % count]
            if block.resident:
                if block.slot is None or block.slot.block != block.index:
                    self._issue(block)
                continue
            if wanted == 0:
                break
            wanted -= 1
            if block.index not in self._queue:
                self._issue(block)
                self._queue.append(block.index)

    def _issue(self, block: _Block) -> _Slot:
        slot = block.slot if block.slot is not None and block.slot.block == block.index else None
        if slot is None:
            slot = self._new_slot(block.nbytes) if block.resident else self._ring_slot()
        slot.claimed = not block.resident
        versions = block.versions()
        if not (slot.block == block.index and slot.versions == versions):
            self._copy(block, slot)
            slot.block, slot.versions = block.index, versions
        block.slot = slot
        self.max_streamed_loaded = max(self.max_streamed_loaded, sum(s.claimed for s in self._ring))
        return slot

    def _copy(self, block: _Block, slot: _Slot) -> None:
        target = slot.buffer[: block.nbytes]
        if self.streams:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(slot.free)
                target.copy_(block.home, non_blocking=True)
                slot.ready.record(self._copy_stream)
        else:
            target.copy_(block.home)
        self.bytes_copied += block.nbytes
        if self.trace:
            self.events.append(("load", block.index))

    def _ring_slot(self) -> _Slot:
        if not self._ring:
            largest = max(b.nbytes for b in self.blocks if not b.resident)
            self._ring = [self._new_slot(largest) for _ in range(self.prefetch + 1)]
        slot = self._ring[self._next_ring]
        if slot.claimed:
            raise RuntimeError("internal: the offload ring is full; more blocks were issued than prefetch + 1")
        self._next_ring = (self._next_ring + 1) % len(self._ring)
        slot.block = slot.versions = None
        return slot

    def _new_slot(self, nbytes: int) -> _Slot:
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        if self.streams:
            # The copy stream's first write must follow whatever the compute stream last did with this memory.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            free = torch.cuda.Event()
            free.record(torch.cuda.current_stream(self.device))
            return _Slot(buffer, torch.cuda.Event(), free)
        return _Slot(buffer, None, None)

    def _reset_queue(self) -> None:
        for index in self._queue:
            queued = self.blocks[index]
            if queued.slot is not None:
                queued.slot.claimed = False
                queued.slot = None
        self._queue = []

    # --- pointing parameters -------------------------------------------------------------------------

    def _slot_views(self, slot: _Slot, block: _Block) -> list[torch.Tensor]:
        views = slot.views.get(block.layout)
        if views is None:
            views = slot.views[block.layout] = _views(slot.buffer, block.entries)
        return views

    def _point_block(self, block: _Block, views: list[torch.Tensor]) -> None:
        for entry, view in zip(block.entries, views):
            self._point(entry, view)

    @staticmethod
    def _point(entry: _Entry, view: torch.Tensor) -> None:
        if entry.is_param:
            entry.tensor.data = view
        else:
            entry.owner._buffers[entry.name] = view

    def _adopt_replaced(self, block: _Block) -> None:
        """A parameter replaced since attach (e.g. `layer.weight = nn.Parameter(...)`) is copied into the host
        buffer."""
        for entry, home in zip(block.entries, block.home_views):
            current = entry.current()
            if current is entry.tensor or not entry.is_param:
                continue
            if current.shape != entry.shape or current.dtype != entry.dtype:
                raise RuntimeError(
                    f"block {block.index}: {entry.name} was replaced by a {current.dtype} {list(current.shape)} tensor "
                    f"while offloaded (it was {entry.dtype} {list(entry.shape)}); detach() the offloader before "
                    "changing the model's structure, then offload it again"
                )
            with torch.no_grad():
                home.copy_(current)
            entry.tensor = current
            current.data = home
            if block.slot is not None:
                block.slot.versions = None  # forces a fresh copy


def _views(buffer: torch.Tensor, entries: list[_Entry]) -> list[torch.Tensor]:
    return [buffer[e.offset: e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in entries]


def _host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host buffer, page-locked in place when asked.

    cudaHostRegister locks exactly these pages; torch's pinned allocator would round each block up to a
    power of two (a 680 MB block would take 1 GiB of locked memory).
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or not torch.cuda.is_available():
        return buffer
    try:
        cudart = torch.cuda.cudart()
        status = cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(getattr(status, "value", status)) == 0:
            weakref.finalize(buffer, _unregister, buffer.data_ptr())
            return buffer
    except Exception:  # pragma: no cover - a runtime without cudaHostRegister
        pass
    try:  # pragma: no cover - GPU only
        return buffer.pin_memory()
    except RuntimeError as error:  # pragma: no cover - GPU only
        warnings.warn(f"could not page-lock {nbytes / 2**20:.0f} MiB of host memory ({error}); block copies "
                      "will not overlap compute. Free some RAM or use a smaller memory plan.")
        return buffer


def _unregister(pointer: int) -> None:  # pragma: no cover - GPU only
    try:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    except Exception:
        pass
