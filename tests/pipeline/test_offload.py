"""BlockOffloader on the CPU: block moves, prefetch order, residency, and outputs equal to the resident model.

On the CPU the copies are synchronous and "device" buffers are host tensors, so every comparison with
the model that was never offloaded is exact (torch.equal). The CUDA path (side stream, pinned memory)
is checked at the end when a GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import compiled_graphs, randomize_, reordering_tolerance
from kontext_core.model.config import TransformerConfig
from kontext_core.placement.offload import BlockOffloader
from kontext_core.compute.quant import quantize_model
from kontext_core.model.tokens import pack_latent, position_ids, text_position_ids
from kontext_core.model.transformer import KontextTransformer

DOUBLE, SINGLE = 3, 4  # 7 blocks: enough for a ring to wrap around


@pytest.fixture
def model() -> KontextTransformer:
    config = TransformerConfig.tiny(depth=DOUBLE, depth_single_blocks=SINGLE)
    return randomize_(KontextTransformer(config), seed=11).eval()


def _inputs(config: TransformerConfig, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, config.latent_channels, 8, 6, generator=generator)
    text = torch.randn(1, 5, config.context_in_dim, generator=generator)
    return (pack_latent(latent), position_ids(8, 6), text, text_position_ids(1, 5),
            torch.rand(1, generator=generator), torch.randn(1, config.vec_in_dim, generator=generator),
            torch.tensor([2.5]))


def _blocks(model: KontextTransformer) -> list[torch.nn.Module]:
    return [*model.double_blocks, *model.single_blocks]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_offloaded_forward_equals_the_resident_model_exactly(model, prefetch):
    reference = copy.deepcopy(model)
    offloader = BlockOffloader(model, "cpu", prefetch=prefetch)
    with torch.no_grad():
        for seed in (1, 2, 3):  # several forwards: the ring wraps from one into the next
            inputs = _inputs(model.config, seed)
            assert torch.equal(model(*inputs), reference(*inputs))
    assert offloader.bytes_copied >= 3 * sum(offloader.block_bytes) - (prefetch * max(offloader.block_bytes))


def test_compiled_blocks_run_under_the_offloader(model):
    # compile_blocks compiles the blocks' forward only; the offload hooks on the blocks run around it.
    # "aot_eager" traces as the compiler does without generating code, so this runs on the CPU.
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    graphs = compiled_graphs()
    try:
        offloader = BlockOffloader(model, "cpu", prefetch=1)
        model.compile_blocks(backend="aot_eager")
        with torch.no_grad():
            for seed in (1, 2):
                inputs = _inputs(model.config, seed)
                # aot_eager may decompose ops and so sum in another order: reordering error through every block.
                expected = reference(*inputs)
                assert torch.allclose(model(*inputs), expected, **reordering_tolerance(
                    expected, terms=model.config.mlp_hidden_dim, chained=DOUBLE + SINGLE))
        assert compiled_graphs() - graphs == 2  # compiled, not run eagerly around the hooks
        assert offloader.bytes_copied > 0
    finally:
        torch._dynamo.reset()


def test_next_block_is_prefetched_before_the_current_one_computes(model):
    offloader = BlockOffloader(model, "cpu", prefetch=1, trace=True)
    with torch.no_grad():
        model(*_inputs(model.config, 1))
        model(*_inputs(model.config, 2))
    events = offloader.events
    count = DOUBLE + SINGLE
    computes = [i for i, e in enumerate(events) if e[0] == "compute"]
    assert [events[i][1] for i in computes] == list(range(count)) * 2
    for position in computes:
        block = events[position][1]
        upcoming = (block + 1) % count
        # The next block's copy is issued before this block computes (block 3 loads before block 2 runs)...
        assert ("load", upcoming) in events[:position]
        last_load = max(i for i, e in enumerate(events[:position]) if e == ("load", upcoming))
        last_release = max((i for i, e in enumerate(events[:position]) if e == ("release", upcoming)), default=-1)
        assert last_load > last_release  # ...and it is a fresh copy, not the one released a forward ago
        # ...and no more than one block ahead.
        later = (block + 2) % count
        loads_of_later = [i for i, e in enumerate(events[:position]) if e == ("load", later)]
        releases_of_later = [i for i, e in enumerate(events[:position]) if e == ("release", later)]
        assert not loads_of_later or (releases_of_later and max(releases_of_later) > max(loads_of_later))
    # The last block of the first forward already prefetched block 0 of the second.
    assert events[computes[count - 1] - 1] == ("load", 0)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_at_most_prefetch_plus_one_blocks_are_on_the_device(model, prefetch):
    offloader = BlockOffloader(model, "cpu", prefetch=prefetch)
    seen = []
    for block in _blocks(model):  # registered after the offloader's hooks, so they run after them
        block.register_forward_pre_hook(lambda *_: seen.append(len(offloader.loaded_blocks())))
    with torch.no_grad():
        model(*_inputs(model.config, 1))
        model(*_inputs(model.config, 2))
    assert max(seen) == prefetch + 1
    assert offloader.max_streamed_loaded == prefetch + 1
    assert offloader.device_bytes() == (prefetch + 1) * max(offloader.block_bytes)


def test_every_block_computes_with_its_own_weights_from_device_buffers(model):
    originals = [{k: v.clone() for k, v in block.state_dict().items()} for block in _blocks(model)]
    offloader = BlockOffloader(model, "cpu", prefetch=2)
    checked = []

    def check(index):
        def hook(module, args):
            block = offloader.blocks[index]
            home = block.home.data_ptr(), block.home.data_ptr() + block.nbytes
            for name, tensor in module.state_dict().items():
                assert torch.equal(tensor, originals[index][name]), f"block {index} ran with another block's {name}"
                assert not home[0] <= tensor.data_ptr() < home[1], f"block {index}'s {name} was not copied"
            checked.append(index)
        return hook

    for index, block in enumerate(_blocks(model)):
        block.register_forward_pre_hook(check(index))
    with torch.no_grad():
        model(*_inputs(model.config, 1))
    assert checked == list(range(DOUBLE + SINGLE))
    # Outside a forward every parameter points into its block's host buffer.
    for block in offloader.blocks:
        for entry in block.entries:
            assert block.home.data_ptr() <= entry.current().data_ptr() < block.home.data_ptr() + block.nbytes
    # The rest of the model was moved to the device, and state_dict() still holds the original weights.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in copy.deepcopy(model).state_dict().items())


def test_resident_blocks_are_copied_once_and_come_back_after_release(model):
    reference = copy.deepcopy(model)
    resident = (0, 2, 5)
    offloader = BlockOffloader(model, "cpu", prefetch=1, resident=resident, trace=True)
    streamed = [i for i in range(DOUBLE + SINGLE) if i not in resident]
    inputs = _inputs(model.config, 4)
    with torch.no_grad():
        model(*inputs)
        assert set(resident) <= set(offloader.loaded_blocks())
        offloader.events.clear()
        assert torch.equal(model(*inputs), reference(*inputs))
        loads = [index for kind, index in offloader.events if kind == "load"]
        assert sorted(loads) == streamed  # resident blocks were not copied again
        assert offloader.release() > 0 and offloader.loaded_blocks() == [] and offloader.device_bytes() == 0
        offloader.events.clear()
        assert torch.equal(model(*inputs), reference(*inputs))
        assert set(resident) <= {index for kind, index in offloader.events if kind == "load"}


def test_weights_changed_on_the_host_are_copied_again(model):
    """A LoRA merge or any in-place change between forwards reaches the device, even a prefetched block."""
    reference = copy.deepcopy(model)
    offloader = BlockOffloader(model, "cpu", prefetch=2, resident=(3,))
    inputs = _inputs(model.config, 5)
    with torch.no_grad():
        model(*inputs)  # block 0 and 1 are prefetched for the next forward, block 3 is cached
        for target in (model, reference):
            target.double_blocks[0].img_attn.qkv.weight.mul_(1.5)
            target.single_blocks[0].linear1.bias.add_(0.25)
        assert torch.equal(model(*inputs), reference(*inputs))
        # A replaced parameter is adopted into the host buffer.
        replacement = torch.nn.Parameter(reference.double_blocks[1].txt_mlp[0].weight.detach() * 0.5,
                                         requires_grad=False)
        model.double_blocks[1].txt_mlp[0].weight = replacement
        reference.double_blocks[1].txt_mlp[0].weight = copy.deepcopy(replacement)
        assert torch.equal(model(*inputs), reference(*inputs))
    assert offloader.blocks[1].home.data_ptr() <= model.double_blocks[1].txt_mlp[0].weight.data_ptr()


@pytest.mark.parametrize("weights", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
def test_8bit_storage_offloads_too(model, weights):
    quantize_model(model, weights)
    reference = copy.deepcopy(model)
    offloader = BlockOffloader(model, "cpu", prefetch=1, resident=(1,))
    assert {e.dtype for b in offloader.blocks for e in b.entries} >= {weights, torch.float32}
    inputs = _inputs(model.config, 6)
    with torch.no_grad():
        assert torch.equal(model(*inputs), reference(*inputs))


def test_a_failed_forward_leaves_the_model_usable(model):
    reference = copy.deepcopy(model)
    offloader = BlockOffloader(model, "cpu", prefetch=1)
    calls = {"count": 0}

    def fail_once(module, args):
        calls["count"] += 1
        if calls["count"] == 1:
            raise RuntimeError("out of memory (simulated)")

    handle = model.single_blocks[1].register_forward_pre_hook(fail_once)
    inputs = _inputs(model.config, 7)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="simulated"):
            model(*inputs)
        for block in offloader.blocks:  # the blocks that ran were put back on the host
            for entry in block.entries:
                assert block.home.data_ptr() <= entry.current().data_ptr() < block.home.data_ptr() + block.nbytes
        assert torch.equal(model(*inputs), reference(*inputs))
    handle.remove()


def test_detach_puts_the_blocks_back(model):
    reference = copy.deepcopy(model)
    offloader = BlockOffloader(model, "cpu", prefetch=1, trace=True)
    offloader.detach("cpu")
    inputs = _inputs(model.config, 8)
    with torch.no_grad():
        assert torch.equal(model(*inputs), reference(*inputs))
    assert offloader.events == []  # no hooks left


def test_bad_arguments_are_explained(model):
    with pytest.raises(ValueError, match="CUDA device"):
        BlockOffloader(copy.deepcopy(model), "cpu", streams=True)
    with pytest.raises(ValueError, match="out of range"):
        BlockOffloader(copy.deepcopy(model), "cpu", resident=(99,))
    with pytest.raises(ValueError, match="prefetch"):
        BlockOffloader(copy.deepcopy(model), "cpu", prefetch=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (side-stream copies from pinned memory)")
@pytest.mark.parametrize("prefetch", [1, 2])
def test_side_stream_offload_equals_the_resident_model_on_cuda(model, prefetch):
    model = model.to(torch.bfloat16)
    reference = copy.deepcopy(model).cuda()
    offloader = BlockOffloader(model, "cuda", prefetch=prefetch, resident=(2,))
    assert offloader.streams and all(block.home.is_pinned() for block in offloader.blocks)
    with torch.no_grad():
        for seed in (1, 2):
            inputs = tuple(t.cuda() for t in _inputs(model.config, seed))
            assert torch.equal(model(*inputs), reference(*inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (side-stream copies from pinned memory)")
def test_a_lora_on_the_fly_on_an_offloaded_model_keeps_its_factors_on_the_gpu(model):
    from conftest import random_block_lora
    from kontext_core import apply_lora
    from kontext_core.compute.fused import lora_factors

    model = model.to(torch.bfloat16)
    reference = copy.deepcopy(model).cuda()
    BlockOffloader(model, "cuda", prefetch=1)
    lora = random_block_lora(model, seed=3)
    apply_lora(model, lora, 0.7, mode="on_the_fly")
    apply_lora(reference, lora, 0.7, mode="on_the_fly")
    layer = model.single_blocks[0].linear1
    assert layer.weight.device.type == "cpu" and lora_factors(layer).down.is_cuda  # not copied at every call
    with torch.no_grad():
        inputs = tuple(t.cuda() for t in _inputs(model.config, 1))
        assert torch.equal(model(*inputs), reference(*inputs))
